"""The private torch APIs finetune relies on, checked against the installed torch, and the readers' errors.

Each function of `finetune._torch_compat` has one test here that exercises it as the package
uses it; when a torch release moves or changes what it relies on, the test names the private
API, the torch version and the function to update. A scan of the package's source keeps every
private torch use inside ``finetune/_torch_compat.py``.

Then the readers (`read_state_dict`, `load_model`, `load_training_state`): a file's own damage
is one "truncated or corrupt" line, while an error the file does not explain (a torch upgrade
that breaks a reader) says so and keeps the error as its cause, for ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import ast
import io
import multiprocessing
import os
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
from torchvision.ops import FrozenBatchNorm2d

import finetune
from conftest_weights import TinyNet
from finetune import _torch_compat as compat
from finetune.checkpoint import load_model, load_training_state
from finetune.errors import UserError
from finetune.weights import read_state_dict

PACKAGE = Path(finetune.__file__).parent
COMPAT = PACKAGE / "_torch_compat.py"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore:'torch.load' received a zip file",
                                        "ignore:TypedStorage is deprecated")


def needs_update(function: str, what: str) -> str:
    """The failure message of a compat test: what changed, in which torch, which function to update."""
    return f"torch {torch.__version__} {what}: finetune/_torch_compat.py {function}() needs updating"


class Foreign:
    """A class no weights-only allowlist holds."""


# ------------------------------------------------------------------ helpers: torch.save archives, read as data
def saved_zip(obj: object) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


def unpickle_saved(archive: zipfile.ZipFile) -> object:
    """A ``torch.save`` zip's ``data.pkl`` through `weights_only_unpickler`, storages built as finetune's TorchScript
    reader builds them (`element_size`, `typed_storage`)."""

    class StorageUnpickler(compat.weights_only_unpickler()):
        def persistent_load(self, pid: tuple) -> torch.storage.TypedStorage:
            _, storage_type, key, _, numel = pid
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            data = bytearray(archive.read(f"archive/data/{key}")[:numel * compat.element_size(dtype)])
            return compat.typed_storage(torch.frombuffer(data, dtype=torch.uint8).untyped_storage(), dtype)

    return StorageUnpickler(io.BytesIO(archive.read("archive/data.pkl")), encoding="utf-8").load()


def refusal(data: bytes) -> pickle.UnpicklingError:
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(io.BytesIO(data), weights_only=True)
    return info.value


def saved_bytes(obj: object, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


# ------------------------------------------------------------------ one test per function of _torch_compat
def test_weights_only_unpickler_reads_plain_data_and_refuses_a_global() -> None:
    unpickler = compat.weights_only_unpickler()
    data = {"a": [1, 2.5, "x"], "b": (True, None)}
    assert unpickler(io.BytesIO(pickle.dumps(data, protocol=2)), encoding="utf-8").load() == data
    with pytest.raises(pickle.UnpicklingError, match="Foreign"):
        unpickler(io.BytesIO(pickle.dumps(Foreign(), protocol=2)), encoding="utf-8").load()
    tensor = torch.arange(6.0).reshape(2, 3)
    loaded = unpickle_saved(saved_zip({"w": tensor}))
    assert torch.equal(loaded["w"], tensor), needs_update("weights_only_unpickler", "reads storages differently")


def test_clear_sparse_tensor_checks_empties_the_list_torch_load_would_check() -> None:
    assert hasattr(torch._utils, "_sparse_tensors_to_validate"), needs_update(
        "clear_sparse_tensor_checks", "no longer has torch._utils._sparse_tensors_to_validate")
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (3,), check_invariants=True)
    loaded = unpickle_saved(saved_zip({"s": sparse}))
    assert torch.equal(loaded["s"].to_dense(), sparse.to_dense())
    assert torch._utils._sparse_tensors_to_validate, needs_update(
        "clear_sparse_tensor_checks", "no longer records unpickled sparse tensors in _sparse_tensors_to_validate")
    compat.clear_sparse_tensor_checks()
    assert torch._utils._sparse_tensors_to_validate == []


def test_typed_storage_holds_the_bytes_without_a_deprecation_warning() -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)
    raw = torch.frombuffer(bytearray(values.numpy().tobytes()), dtype=torch.uint8).untyped_storage()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TypedStorage warns that it is deprecated unless built _internal
        storage = compat.typed_storage(raw, torch.float64)
    assert storage.dtype == torch.float64 and storage.size() == 3
    assert storage.tolist() == values.tolist(), needs_update("typed_storage", "builds TypedStorage differently")


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                                   torch.complex128, torch.float8_e4m3fn])
def test_element_size_is_the_bytes_of_one_element(dtype: torch.dtype) -> None:
    assert hasattr(torch._utils, "_element_size"), needs_update("element_size", "no longer has torch._utils._element_size")
    assert compat.element_size(dtype) == torch.empty(0, dtype=dtype).element_size() == dtype.itemsize, needs_update(
        "element_size", f"counts {dtype} as {compat.element_size(dtype)} bytes")


def test_list_tag_functions_are_the_identities_old_torchscript_pickles_call() -> None:
    functions = compat.list_tag_functions()
    assert functions, needs_update("list_tag_functions", "has none of torch.jit._pickle." + ", ".join(compat.LIST_TAGS))
    unpickler = compat.weights_only_unpickler()
    for function in functions:
        assert function.__module__ == "torch.jit._pickle", needs_update("list_tag_functions", f"moved {function}")
        args = ([1, 2], "List[int]") if function.__name__ == "restore_type_tag" else ([1, 2],)
        tagged = (b"\x80\x02c" + f"torch.jit._pickle\n{function.__name__}\n".encode()  # GLOBAL, then REDUCE
                  + pickle.dumps(args, protocol=2)[2:-1] + b"R.")
        with pytest.raises(pickle.UnpicklingError):  # refused unless allowlisted, as finetune's reader does
            unpickler(io.BytesIO(tagged), encoding="utf-8").load()
        with torch.serialization.safe_globals(functions):
            assert unpickler(io.BytesIO(tagged), encoding="utf-8").load() == [1, 2], function.__name__


def test_is_weights_only_refusal_tells_a_refused_object_from_other_errors() -> None:
    refused = refusal(saved_bytes({"x": Foreign()}))
    assert compat.is_weights_only_refusal(refused), needs_update(
        "is_weights_only_refusal", f"refuses a global in other words: {str(refused)[:120]!r}")
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    with pytest.raises(Exception) as info:  # noqa: B017 - which exception is what the test checks
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert compat.is_weights_only_refusal(info.value), needs_update(
        "is_weights_only_refusal", f"refuses a TorchScript archive in other words: {str(info.value)[:120]!r}")
    assert not compat.is_weights_only_refusal(RuntimeError("PytorchStreamReader failed reading zip archive"))


def test_blocked_global_names_the_refused_global() -> None:
    name = f"{__name__}.Foreign"
    for how, err in (("torch.load(weights_only=True)", refusal(saved_bytes({"x": Foreign()}))),
                     ("the weights-only unpickler", _raw_refusal(pickle.dumps(Foreign(), protocol=2)))):
        assert compat.blocked_global(err) == name, needs_update("blocked_global", f"words {how}'s refusal as {err}")
    assert compat.blocked_global(RuntimeError("no global here")) is None


def _raw_refusal(data: bytes) -> pickle.UnpicklingError:
    with pytest.raises(pickle.UnpicklingError) as info:
        compat.weights_only_unpickler()(io.BytesIO(data), encoding="utf-8").load()
    return info.value


def _rewritten(data: bytes, rename: Callable[[str], str | None]) -> bytes:
    """A zip with each entry renamed (``None``: dropped)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            if (name := rename(info.filename)) is not None:
                zout.writestr(name, zin.read(info))
    return out.getvalue()


