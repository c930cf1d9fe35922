"""Every use of a private torch API in finetune, each behind one small function.

torch's private names (``torch._utils``, ``_internal=True``, a DataLoader's ``_iterator``, the
text of its errors) may change in any release, and the dependency range admits every torch 2.x.
Keeping them here, and nowhere else (tests/test_torch_compat.py checks the package's source),
means a torch upgrade that moves one breaks one function, which tests/test_torch_compat.py
names: each test there exercises one function against the installed torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.jit._pickle
from torch import nn
from torch._weights_only_unpickler import Unpickler
from torch.nn.modules.batchnorm import _BatchNorm

# Identity functions older TorchScript pickles call to tag list types (torch/jit/_pickle.py).
LIST_TAGS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")
# What torch.load(weights_only=True) says of everything its unpickler refuses, and of a TorchScript archive,
# which it never reads weights-only (torch/serialization.py).
REFUSAL_TEXT = re.compile(r"Weights only load failed|Cannot use ``weights_only=True`` with TorchScript archives")
# The refused global, as the weights-only unpickler names it ("GLOBAL posix.system was not an allowed global"),
# then as older releases did ("Unsupported global: ...").
BLOCKED_GLOBAL = (re.compile(r"GLOBAL ([\w.]+)"),
                  re.compile(r"Unsupported (?:global|operand)[^:]*: ([^\s.][^\n]*?)(?: was|\n|$)"))
# What torch's readers say of a file they cannot parse: the zip reader (caffe2/serialize/inline_container.cc)
# and the legacy format's checks (torch/serialization.py, the storage readers in torch/csrc).
DAMAGE_TEXT = re.compile(r"PytorchStreamReader failed|inline_container\.cc|hasRecord\(|unexpected EOF, expected \d+ "
                         r"more bytes|Invalid magic number|Invalid protocol version|storage has wrong byte size")


def weights_only_unpickler() -> type:
    """The unpickler ``torch.load(weights_only=True)`` uses (allowlisted globals only), to subclass.

    A TorchScript archive's ``data.pkl`` needs its storages from the archive's ``data/`` records,
    which only a ``persistent_load`` of one's own can give; torch has no public class for it.
    """
    return Unpickler


def clear_sparse_tensor_checks() -> None:
    """Forget the sparse tensors the weights-only unpickler recorded (``torch._utils._sparse_tensors_to_validate``).

    ``torch.load`` validates and clears that module-level list after unpickling; an unpickler used
    directly (`weights_only_unpickler`) leaves it to the next ``torch.load``, which would check (and
    until then keep alive) tensors it never read.
    """
    torch._utils._sparse_tensors_to_validate.clear()


def typed_storage(raw: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """``raw``'s bytes as a storage of ``dtype``, what a pickled tensor's rebuild function expects.

    ``torch.load``'s own ``persistent_load`` builds these with ``_internal=True``; without it,
    ``TypedStorage`` warns that it is deprecated on every storage.
    """
    return torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` as ``torch.load`` counts a storage's size (``torch._utils._element_size``),
    so that a record is measured as torch itself would read it."""
    return torch._utils._element_size(dtype)


def list_tag_functions() -> list[Callable[..., Any]]:
    """The list-tagging identity functions of ``torch.jit._pickle`` this torch has, for a weights-only allowlist."""
    return [getattr(torch.jit._pickle, name) for name in LIST_TAGS if hasattr(torch.jit._pickle, name)]


def is_weights_only_refusal(err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused what the file holds: an object its unpickler does not
    allow, or a TorchScript archive. torch says so only in the error's text (for the unpickler, of every error
    it raises)."""
    return REFUSAL_TEXT.search(str(err)) is not None


def blocked_global(err: BaseException) -> str | None:
    """The global (``'posix.system'``) a weights-only unpickler refused, read from its error's text; None if unnamed."""
    text = str(err)
    for pattern in BLOCKED_GLOBAL:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def reports_damaged_file(err: BaseException) -> bool:
    """Whether ``err`` is torch's reader saying the file itself is malformed (a broken zip record, a legacy
    file cut short), which torch says only in a ``RuntimeError``'s text."""
    return isinstance(err, RuntimeError) and DAMAGE_TEXT.search(str(err)) is not None


def kept_iterator(loader: Any) -> Any:
    """The iterator (and worker processes) a DataLoader keeps between passes (``persistent_workers``), or None."""
    return getattr(loader, "_iterator", None)


def keep_iterator(loader: Any, iterator: Any) -> None:
    """Make ``iterator`` the one ``loader`` keeps (`kept_iterator`): a loader of our own that wraps a DataLoader
    (shards: `finetune.data.stream`) holds its live pass where `shutdown_loader_workers` finds it."""
    loader._iterator = iterator


def shutdown_loader_workers(loader: Any, *, keep: Any = None) -> None:
    """Shut down the worker processes ``loader`` keeps between passes, unless they are ``keep`` (a `kept_iterator`).

    The loader then keeps ``keep`` (None: nothing, so its next pass starts fresh workers). torch has
    no public call for this; ``_shutdown_workers`` is what the iterator's ``__del__`` runs.
    """
    iterator = kept_iterator(loader)
    if iterator is None or iterator is keep:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    keep_iterator(loader, keep)


def copy_state_dict_versions(source: Any, target: Any) -> None:
    """Give ``target`` the per-module versions a ``state_dict()`` carries in its ``_metadata`` attribute (if any).

    ``load_state_dict`` reads them to convert old layouts (BatchNorm before ``num_batches_tracked``);
    a copy of the dict without them would load as the oldest layout.
    """
    if hasattr(source, "_metadata"):
        target._metadata = source._metadata


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer: torch's private base class ``_BatchNorm`` of BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy ones and their subclasses (timm's BatchNormAct2d), but not InstanceNorm."""
    return isinstance(module, _BatchNorm)


class ModuleStateLoading:
    """Mixin: a module loads its state dict as ``nn.Module`` itself does, skipping a parent class's override.

    ``_load_from_state_dict`` is the private hook ``load_state_dict`` calls on each module; torchvision's
    ``FrozenBatchNorm2d`` overrides it to drop ``num_batches_tracked``, which a subclass that keeps the
    buffer must load. Put it first among the bases.
    """

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        nn.Module._load_from_state_dict(self, *args, **kwargs)
