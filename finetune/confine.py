"""File names read from files are data: confine each to the directory it names a file in.

A manifest, the checkpoint-policy state inside ``last.ckpt`` and a shard index all name other
files by a string that someone else may have written. Before such a name is read, linked or
deleted it goes through ``confined``: only a plain relative name that stays inside the
directory, symlinks resolved, is accepted. Written by hand: ``pathlib`` has no "join, but only
inside" (``Path.is_relative_to`` checks a path, not what a name can do once joined).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from finetune.errors import UserError


def confined(directory: str | Path, name: Any, *, named_in: str | Path) -> Path:
    """``directory / name`` when ``name`` is a relative file name that stays inside ``directory``.

    >>> confined("/runs/a/checkpoints", "last.ckpt", named_in="manifest.json").name
    'last.ckpt'

    Args:
        directory: The directory the name is relative to.
        name: The name as read from the file (any type: it is checked).
        named_in: The file the name was read from, for the error message.

    Raises:
        UserError: the name is not a string, is empty, absolute, has ``..`` or a drive, or
            resolves (through symlinks) outside ``directory``; the message names both.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"'{named_in}' names a file as {name!r}, which is not a file name: refused "
                        "(the file may be damaged or was not written by finetune)")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise UserError(f"'{named_in}' names the file '{name}' outside '{directory}': refused "
                        "(only names inside that directory are read, linked or deleted)")
    base = Path(directory).resolve()
    path = Path(directory) / name
    if not path.resolve().is_relative_to(base):
        raise UserError(f"'{named_in}' names '{name}', a link out of '{directory}': refused "
                        "(only names inside that directory are read, linked or deleted)")
    return path