def _without_magic(legacy: bytes) -> bytes:
    """A legacy ``torch.save`` file whose first pickle (the magic number) is another number."""
    end = next(pos for op, _, pos in pickletools.genops(legacy) if op.name == "STOP") + 1
    return pickle.dumps(1, protocol=2) + legacy[end:]


def test_reports_damaged_file_recognises_torchs_words_for_a_malformed_file() -> None:
    zipped, legacy = saved_bytes({"w": torch.arange(64.0)}), saved_bytes({"w": torch.arange(64.0)}, legacy=True)
    cases = {
        "a zip without a storage record": _rewritten(zipped, lambda n: None if n.endswith("/data/0") else n),
        "a zip with a record outside its directory": _rewritten(zipped, lambda n: n.replace("archive/", "x/", 1)
                                                                if n.endswith("byteorder") else n),
        "a legacy file cut in its storage bytes": legacy[:-10],
        "a legacy file with a wrong magic number": _without_magic(legacy),
    }
    for case, data in cases.items():
        with pytest.raises(Exception) as info:  # noqa: B017 - which exception is what the test checks
            torch.load(io.BytesIO(data), weights_only=True)
        assert compat.reports_damaged_file(info.value), needs_update(
            "reports_damaged_file", f"says {type(info.value).__name__}: {str(info.value)[:120]!r} of {case}")
    assert not compat.reports_damaged_file(RuntimeError("CUDA out of memory"))
    assert not compat.reports_damaged_file(TypeError("PytorchStreamReader failed"))


