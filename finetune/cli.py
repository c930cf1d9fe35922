"""What the ``python -m finetune.*`` commands share with their user: how a user error ends a command
(one ``error:`` line, exit status 2: `exit_on_user_error`), commands printed to paste, and text from
other people's files printed safely.

Every command the project prints (the closing block's ``next:``, a sweep's ``reproduce:``, resume
hints, export's ``use it:``) is built here from its words: each override value quoted for Hydra
when Hydra would read it otherwise (a comma makes a sweep, a quote a string), then every word quoted
for the shell (`shlex.join`), so a path or an override value taken from a run dir someone else made
can never run as shell code when the line is pasted.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import TypeVar

from finetune.errors import UserError, message_of

T = TypeVar("T")

# The interpreter in printed commands: this one, by its path, so that a pasted command works from any
# directory and without the virtual environment activated.
PYTHON = sys.executable or "python"
HYDRA_PLAIN = re.compile(r"[\w./@%+:-]+")  # a value Hydra reads as it is typed
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def exit_on_user_error(task: Callable[[], T], *, tag: str = "") -> T:
    """Run ``task`` (a Hydra app's work); a `UserError` ends the command with one ``error:`` line on
    stderr and exit status 2 (its traceback instead with ``HYDRA_FULL_ERROR=1``). ``tag``: put before
    the line (``[rank 1] `` under DDP)."""
    logging.captureWarnings(True)  # e.g. skipped unreadable images: a log line, not a warnings.warn block
    try:
        return task()
    except UserError as err:
        report_user_error(err, tag=tag)
        sys.exit(2)


def status_of(task: Callable[[], int | None]) -> int:
    """The exit status of an argparse command's ``task`` (its own, 0 for None); a `UserError` is one
    ``error:`` line on stderr and status 2, as `exit_on_user_error`."""
    try:
        return task() or 0
    except UserError as err:
        report_user_error(err)
        return 2


def report_user_error(err: UserError, *, tag: str = "") -> None:
    """The one ``error:`` line of every finetune command; with ``HYDRA_FULL_ERROR=1`` the traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    logging.getLogger("finetune").debug("stopped by a user error", exc_info=True)
    print(f"{tag}error: {message_of(err)}", file=sys.stderr)


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
    """``PYTHON -m MODULE ARGS`` quoted for the shell: each argument is one word, whatever it holds.

    >>> command("finetune", "resume=/runs/x;touch${IFS}y")  # doctest: +ELLIPSIS
    "... -m finetune 'resume=/runs/x;touch${IFS}y'"
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
