"""Read the weights of a TorchScript archive as data, without loading its program.

A TorchScript archive (``torch.jit.save``) is a zip holding a program and its state:
``code/`` is TorchScript source that ``torch.jit.load`` compiles and runs (a module's
``__setstate__`` runs during the load itself), ``data.pkl`` pickles the module tree, and
``data/<key>`` holds the raw bytes of each storage. Loading the program is running code
from the file, so it needs ``trust_pickle``. The weights alone need no code: ``data.pkl``
is unpickled with torch's weights-only unpickler, each ``__torch__.*`` class replaced by an
inert stand-in that only holds attributes, storages built from the ``data/`` records. The
module classes' ``__parameters__``/``__buffers__`` lists are read from ``code/`` as text
(never compiled) so that the result has exactly the keys of ``torch.jit.load(f).state_dict()``,
in the same order.

Anything that is not plain data (a class that restores itself with its own
``__setstate__``, a ``torch.classes`` object, any other global) raises `NotPlainData`.

One module object may be the value of many attributes (the pickle's memo shares it for free;
``torch.jit.save`` itself writes each occurrence anew), and ``state_dict()`` names its tensors once
under each path. The names are counted per distinct module first (`measure_tree`), so a small
archive that shares submodules level after level is refused before any is enumerated.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune._torch_compat import (blocked_global, clear_sparse_tensor_checks, element_size, list_tag_functions,
                                    typed_storage, weights_only_unpickler)
from finetune.errors import UserError
from finetune.weights.limits import TooLarge, measure_tree

SCRIPT_PACKAGE = "__torch__"  # TorchScript's namespace for the classes an archive defines
CLASS_LINE = re.compile(r"^class (\w+)\(([\w.]*)\):")
MEMBERS_LINE = re.compile(r"^\s+(__parameters__|__buffers__) = \[(.*)\]\s*$")


class NotPlainData(Exception):
    """The archive's state is not plain tensors and containers: only running it would read it."""


class DamagedArchive(ValueError):
    """The archive contradicts itself (a storage record missing or too short): ``torch.jit.save`` never writes that."""


@dataclass
class _ClassInfo:
    """What ``code/`` says about one TorchScript class."""

    is_module: bool = False
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)


class _ScriptObject:
    """Stands in for an instance of a TorchScript class: it holds attributes, runs no code."""

    qualified_name = ""

    def __init__(self, *args: object) -> None:  # an enum value is pickled as a call: Format(value)
        self.__dict__["<args>"] = args

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise NotPlainData(f"'{type(self).qualified_name}' restores itself with its own __setstate__ code")
        self.__dict__.update(state)


def read_script_tensors(file: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """``torch.jit.load(file).state_dict()``, read as data: no code from the file is compiled or run.

    Args:
        file: The archive (for messages).
        archive: It, opened with `zipfile` (records are CRC-checked as they are read).

    Raises:
        NotPlainData: The state needs code or globals that weights-only loading blocks.
        UserError: The module tree would name more tensors than `finetune.weights.limits` allows, nests
            deeper, or contains itself (refused whether or not the file is trusted).
        DamagedArchive, zipfile.BadZipFile, zlib.error, UnicodeDecodeError: The archive is damaged.
    """
    prefix = archive.namelist()[0].split("/", 1)[0]
    pickled = _record(archive, f"{prefix}/data.pkl")
    stand_ins = {name: type(name.rpartition(".")[2], (_ScriptObject,), {"qualified_name": name})
                 for name in _script_globals(pickled)}
    allowed = [(cls, name) for name, cls in stand_ins.items()]
    allowed += list_tag_functions()
    unpickler = _StorageUnpickler(pickled, archive, prefix)
    try:
        with torch.serialization.safe_globals(allowed):
            root = unpickler.load()
    except pickle.UnpicklingError as err:  # a global or an operation weights-only loading blocks
        raise NotPlainData(_blocked(err)) from None
    finally:
        clear_sparse_tensor_checks()  # sparse tensors are refused below, never used
    classes = _class_infos(archive, prefix, set(stand_ins))
    if not isinstance(root, _ScriptObject) or not classes[type(root).qualified_name].is_module:
        raise NotPlainData(f"its data.pkl holds a {type(root).__name__}, not a TorchScript module")
    try:
        measure_tree(root, lambda node: _children(node, classes))
    except TooLarge as err:
        raise UserError(f"checkpoint '{file}' is a TorchScript archive whose module tree is refused: {err}; "
                        "torch.jit.save never writes that, so the file is forged or damaged: re-save "
                        "model.state_dict() with torch.save or safetensors") from err
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, classes, "", tensors)
    return tensors