def _worker_processes() -> set[multiprocessing.Process]:
    return set(multiprocessing.active_children())


def _persistent_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, num_workers=1, persistent_workers=True)


def test_kept_iterator_is_the_one_a_persistent_loader_reuses() -> None:
    loader = _persistent_loader()
    assert compat.kept_iterator(loader) is None
    list(loader)
    kept = compat.kept_iterator(loader)
    assert kept is not None, needs_update("kept_iterator", "keeps a persistent loader's iterator elsewhere than _iterator")
    list(loader)
    assert compat.kept_iterator(loader) is kept
    compat.shutdown_loader_workers(loader)


def test_keep_iterator_hands_a_wrapping_loaders_pass_to_shutdown() -> None:
    class Wrapper:  # a loader of our own around a DataLoader, as the shard loader is
        def __init__(self) -> None:
            self.loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, num_workers=1)
            compat.keep_iterator(self, None)

    wrapper, before = Wrapper(), _worker_processes()
    assert compat.kept_iterator(wrapper) is None
    iterator = iter(wrapper.loader)
    compat.keep_iterator(wrapper, iterator)
    next(iterator)
    workers = _worker_processes() - before
    assert compat.kept_iterator(wrapper) is iterator and workers and all(w.is_alive() for w in workers)
    compat.shutdown_loader_workers(wrapper)
    assert not any(w.is_alive() for w in workers) and compat.kept_iterator(wrapper) is None


def test_shutdown_loader_workers_stops_the_worker_processes() -> None:
    loader, before = _persistent_loader(), _worker_processes()
    list(loader)
    workers = _worker_processes() - before
    assert workers and all(w.is_alive() for w in workers)
    compat.shutdown_loader_workers(loader, keep=compat.kept_iterator(loader))  # keep: nothing to stop
    assert all(w.is_alive() for w in workers)
    compat.shutdown_loader_workers(loader)
    assert not any(w.is_alive() for w in workers), needs_update(
        "shutdown_loader_workers", "no longer stops workers with DataLoader._iterator._shutdown_workers()")
    assert compat.kept_iterator(loader) is None
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a later pass starts new workers
    compat.shutdown_loader_workers(loader)


def test_copy_state_dict_versions_carries_what_load_state_dict_reads() -> None:
    source = nn.BatchNorm1d(2).state_dict()
    assert getattr(source, "_metadata", None), needs_update("copy_state_dict_versions",
                                                            "no longer keeps versions in state_dict()._metadata")
    copied = OrderedDict((k, v) for k, v in source.items() if k != "num_batches_tracked")
    compat.copy_state_dict_versions(source, copied)
    # BatchNorm of version 2 has num_batches_tracked: without it the load is refused; with no versions
    # (the oldest layout) it is filled in.
    nn.BatchNorm1d(2).load_state_dict(OrderedDict(copied))
    try:
        nn.BatchNorm1d(2).load_state_dict(copied)
    except RuntimeError as err:
        assert "num_batches_tracked" in str(err), err
    else:
        pytest.fail(needs_update("copy_state_dict_versions", "load_state_dict ignores the versions in _metadata"))


def test_is_batch_norm_is_every_batch_norm_and_nothing_else() -> None:
    class Subclass(nn.BatchNorm2d):
        pass

    for module in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2),
                   nn.LazyBatchNorm2d(), Subclass(2)):
        assert compat.is_batch_norm(module), needs_update("is_batch_norm", f"has {type(module).__name__} outside "
                                                          "torch.nn.modules.batchnorm._BatchNorm")
    for module in (nn.InstanceNorm2d(2), nn.GroupNorm(1, 2), nn.LayerNorm(2), FrozenBatchNorm2d(2)):
        assert not compat.is_batch_norm(module), type(module).__name__


