"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed by the CLI as a single line,
``error: <message>``, with a non-zero exit and no traceback (unless
``HYDRA_FULL_ERROR=1``). The message says what is wrong, quotes the value, and
says how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input (config, files, data) rather than a bug."""