class _StorageUnpickler(weights_only_unpickler()):
    """torch's weights-only unpickler; storages come from the archive's ``data/`` records."""

    def __init__(self, pickled: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(pickled), encoding="utf-8")
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(self, pid: object) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[2], str) and isinstance(pid[4], int)
                and pid[4] >= 0):
            raise DamagedArchive(f"unexpected storage reference {pid!r:.80} in data.pkl")
        _, storage_type, key, _location, numel = pid  # the location is ignored: everything lands on CPU
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, numel * element_size(dtype), dtype)
        return self.storages[key]

    def _read_storage(self, key: str, nbytes: int, dtype: torch.dtype) -> torch.storage.TypedStorage:
        """The bytes of record ``data/<key>`` (its size checked before it is read) as a storage."""
        info = _record_info(self.archive, f"{self.prefix}/data/{key}")
        if info.file_size < nbytes:
            raise DamagedArchive(f"record 'data/{key}' holds {info.file_size} bytes but data.pkl needs {nbytes}")
        data = bytearray(self.archive.read(info)[:nbytes])
        raw = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if nbytes else torch.UntypedStorage(0)
        return typed_storage(raw, dtype)


def _record_info(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(name)
    except KeyError as err:
        raise DamagedArchive(f"it has no record '{name}'") from err


def _record(archive: zipfile.ZipFile, name: str) -> bytes:
    return archive.read(_record_info(archive, name))


def _script_globals(pickled: bytes) -> set[str]:
    """The ``__torch__.*`` classes ``data.pkl`` names (read from its opcodes, nothing executed)."""
    names = set()
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            if module == SCRIPT_PACKAGE or module.startswith(f"{SCRIPT_PACKAGE}."):
                names.add(f"{module}.{name}")
    return names


def _class_infos(archive: zipfile.ZipFile, prefix: str, names: set[str]) -> dict[str, _ClassInfo]:
    """Parameters and buffers of each class, from its ``code/`` file read as text (never compiled)."""
    parsed: dict[str, dict[str, _ClassInfo]] = {}  # code file -> its classes; each file is read once
    infos = {}
    for qualified_name in names:
        module, _, name = qualified_name.rpartition(".")
        path = f"{prefix}/code/{module.replace('.', '/')}.py"
        if path not in parsed:
            try:
                parsed[path] = _parse_code(archive.read(path).decode("utf-8"))
            except KeyError:
                raise NotPlainData(f"it has no code/ file for the class '{qualified_name}'") from None
        infos[qualified_name] = parsed[path].get(name, _ClassInfo())
    return infos


def _parse_code(source: str) -> dict[str, _ClassInfo]:
    """``{class name: info}`` from the ``class X(Module):`` headers and ``__parameters__``/``__buffers__`` lines."""
    classes: dict[str, _ClassInfo] = {}
    current = None
    for line in source.splitlines():
        header = CLASS_LINE.match(line)
        if header:
            current = classes[header.group(1)] = _ClassInfo(is_module=header.group(2) == "Module")
            continue
        members = MEMBERS_LINE.match(line) if current is not None else None
        if members:
            setattr(current, members.group(1).strip("_"), re.findall(r'"([^"]*)"', members.group(2)))
    return classes


def _is_module(value: object, classes: dict[str, _ClassInfo]) -> bool:
    return isinstance(value, _ScriptObject) and classes[type(value).qualified_name].is_module


def _members(module: _ScriptObject, classes: dict[str, _ClassInfo]) -> tuple[list[tuple[str, object]],
                                                                            list[tuple[str, object]]]:
    """``(tensors, submodules)`` by name: parameters then buffers (those set), then submodules, in
    ``nn.Module.state_dict`` order."""
    info = classes[type(module).qualified_name]
    state = module.__dict__
    names = [n for n in state if n in info.parameters] + [n for n in state if n in info.buffers]
    return ([(n, state[n]) for n in names if state[n] is not None],
            [(n, value) for n, value in state.items() if _is_module(value, classes)])


def _children(node: object, classes: dict[str, _ClassInfo]) -> list[tuple[str, object]] | None:
    """What `measure_tree` walks: a module's tensors and submodules; None for anything else (a leaf)."""
    if not _is_module(node, classes):
        return None
    tensors, submodules = _members(node, classes)
    return tensors + submodules


def _collect(module: _ScriptObject, classes: dict[str, _ClassInfo], prefix: str,
             out: dict[str, torch.Tensor]) -> None:
    """The tensors of a measured module tree (its size and depth are bounded), recursively."""
    tensors, submodules = _members(module, classes)
    for name, value in tensors:
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.device.type != "cpu":
            raise NotPlainData(f"'{prefix}{name}' is not a dense CPU tensor")
        out[prefix + name] = value.detach()
    for name, value in submodules:
        _collect(value, classes, f"{prefix}{name}.", out)


def _blocked(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in a few words."""
    text = str(err).strip()
    name = blocked_global(err)
    if name:
        return f"it needs the pickled object '{name}'"
    return f"UnpicklingError: {text.splitlines()[0][:160]}" if text else "UnpicklingError"