def test_module_state_loading_loads_what_a_parent_override_would_drop() -> None:
    calls = []

    class Recording(nn.Module):
        def _load_from_state_dict(self, *args, **kwargs) -> None:
            calls.append(args[1])  # the prefix
            super()._load_from_state_dict(*args, **kwargs)

    Recording().load_state_dict({})
    assert calls == [""], needs_update("ModuleStateLoading", "no longer calls nn.Module._load_from_state_dict")

    class Kept(compat.ModuleStateLoading, FrozenBatchNorm2d):
        def __init__(self) -> None:
            super().__init__(2)
            self.register_buffer("num_batches_tracked", torch.tensor(0))

    state = {**FrozenBatchNorm2d(2).state_dict(), "num_batches_tracked": torch.tensor(7)}
    kept = Kept()
    kept.load_state_dict(state)
    assert kept.num_batches_tracked.item() == 7


# ------------------------------------------------------------------ no private torch name outside _torch_compat
# Text of torch's errors that code may be tempted to match.
TORCH_ERROR_TEXT = ("Weights only load failed", "Unsupported global", "GLOBAL ", "PytorchStreamReader",
                    "inline_container", "Original Traceback")
# errors.message_of reads how a DataLoader re-raises a worker's error ("Original Traceback"), and cannot import
# _torch_compat: errors.py must import without torch (finetune.onnx_predict). tests/test_data_loading.py checks it.
ALLOWED = {("errors.py", "Original Traceback")}
HOOKS = ("getattr", "hasattr", "setattr", "delattr")
DOCUMENTED_KEYWORDS = {"_extra_files", "_use_new_zipfile_serialization"}  # torch.jit.save/load's, torch.save's


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("_")  # not dunders, not Hydra's _target_


def torch_private_members() -> set[str]:
    """The private attributes of the torch objects the package handles (modules, state dicts, loaders, ...)."""
    objects = (nn.Module(), nn.Linear(1, 1).state_dict(), DataLoader([0]), _MultiProcessingDataLoaderIter,
               torch.zeros(1), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), torch.UntypedStorage(1),
               torch.Generator())
    return {name for obj in objects for name in dir(obj) if _private(name)}


def _torch_names(tree: ast.Module) -> set[str]:
    """The names a module binds to torch or its parts (``torch``, ``nn``, ``DataLoader``...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "torch"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names |= {a.asname or a.name for a in node.names}
    return names


def _methods(tree: ast.Module) -> set[int]:
    return {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body if isinstance(f, ast.FunctionDef)}


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def _chain(node: ast.Attribute) -> tuple[str | None, list[str]]:
    """``torch.jit._pickle`` -> ``("torch", ["jit", "_pickle"])``; the root is None unless it is a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), attrs


