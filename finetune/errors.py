"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed by the CLI as a single line,
``error: <message>``, with a non-zero exit and no traceback (unless
``HYDRA_FULL_ERROR=1``). The message says what is wrong, quotes the value, and
says how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input (config, files, data) rather than a bug."""


class UnexpectedReadError(UserError):
    """A reader failed in a way that says nothing about the file (a bug, or a torch release that reads
    differently): not damage. Raised ``from`` the original error, which ``HYDRA_FULL_ERROR=1`` shows.
    Whoever would skip a damaged file (resume's fallback to an older state) must not skip this one:
    the older file would fail the same way, and the newer progress would be dropped silently."""


def message_of(err: UserError) -> str:
    """The one line to print for ``err``.

    A `UserError` raised in a DataLoader worker reaches the main process re-raised by torch
    with the worker's whole traceback as its message; its last line holds ours.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(f"{UserError.__name__}: ", 1)[-1]


class RunPruned(Exception):
    """A sweep's pruner stopped this run early (its trial looked hopeless); the run is recorded as ``pruned``."""


def describe_error(err: BaseException, *, limit: int = 200) -> str:
    """``Type: first line of the message`` (shortened): the real cause of a failure, in one line.

    >>> describe_error(ValueError("bad header\\nmore"))
    'ValueError: bad header'
    """
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__
