"""What the ``python -m finetune.*`` commands share with their user: commands printed to paste, and
text from other people's files printed safely.

Every command the project prints (the closing block's ``next:``, a sweep's ``reproduce:``, resume
hints, export's ``use it:``) is built here from its words: each override value quoted for Hydra
when Hydra would read it otherwise (a comma makes a sweep, a quote a string), then every word quoted
for the shell (`shlex.join`), so a path or an override value taken from a run dir someone else made
can never run as shell code when the line is pasted.
"""

from __future__ import annotations

import re
import shlex

PYTHON = "python"  # the interpreter in printed commands
HYDRA_PLAIN = re.compile(r"[\w./@%+:-]+")  # a value Hydra reads as it is typed
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value that reads back as ``text``: as it is when Hydra reads it so,
    else single-quoted (a quote escaped, the backslashes right before a quote or the end doubled:
    Hydra's rule), and ``${`` escaped, so that no interpolation (``${oc.env:...}``) is resolved from it.

    >>> hydra_value("/runs/a"), hydra_value("/runs/a,b"), hydra_value("it's"), hydra_value("${oc.env:X}")
    ('/runs/a', "'/runs/a,b'", "'it\\\\'s'", "'\\\\${oc.env:X}'")
    """
    if HYDRA_PLAIN.fullmatch(text) and not re.fullmatch(r"[\d.e+-]+|true|false|null|nan|inf", text, re.I):
        return text
    text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text) + "'"


def override(key: str, value: object) -> str:
    """``key=value`` with the value quoted for Hydra (`hydra_value`)."""
    return f"{key}={hydra_value(str(value))}"


def command(module: str, *args: str) -> str:
    """``python -m MODULE ARGS`` quoted for the shell: each argument is one word, whatever it holds.

    >>> command("finetune", "resume=/runs/x;touch${IFS}y")
    "python -m finetune 'resume=/runs/x;touch${IFS}y'"
    """
    return " ".join(shell_word(w) for w in (PYTHON, "-m", module, *args))


def shell_word(word: str) -> str:
    """``word`` as one shell word: as it is when safe, else in double quotes when nothing in it is special
    there (a Hydra-quoted value reads better so), else `shlex.quote`'s single quotes.

    >>> print(shell_word("a=b"), shell_word("k='x y'"), shell_word("k=$(id)"))
    a=b "k='x y'" 'k=$(id)'
    """
    quoted = shlex.quote(word)
    if quoted == word or "'" not in word or any(c in word for c in '"$`\\!'):
        return quoted
    return f'"{word}"'


def printable(text: object, limit: int = 500) -> str:
    """``text`` with control characters shown as escapes (a terminal would act on them) and at most
    ``limit`` characters: for text read from someone else's file before it is printed.

    >>> printable("ok\\x1b[2Khidden\\nnext")
    'ok\\\\x1b[2Khidden\\\\nnext'
    """
    text = str(text)
    shown = CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode(), text[:limit])
    return shown + ("..." if len(text) > limit else "")


def has_control(text: str) -> bool:
    return CONTROL.search(text) is not None