def private_torch_uses(source: str, members: set[str], *, file: str = "") -> list[str]:
    """``line: what`` for each use of a private torch API in ``source`` (one module's text)."""
    tree = ast.parse(source)
    torch_names, methods, docstrings, uses = _torch_names(tree), _methods(tree), _docstrings(tree), {}
    for node in ast.walk(tree):
        found = None
        if isinstance(node, ast.Import):
            found = next((a.name for a in node.names if a.name.startswith("torch")
                          and any(map(_private, a.name.split(".")))), None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            private = [a.name for a in node.names if _private(a.name)]
            if private or any(map(_private, node.module.split("."))):
                found = f"from {node.module} import {', '.join(private or (a.name for a in node.names))}"
        elif isinstance(node, ast.Attribute):
            root, attrs = _chain(node)
            if node.attr in members or (root in torch_names and any(map(_private, attrs))):
                found = ".".join([root or "...", *attrs])
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in HOOKS and len(node.args) > 1 and isinstance(
                    node.args[1], ast.Constant) and node.args[1].value in members:
                found = f"{node.func.id}(..., {node.args[1].value!r})"
            found = found or next((f"{k.arg}=" for k in node.keywords
                                   if k.arg and _private(k.arg) and k.arg not in DOCUMENTED_KEYWORDS), None)
        elif isinstance(node, ast.FunctionDef) and id(node) in methods and node.name in members:
            found = f"def {node.name} (overrides a torch hook)"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found = next((f"torch's error text {t!r}" for t in TORCH_ERROR_TEXT
                          if t in node.value and (file, t) not in ALLOWED), None)
        if found:
            uses.setdefault(node.lineno, found)
    return [f"{line}: {found}" for line, found in sorted(uses.items())]


def test_no_module_but_torch_compat_uses_a_private_torch_api() -> None:
    members = torch_private_members()
    offenders = [f"finetune/{path.relative_to(PACKAGE)}:{use}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path != COMPAT
                 for use in private_torch_uses(path.read_text(), members, file=str(path.relative_to(PACKAGE)))]
    assert not offenders, ("private torch APIs outside finetune/_torch_compat.py: move each behind a documented "
                           "function there, tested in tests/test_torch_compat.py:\n" + "\n".join(offenders))


def test_the_scan_finds_each_kind_of_private_use() -> None:
    source = '''
import torch.jit._pickle
from torch._weights_only_unpickler import Unpickler
from torch.nn.modules.batchnorm import _BatchNorm
from torch import nn
torch._utils._element_size(torch.float32)
iterator = getattr(loader, "_iterator", None)
loader._iterator._shutdown_workers()
storage = torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)
class Frozen(nn.Module):
    def _load_from_state_dict(self, *args):
        nn.Module._load_from_state_dict(self, *args)
if "Weights only load failed" in str(err):
    pass
instantiate(cfg, _partial_=True)
'''
    uses = private_torch_uses(source, torch_private_members())
    assert [int(use.split(":")[0]) for use in uses] == [2, 3, 4, 6, 7, 8, 9, 11, 12, 13], uses
    assert private_torch_uses(COMPAT.read_text(), torch_private_members()), "the scan finds nothing in _torch_compat"


# ------------------------------------------------------------------ readers: damage is one line, the rest keeps its cause
def _raiser(err: BaseException) -> Callable[..., object]:
    def raise_it(*args: object, **kwargs: object) -> object:
        raise err
    return raise_it


def _script_archive(path: Path) -> Path:
    torch.jit.save(torch.jit.script(TinyNet().eval()), str(path))
    return path


def _saved(path: Path, obj: object | None = None) -> Path:
    torch.save(TinyNet().state_dict() if obj is None else obj, path)
    return path


def _safetensors(path: Path) -> Path:
    save_file(TinyNet().state_dict(), str(path))
    return path


# reader name -> (write a file, read it, where to plant the error, what the message says the file was read as)
READERS = {
    "torch.save zip": (_saved, read_state_dict, (torch, "load"), "checksums match"),
    "safetensors": (_safetensors, read_state_dict, ("finetune.weights.formats.safe_open", None), "fresh copy"),
    "TorchScript as data": (_script_archive, read_state_dict, ("finetune.weights.torchscript.element_size", None),
                            "checksums match"),
    "load_model, torch": (_saved, load_model, (torch, "load"), "checksums match"),
    "load_model, safetensors": (lambda p: _safetensors(p.with_suffix(".safetensors")), load_model,
                                ("finetune.checkpoint.weights_file.safe_open", None), "fresh copy"),
    "training state": (_saved, load_training_state, (torch, "load"), "checksums match"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_unexpected_error_in_a_reader_keeps_its_cause(tmp_path: Path, monkeypatch, reader: str) -> None:
    write, read, (target, attribute), says = READERS[reader]
    path = write(tmp_path / "w.pt")
    boom = TypeError("load() got an unexpected keyword argument 'mmap'")  # as if a torch release changed an API
    monkeypatch.setattr(target, *([attribute] if attribute else []), _raiser(boom))
    with pytest.raises(UserError) as info:
        read(path)
    message = str(info.value)
    assert info.value.__cause__ is boom, f"the cause is lost: {message}"
    assert "corrupt" not in message and "truncated" not in message, message
    assert "unexpected error" in message and "TypeError: load() got an unexpected keyword" in message, message
    assert "HYDRA_FULL_ERROR=1" in message and says in message and str(path) in message and "\n" not in message


def test_an_os_error_is_not_called_corrupt(tmp_path: Path, monkeypatch) -> None:
    path = _saved(tmp_path / "w.pt")
    denied = PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "load", _raiser(denied))
    with pytest.raises(UserError, match=r"could not be read \(PermissionError: .*Permission denied\): check the file "
                                        "and its permissions") as info:
        read_state_dict(path)
    assert info.value.__cause__ is denied and "corrupt" not in str(info.value)


def _entry_offset(data: bytes, suffix: str) -> int:
    """Where the data of a stored entry begins in a zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def _central_record(data: bytes, suffix: str) -> int:
    """Where an entry's central-directory record begins in a zip."""
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        name_length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46:start + 46 + name_length].decode().endswith(suffix):
            return start
        start += 4
    raise AssertionError(f"no entry {suffix}")


def test_a_flipped_bit_in_a_pickle_is_named_by_the_zips_checksum(tmp_path: Path) -> None:
    """The STOP of data.pkl flipped: torch's unpickler raises "Unsupported operand", which alone reads as an object
    safe loading blocks; the entry's CRC says what it is."""
    data = bytearray(saved_bytes(TinyNet().state_dict()))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        end = _entry_offset(bytes(data), "/data.pkl") + archive.getinfo("archive/data.pkl").file_size - 1
    data[end] ^= 0x80
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"\(BadZipFile: Bad CRC-32 for file 'archive/data.pkl'\): it is truncated or "
                                        "corrupt; save or download it again"):
        read_state_dict(tmp_path / "w.pt")


def test_a_zip_version_zipfile_cannot_read_is_one_line(tmp_path: Path) -> None:
    data = bytearray(saved_bytes(TinyNet().state_dict()))
    struct.pack_into("<H", data, _central_record(bytes(data), "/data.pkl") + 6, 128)  # version needed: 12.8
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"truncated or corrupt zip archive \(NotImplementedError: zip file version "
                                        r"12\.8\)"):
        read_state_dict(tmp_path / "w.pt")


@pytest.mark.parametrize("kind", ["torch.save", "TorchScript"])
def test_an_encrypted_entry_is_refused_before_anything_reads_it(tmp_path: Path, kind: str) -> None:
    path = _saved(tmp_path / "w.pt") if kind == "torch.save" else _script_archive(tmp_path / "w.pt")
    data = bytearray(path.read_bytes())
    flags = _central_record(bytes(data), "/data.pkl") + 8
    struct.pack_into("<H", data, flags, struct.unpack_from("<H", data, flags)[0] | 0x1)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"has an encrypted or patched entry '.*/data\.pkl', which torch never writes"):
        read_state_dict(path)


def test_a_legacy_file_cut_between_its_pickles_is_truncated(tmp_path: Path) -> None:
    """torch's unpickler raises IndexError on a pickle that ends at once; pickletools says why."""
    legacy = saved_bytes(TinyNet().state_dict(), legacy=True)
    second = [pos for op, _, pos in pickletools.genops(legacy) if op.name == "STOP"][0] + 1
    (tmp_path / "w.pt").write_bytes(legacy[:second + 1])  # the protocol pickle's PROTO opcode, without its argument
    with pytest.raises(UserError, match=r"could not be read \(IndexError: .*; pickletools: .*\): it is truncated or "
                                        "corrupt"):
        read_state_dict(tmp_path / "w.pt")


def test_a_torch_save_with_checksums_off_reads_and_fails_like_any(tmp_path: Path, monkeypatch) -> None:
    """A training state is saved without zip CRCs (each is 0): such entries are not checked, nor called damaged."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = _saved(tmp_path / "last.ckpt", {"format": "x", "model": TinyNet().state_dict()})
    finally:
        torch.serialization.set_crc32_options(crc)
    boom = RuntimeError("an error torch never raised before")
    monkeypatch.setattr(torch, "load", _raiser(boom))
    with pytest.raises(UserError, match="an unexpected error reading it .*if a fresh copy fails") as info:
        load_training_state(path)
    assert info.value.__cause__ is boom


def test_the_pickle_check_reads_no_more_than_the_pickles(tmp_path: Path) -> None:
    """`pickle_flaw` parses pickles as data: a pickle that would run code parses without running it."""
    from finetune.weights.formats import pickle_flaw

    marker = tmp_path / "pwned"
    payload = b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode()
    (tmp_path / "evil.pkl").write_bytes(payload + b"\x85R." + b"\x80\x02K\x01." * 4)  # a call, then 4 pickles of 1
    assert pickle_flaw(tmp_path / "evil.pkl") is None
    assert not marker.exists() and os.listdir(tmp_path) == ["evil.pkl"]
