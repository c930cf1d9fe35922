"""Hostile input, built in ``tmp_path`` and fed to every entry point that reads it.

Weights files (pickles that run code, TorchScript programs, truncated, bit-flipped and forged
archives, shard indexes that point out of their directory) go through `read_state_dict`,
`load_pretrained`, ``python -m finetune.ckpt inspect|diff|convert``, `finetune.load_model` and
``python -m finetune model.weights=FILE``. Each must end in one clear line (the CLIs: exit 2,
a single ``error:`` line, no traceback), run nothing from the file, read nothing outside the
index's directory and write nothing. Small files that expand when walked (modules or dicts shared
level after level, a container that holds itself, stride-0 tensors) are fed to the same entry points
in a subprocess capped in time and address space (`run_bounded`): refused within seconds. Forged
metadata in weights and exported files (a resize to 448,000 pixels, 20 million classes, unknown head
settings) goes through `finetune.load_model`, ``python -m finetune.predict|evaluate`` and
``finetune.onnx_predict``. Then the smaller hostile inputs: decompression-bomb images, symlink
loops in the data folder, invalid regexes.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from torch import nn

import finetune
from conftest import REPO, make_image_folder, run_bounded, run_cli, tiny_overrides
from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from conftest_weights import (TinyNet, export_metadata, forge_weights_file, forged_script_archive, shared_dicts,
                              tiny_onnx, write_weights_file)
from finetune.ckpt import main as ckpt_main
from finetune.data import find_unreadable_images, load_rgb, scan_image_folder
from finetune.errors import UserError
from finetune.freezing import plan_freeze
from finetune.weights import load_pretrained, read_checkpoint, read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::DeprecationWarning")


# ------------------------------------------------------------------ hostile files
class Payload:
    """Unpickling this runs ``os.system``: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Stateful(nn.Module):
    """Restores itself with its own ``__setstate__``: TorchScript code that ``torch.jit.load`` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[1]


class Wrapped(nn.Module):
    """timm's ``test_resnet`` as ``model.*`` next to a `Stateful` part: loadable only when trusted."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model("test_resnet", num_classes=3)
        self.extra = Stateful()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@functools.cache
def script_bytes(kind: str) -> bytes:
    """A ``torch.jit.save`` archive: TinyNet (``plain``), timm's test_resnet scripted or traced,
    `Stateful`, or `Wrapped`."""
    import timm

    torch.manual_seed(0)
    if kind == "traced":
        module = torch.jit.trace(timm.create_model("test_resnet").eval(), torch.randn(1, 3, 32, 32))
    else:
        build = {"plain": TinyNet, "resnet": lambda: timm.create_model("test_resnet"), "stateful": Stateful,
                 "wrapped": Wrapped}[kind]
        module = torch.jit.script(build().eval())
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def rewrite_zip(src: bytes, dst: Path, replace: dict[str, bytes], *, compress: str | None = None) -> Path:
    """Copy a zip, replacing entries (by name suffix), deflating those ending in ``compress``."""
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith(k)), zin.read(info))
            deflate = compress is not None and info.filename.endswith(compress)
            zout.writestr(info.filename, data, zipfile.ZIP_DEFLATED if deflate else info.compress_type)
    return dst


def torch_zip_bytes(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().state_dict()


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def forged_safetensors(header: dict, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + b"\0" * 64


def claim_huge_size(data: bytes, name_suffix: bytes) -> bytes:
    """Make a stored entry's central-directory record claim 2 GiB (compressed and uncompressed)."""
    out = bytearray(data)
    start = 0
    while (start := out.find(b"PK\x01\x02", start)) >= 0:
        name_len = struct.unpack_from("<H", out, start + 28)[0]
        if bytes(out[start + 46:start + 46 + name_len]).endswith(name_suffix):
            struct.pack_into("<II", out, start + 20, 2**31 - 1, 2**31 - 1)
            return bytes(out)
        start += 4
    raise AssertionError("entry not found")


def write_index(directory: Path, weight_map: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def outside_weights(tmp_path: Path) -> Path:
    """Valid TinyNet weights outside the hostile file's directory: reading them would succeed."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    path = tmp_path / "outside" / "real.safetensors"
    path.write_bytes(safetensors_bytes(tiny_state()))
    return path


def _symlinked_index(tmp_path: Path, hostile: Path) -> Path:
    (hostile / "link.safetensors").symlink_to(outside_weights(tmp_path))
    return write_index(hostile, {k: "link.safetensors" for k in tiny_state()})


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# name -> (build(tmp_path, hostile_dir, marker) -> path, fragments the one error line must hold)
HOSTILE: dict[str, tuple[Callable[[Path, Path, Path], Path], tuple[str, ...]]] = {
    "pickle-zip": (lambda t, d, m: _write(d / "evil.pth", torch_zip_bytes({"state_dict": tiny_state(), "x": Payload(m)})),
                   ("'posix.system'", "safe loading blocks", "trust_pickle=true")),
    "pickle-legacy": (lambda t, d, m: _write(d / "evil.pth", torch_zip_bytes({"x": Payload(m)}, legacy=True)),
                      ("'posix.system'", "safe loading blocks")),
    "pickle-bare": (lambda t, d, m: _write(d / "evil.pkl", pickle.dumps({"w": Payload(m)}, protocol=2)),
                    ("safe loading blocks",)),
    "torchscript-payload": (lambda t, d, m: rewrite_zip(script_bytes("plain"), d / "evil.pt",
                                                        {"/data.pkl": pickle.dumps(Payload(m), protocol=2)}),
                            ("is a TorchScript program", "posix.system", "model.trust_pickle=true")),
    "torchscript-stateful": (lambda t, d, m: _write(d / "script.pt", script_bytes("stateful")),
                             ("is a TorchScript program", "__setstate__", "model.trust_pickle=true")),
    "truncated-zip": (lambda t, d, m: _write(d / "w.pth", _half(torch_zip_bytes(tiny_state()))),
                      ("truncated or corrupt", "BadZipFile")),
    "truncated-legacy": (lambda t, d, m: _write(d / "w.pth", _half(torch_zip_bytes(tiny_state(), legacy=True))),
                         ("truncated or corrupt",)),
    "truncated-safetensors": (lambda t, d, m: _write(d / "w.safetensors", _half(safetensors_bytes(tiny_state()))),
                              ("truncated or corrupt", "SafetensorError")),
    "truncated-torchscript": (lambda t, d, m: _write(d / "s.pt", _half(script_bytes("plain"))),
                              ("truncated or corrupt", "BadZipFile")),
    "truncated-index": (lambda t, d, m: _write(d / "model.safetensors.index.json", b'{"weight_map": {"a": "x.safet'),
                        ("broken JSON",)),
    "zip-deflate-bomb": (lambda t, d, m: rewrite_zip(torch_zip_bytes({"w": torch.zeros(2**22)}), d / "bomb.pt", {},
                                                     compress="/data/0"),
                         ("compressed entry", "16777216", "refused")),
    "zip-claims-huge-record": (lambda t, d, m: _write(d / "w.pt", claim_huge_size(torch_zip_bytes(tiny_state()), b"/data/0")),
                               ("truncated or corrupt", "claims 2147483647 bytes")),
    "zip-many-entries": (lambda t, d, m: _many_entries(d / "many.pt", 5000), ("not a torch.save checkpoint",)),
    "safetensors-huge-offsets": (lambda t, d, m: _write(d / "w.safetensors", forged_safetensors(
        {"w": {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 2**62]}})), ("truncated or corrupt",)),
    "safetensors-huge-header": (lambda t, d, m: _write(d / "w.safetensors", forged_safetensors({}, length=2**40)),
                                ("header claims 1099511627776 bytes",)),
    "index-dotdot": (lambda t, d, m: write_index(d, {"w": "../../etc/passwd"}),
                     ("'../../etc/passwd' outside", "model.safetensors.index.json", "entry 'w'")),
    "index-absolute": (lambda t, d, m: write_index(d, {"w": str(outside_weights(t))}),
                       ("outside", "refused", "entry 'w'")),
    "index-sibling": (lambda t, d, m: write_index(d, {k: "../outside/real.safetensors" for k in tiny_state()}),
                      ("'../outside/real.safetensors' outside", "refused")),
    "index-symlink-out": (lambda t, d, m: _symlinked_index(t, d), ("'link.safetensors', a link out of", "refused")),
    "index-not-a-string": (lambda t, d, m: write_index(d, {"w": ["a.safetensors"]}),
                           ("names a file as ['a.safetensors'], which is not a file name",)),
    "index-names-itself": (lambda t, d, m: write_index(d, {"w": "model.safetensors.index.json"}),
                           ("which is itself a shard index",)),
    "index-deeply-nested": (lambda t, d, m: _write(d / "i.json", b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                            ("broken JSON (RecursionError",)),
    "pickle-dict-holds-itself": (lambda t, d, m: _write(d / "w.pt", torch_zip_bytes({"state_dict": _holds_itself()})),
                                 ("is refused: a container inside it contains itself",)),
    "pickle-nested-too-deep": (lambda t, d, m: _write(d / "w.pt", _deeply_nested(1500)),
                               ("is refused: its containers nest more than 64 levels deep",)),
    "torchscript-module-holds-itself": (lambda t, d, m: forged_script_archive(d / "s.pt", depth=0, holds_itself=True),
                                        ("TorchScript archive whose module tree is refused", "contains itself")),
    "zip-overlapping-entries": (lambda t, d, m: _overlapping_entries(d / "w.pt"),
                                ("forged or corrupt zip archive", "they overlap")),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _holds_itself() -> dict:
    state: dict = {"w": torch.ones(2), "v": torch.ones(2)}
    state["self"] = state
    return state


def _deeply_nested(depth: int) -> bytes:
    """A ``torch.save`` of ``depth`` nested dicts (saving needs a higher recursion limit; loading does not)."""
    node: dict = {"w": torch.ones(1)}
    for _ in range(depth):
        node = {"a": node}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth * 3)
    try:
        return torch_zip_bytes(node)
    finally:
        sys.setrecursionlimit(limit)


def _overlapping_entries(path: Path) -> Path:
    """A ``torch.save`` zip whose record ``data/1`` is a second directory entry for ``data/0``'s bytes."""
    with zipfile.ZipFile(io.BytesIO(torch_zip_bytes({"a": torch.arange(4096.0), "b": torch.zeros(4096)}))) as zin, \
            zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/1"):
                zout.writestr(info, zin.read(info))
        first = next(i for i in zout.filelist if i.filename.endswith("/data/0"))
        twin = copy.copy(first)
        twin.filename = twin.orig_filename = first.filename[:-1] + "1"
        zout.filelist.append(twin)
        zout.NameToInfo[twin.filename] = twin
    return path


def _many_entries(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"archive/{i}", b"")
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (links not followed): content and mtime."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture(params=sorted(HOSTILE))
def hostile(request, tmp_path: Path) -> Iterator[tuple[Path, tuple[str, ...], Path]]:
    """``(file, expected fragments, marker)``; afterwards: no marker, nothing under tmp_path changed."""
    build, fragments = HOSTILE[request.param]
    (tmp_path / "sentinel.txt").write_text("untouched")  # next to the hostile file's directory
    marker = tmp_path / "pwned"
    (tmp_path / "hostile").mkdir()
    path = build(tmp_path, tmp_path / "hostile", marker)
    before = snapshot(tmp_path)
    yield path, fragments, marker
    assert not marker.exists(), "code from the file ran"
    assert snapshot(tmp_path) == before, "a file was written or changed"


def assert_one_line(message: str, fragments: tuple[str, ...]) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------ every entry point
def test_read_state_dict(hostile) -> None:
    path, fragments, _ = hostile
    with pytest.raises(UserError) as info:
        read_state_dict(path)
    assert_one_line(str(info.value), fragments)


def test_load_pretrained_leaves_the_model_untouched(hostile) -> None:
    path, fragments, _ = hostile
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_pretrained(model, path)
    assert_one_line(str(info.value), fragments)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("command", ["inspect", "diff", "convert"])
def test_ckpt_cli_in_process(hostile, command: str, tmp_path: Path, capsys) -> None:
    path, fragments, _ = hostile
    args = {"inspect": ["inspect", str(path)], "diff": ["diff", str(path), "--model", "test_resnet"],
            "convert": ["convert", str(path), str(tmp_path / "converted")]}[command]
    assert ckpt_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert_one_line(captured.err.strip(), fragments)


# name -> what finetune.load_model's one error line says (it reads only finetune's own weights files)
NOT_READ = "cannot be read as a finetune weights file"
LOAD_MODEL_SAYS = {
    **{name: (NOT_READ,) for name in HOSTILE},
    "pickle-zip": (NOT_READ, "UnpicklingError"), "pickle-legacy": (NOT_READ, "UnpicklingError"),
    "pickle-bare": (NOT_READ, "UnpicklingError"),
    "torchscript-payload": (NOT_READ, "TorchScript"), "torchscript-stateful": (NOT_READ, "TorchScript"),
    "torchscript-module-holds-itself": (NOT_READ, "TorchScript"),
    "truncated-safetensors": (NOT_READ, "SafetensorError"), "truncated-legacy": (NOT_READ, "EOFError"),
    "safetensors-huge-offsets": (NOT_READ, "SafetensorError"), "safetensors-huge-header": (NOT_READ, "header too large"),
    "truncated-zip": ("is a truncated or corrupt zip archive", "BadZipFile"),
    "truncated-torchscript": ("is a truncated or corrupt zip archive", "BadZipFile"),
    "zip-claims-huge-record": ("is a truncated or corrupt zip archive", "claims 2147483647 bytes"),
    "zip-deflate-bomb": ("compressed entry", "16777216", "refused"),
    "zip-overlapping-entries": ("forged or corrupt zip archive", "they overlap"),
    "pickle-dict-holds-itself": ("is not a finetune weights file or training state (no 'model' tensors)",),
    "pickle-nested-too-deep": ("is not a finetune weights file or training state (no 'model' tensors)",),
}


def test_load_model_runs_nothing_and_reads_nothing_outside(hostile, request) -> None:
    """One line naming the file and what is wrong with it (the fixture: nothing ran, nothing changed)."""
    path, _, _ = hostile
    with pytest.raises(UserError) as err:
        finetune.load_model(path)
    assert_one_line(str(err.value), (f"'{path}'", *LOAD_MODEL_SAYS[request.node.callspec.params["hostile"]]))


@pytest.mark.parametrize("name", ["pickle-zip", "truncated-safetensors", "torchscript-stateful"])
def test_load_model_errors_are_one_line(tmp_path: Path, name: str) -> None:
    path = HOSTILE[name][0](tmp_path, tmp_path, tmp_path / "pwned")
    with pytest.raises(UserError, match="cannot be read|is not a finetune") as err:
        finetune.load_model(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ TorchScript
@pytest.mark.parametrize("kind", ["plain", "resnet", "traced"])
def test_torchscript_weights_are_read_as_data_equal_to_jit_load(tmp_path: Path, monkeypatch, kind: str) -> None:
    """A plain TorchScript module needs no trust: its tensors are read without loading the program."""
    path = _write(tmp_path / "script.pt", script_bytes(kind))
    expected = torch.jit.load(str(path)).state_dict()
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran"))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "torchscript"
    assert list(ckpt.tensors) == list(expected)
    assert all(torch.equal(ckpt.tensors[k], v) and ckpt.tensors[k].dtype == v.dtype for k, v in expected.items())


def test_torchscript_that_needs_its_code_loads_only_when_trusted(tmp_path: Path) -> None:
    import timm

    path = _write(tmp_path / "wrapped.pt", script_bytes("wrapped"))
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match="TorchScript program .*__setstate__.*model.trust_pickle=true"):
        load_pretrained(model, path)
    with pytest.warns(UserWarning, match="trust_pickle=true: loading the TorchScript program"):
        report = load_pretrained(model, path, trust_pickle=True)
    expected = torch.jit.load(str(path)).state_dict()
    assert report.unexpected == ["[0] extra.weight"]
    assert all(torch.equal(v, expected[f"model.{k}"]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="trust_pickle"):
        assert torch.equal(read_state_dict(_write(tmp_path / "s.pt", script_bytes("stateful")), trust_pickle=True)["weight"],
                           torch.arange(4.0))


def test_torchscript_shard_in_an_index_is_refused_too(tmp_path: Path) -> None:
    _write(tmp_path / "part.bin", script_bytes("stateful"))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"weight": "part.bin"}}))
    with pytest.raises(UserError, match="'.*part.bin' is a TorchScript program"):
        read_state_dict(tmp_path)


# ------------------------------------------------------------------ small files that expand when walked
# Run only in a subprocess capped in time and address space: before the limits, each took minutes and
# gigabytes (2^40 names from 1.6 KB), which would take the test process down with it.
# name -> (build(dir) -> path, fragments each refusal holds)
EXPANDING: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "torchscript-shared-submodules": (lambda d: forged_script_archive(d / "shared.pt", depth=40),
                                      ("TorchScript archive whose module tree is refused",
                                       "it would name 1099511627776 tensors, 41 levels deep", "over the limit of 1000000")),
    "pickle-shared-dicts": (lambda d: _save(d / "w.pt", shared_dicts(40)),
                            ("is refused: it would name 1099511627776 tensors, 41 levels deep",)),
    "pickle-shared-dicts-legacy": (lambda d: _save(d / "w.pth", {"state_dict": shared_dicts(36), "epoch": 3}, legacy=True),
                                   ("is refused: it would name 68719476736 tensors, 37 levels deep",)),
    "pickle-shared-long-keys": (lambda d: _save(d / "w.pt", shared_dicts(12, key="k" * 2**18)),
                                ("is refused: its 4096 tensor names would take", "over the limit of 67108864")),
    "pickle-container-loop": (lambda d: _save(d / "w.pt", _container_loop()),
                              ("is refused: its containers ('state_dict.state_dict.state_dict...') nest more than 64",)),
    "tensor-stride-0": (lambda d: _save(d / "w.pt", {"w": torch.zeros(()).expand(2**40), "b": torch.zeros(3)}),
                        ("is refused: its tensors claim 4398046511116 bytes over 16 stored bytes",
                         "'w' claims 4398046511104 over a storage of 4")),
}

# Every in-process entry point on one file; prints a JSON line per entry: its error, or what it returned.
ENTRY_POINTS = """
import contextlib, io, json, sys, timm
import finetune
from finetune.ckpt import main as ckpt_main
from finetune.errors import UserError
from finetune.weights import load_pretrained, read_state_dict

path, out = sys.argv[1], sys.argv[2]

def ckpt(*args):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = ckpt_main(list(args))
    if status != 2 or not stderr.getvalue().startswith("error: "):
        return f"exit {status}: {stderr.getvalue()[-300:]}"
    raise UserError(stderr.getvalue().removeprefix("error: ").removesuffix("\\n"))

calls = {
    "read_state_dict": lambda: read_state_dict(path),
    "load_pretrained": lambda: load_pretrained(timm.create_model("test_resnet", num_classes=3), path),
    "ckpt inspect": lambda: ckpt("inspect", path),
    "ckpt diff": lambda: ckpt("diff", path, "--model", "test_resnet"),
    "ckpt convert": lambda: ckpt("convert", path, out),
    "load_model": lambda: finetune.load_model(path),
}
for entry, call in calls.items():
    try:
        print(json.dumps({"entry": entry, "returned": repr(call())[:300]}), flush=True)
    except UserError as err:
        print(json.dumps({"entry": entry, "error": str(err)}), flush=True)
"""


def _save(path: Path, obj: object, *, legacy: bool = False) -> Path:
    return _write(path, torch_zip_bytes(obj, legacy=legacy))


def _container_loop() -> dict:
    """``{"state_dict": itself}``: unwrapping it never ended."""
    state: dict = {"epoch": 3}
    state["state_dict"] = state
    return state


def assert_bounded(result: subprocess.CompletedProcess, started: float, limit: float = 60) -> None:
    """The subprocess ended by itself, without a traceback, well inside its caps."""
    assert result.returncode is not None, f"killed at its time limit: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < limit, f"took {time.monotonic() - started:.0f} s"


@pytest.mark.parametrize("name", sorted(EXPANDING))
def test_expanding_files_are_refused_in_seconds_by_every_entry_point(tmp_path: Path, name: str) -> None:
    """Each entry point refuses the file in one line, in a process capped at 120 s and 6 GiB of address space."""
    build, fragments = EXPANDING[name]
    path = build(tmp_path)
    assert path.stat().st_size < 2**20
    started = time.monotonic()
    result = run_bounded(["-c", ENTRY_POINTS, str(path), str(tmp_path / "converted")], cwd=tmp_path)
    assert_bounded(result, started)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = {o["entry"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert len(outcomes) == 6, result.stdout
    for entry, outcome in outcomes.items():
        assert "error" in outcome, (entry, outcome)
        if entry == "load_model":  # not a finetune weights file: refused before its tensors are looked at
            assert_one_line(outcome["error"], ())
        else:
            assert_one_line(outcome["error"], (str(path), *fragments))
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("name", ["torchscript-shared-submodules", "pickle-shared-dicts"])
def test_ckpt_inspect_cli_refuses_expanding_files_in_seconds(tmp_path: Path, name: str) -> None:
    build, fragments = EXPANDING[name]
    path = build(tmp_path)
    started = time.monotonic()
    result = run_bounded(["-m", "finetune.ckpt", "inspect", str(path)], cwd=tmp_path)
    assert_bounded(result, started)
    assert_clean_error(result, *fragments)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchscript-shared-submodules", "pickle-shared-dicts"])
def test_finetune_cli_refuses_expanding_weights_in_seconds(tmp_path: Path, name: str) -> None:
    build, fragments = EXPANDING[name]
    (tmp_path / "hostile").mkdir()
    path = build(tmp_path / "hostile")
    make_image_folder(tmp_path / "images", classes=3, train=2, val=1)
    started = time.monotonic()
    result = run_bounded(["-m", "finetune", *tiny_overrides(tmp_path / "images", epochs=1), f"model.weights={path}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert_bounded(result, started, limit=300)
    assert_clean_error(result, *fragments)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".safetensors", ".ckpt")]


def test_a_shard_named_many_ways_is_read_once(tmp_path: Path, monkeypatch) -> None:
    """An index naming one shard by many spellings (``w``, ``./w``, ``.//w``, ...) reads it once, not once each."""
    from finetune.weights import formats

    (tmp_path / "w.safetensors").write_bytes(safetensors_bytes(tiny_state()))
    spellings = ["w.safetensors", "./w.safetensors", ".//w.safetensors", "././w.safetensors"]
    write_index(tmp_path, {f"{k}#{i}" if i else k: name for i, name in enumerate(spellings) for k in tiny_state()})
    reads = []
    read_single = formats._read_single
    monkeypatch.setattr(formats, "_read_single", lambda file, *a, **k: reads.append(file) or read_single(file, *a, **k))
    with pytest.raises(UserError, match="lists tensor 'conv_stem.weight#1' .* that no shard holds"):
        read_state_dict(tmp_path)
    assert reads == [tmp_path / "w.safetensors"]


def test_a_submodule_shared_by_two_attributes_is_named_under_both(tmp_path: Path) -> None:
    """What ``torch.jit.load(f).state_dict()`` does with one module object under two names (which
    ``torch.jit.save`` never writes, but a pickle can): each path names its tensors."""
    path = forged_script_archive(tmp_path / "shared.pt", depth=2)
    tensors = read_state_dict(path)
    assert list(tensors) == ["a.a.weight", "a.b.weight", "b.a.weight", "b.b.weight"]
    assert all(torch.equal(t, torch.tensor([1.0, 2.0])) for t in tensors.values())


def test_the_limits_are_counted_exactly(tmp_path: Path, monkeypatch) -> None:
    """A file at the name limit is read; one name more is refused, naming both counts."""
    from finetune.weights import limits

    monkeypatch.setattr(limits, "MAX_NAMES", 8)
    _save(tmp_path / "eight.pt", shared_dicts(3))
    assert len(read_state_dict(tmp_path / "eight.pt")) == 8
    _save(tmp_path / "sixteen.pt", shared_dicts(4))
    with pytest.raises(UserError, match=r"it would name 16 tensors, 5 levels deep .*over the limit of 8;"):
        read_state_dict(tmp_path / "sixteen.pt")
    monkeypatch.setattr(limits, "MAX_DEPTH", 4)
    forged_script_archive(tmp_path / "deep.pt", depth=3)  # 4 levels of modules: at the limit
    assert len(read_state_dict(tmp_path / "deep.pt")) == 8
    forged_script_archive(tmp_path / "deeper.pt", depth=4)
    with pytest.raises(UserError, match="module tree is refused: its containers nest more than 4 levels deep"):
        read_state_dict(tmp_path / "deeper.pt")


# ------------------------------------------------------------------ forged metadata in weights files
# name -> (forge_weights_file arguments, fragments of the one-line refusal). Each file is a real weights
# file of test_resnet (3 classes, 32 px) with one thing changed.
FORGED_METADATA: dict[str, tuple[dict, tuple[str, ...]]] = {
    "crop-pct-tiny": ({"data_config": {"crop_pct": 0.0005}},
                      ("data_config.crop_pct is '0.0005', not a number in [0.5, 2.0]",)),
    "crop-pct-missing": ({"data_config": {"crop_pct": None}}, ("data_config.crop_pct is missing",)),
    "input-size-huge": ({"data_config": {"input_size": [3, 100_000, 100_000]}},
                        ("data_config.input_size (height, width) is '100000', not an integer in [1, 4096]",)),
    "input-size-channels": ({"data_config": {"input_size": [1, 32, 32]}},
                            ("data_config.input_size is '[1, 32, 32]', 1 channel(s) where in_chans is 3",)),
    "std-zero": ({"data_config": {"std": [0.5, 0.0, 0.5]}}, ("data_config.std holds '0.0', not a finite number above 0",)),
    "mean-nan": ({"data_config": {"mean": [0.5, float("nan"), 0.5]}}, ("data_config.mean holds 'nan'",)),
    "mean-short": ({"data_config": {"mean": [0.5]}}, ("data_config.mean is '[0.5]', not 3 numbers (one per channel)",)),
    "interpolation": ({"data_config": {"interpolation": "random"}},
                      ("data_config.interpolation is 'random', not one of nearest, bilinear, bicubic",)),
    "crop-mode": ({"data_config": {"crop_mode": "zoom"}}, ("data_config.crop_mode is 'zoom', not one of center",)),
    "num-classes-zero": ({"metadata": {"num_classes": "0"}}, ("num_classes is '0', not an integer in [1, 1000000]",)),
    "num-classes-not-an-integer": ({"metadata": {"num_classes": "3.5"}}, ("num_classes is '3.5', not an integer",)),
    "num-classes-differs": ({"metadata": {"num_classes": "5"}},
                            (("does not match the timm model 'test_resnet' with 5 classes its metadata describes: "
                              "it has 'fc.weight' of shape [3, 96] where the model has [5, 96]"),)),
    "class-names-too-many": ({"metadata": {"class_names": json.dumps(["a", "b", "c", "d"])}},
                             ("class_names lists 4 classes, more than the model's 3 outputs",)),
    "class-names-not-strings": ({"metadata": {"class_names": "[1, 2]"}},
                                ("class_names is '[1, 2]', not a list of strings",)),
    "head-unknown-setting": ({"head": {"evil": 1}}, ("head has the unknown setting 'evil'",)),
    "head-hidden-differs": ({"head": {"head": "mlp", "hidden": [64]}}, ("it has no tensor 'fc.0.weight'",)),
    "head-dropout": ({"head": {"dropout": 5}}, ("head.dropout is '5', not a number in [0.0, 1.0]",)),
    "model-unknown": ({"metadata": {"model_name": "resnet9000", "architecture": "resnet9000"}},
                      ("describes a model that cannot be built here (model.name 'resnet9000' is not a timm model",)),
    # A name that would make loading read a hub or a folder someone else chose: refused, nothing fetched.
    "model-hub-name": ({"metadata": {"model_name": "hf-hub:someone/x", "architecture": "hf-hub:someone/x"}},
                       ("the model to build is 'hf-hub:someone/x', a hub or folder name, not an architecture",)),
    "model-folder-name": ({"metadata": {"model_name": "local-dir:/etc", "architecture": None}},
                          ("the model to build is 'local-dir:/etc', a hub or folder name",)),
    "model-args": ({"metadata": {"model_args": json.dumps({"embed_dim": {"x": 1}})}},
                   ("model_args is", "not a mapping of at most 64 plain settings")),
    "model-source": ({"metadata": {"model_source": "keras"}}, ("model_source is 'keras', not one of timm, torchvision",)),
    "in-chans": ({"metadata": {"in_chans": "2"}}, ("in_chans is '2', not one of 1, 3, 4",)),
    "field-missing": ({"metadata": {"model_source": None}}, ("'model_source' is missing",)),
    "not-json": ({"metadata": {"data_config": "{"}}, ("'data_config' is not JSON (JSONDecodeError",)),
    "json-too-deep": ({"metadata": {"head": "[" * 100_000}}, ("'head' is not JSON (RecursionError",)),
    "epoch-negative": ({"metadata": {"epoch": "-1"}}, ("epoch is '-1', not an integer in [0, 1000000000]",)),
    "tensor-shape-differs": ({"tensors": {"fc.bias": torch.zeros(4)}},
                             ("it has 'fc.bias' of shape [4] where the model has [3]",)),
    "tensor-extra": ({"tensors": {"evil": torch.zeros(1)}}, ("it has the tensor 'evil', which the model has not",)),
    "tensor-missing": ({"tensors": {"fc.bias": None}}, ("it has no tensor 'fc.bias'",)),
}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory) -> dict[str, Path]:
    """A real weights file in each format (they load, and equal each other)."""
    root = tmp_path_factory.mktemp("weights")
    files = {"safetensors": write_weights_file(root / "w.safetensors"),
             "torch": write_weights_file(root / "w.pt", weights_format="torch")}
    models = [finetune.load_model(path)[0].state_dict() for path in files.values()]
    assert all(torch.equal(v, models[1][k]) for k, v in models[0].items())
    return files


@pytest.mark.parametrize("weights_format", ["safetensors", "torch"])
@pytest.mark.parametrize("case", sorted(FORGED_METADATA))
def test_load_model_refuses_forged_metadata_in_one_line(weights_files, tmp_path: Path, case: str,
                                                        weights_format: str) -> None:
    changes, fragments = FORGED_METADATA[case]
    src = weights_files[weights_format]
    path = forge_weights_file(src, tmp_path / f"forged{src.suffix}", **changes)
    with pytest.raises(UserError) as info:
        finetune.load_model(path)
    assert_one_line(str(info.value), (f"weights file '{path}'", "the file is damaged or", *fragments))


# Forged metadata that made load_model allocate gigabytes before the limits: run capped (see run_bounded).
# name -> (build(good weights files, dir) -> path, fragments)
COSTLY_METADATA: dict[str, tuple[Callable[[dict[str, Path], Path], Path], tuple[str, ...]]] = {
    "num-classes-20-million": (lambda w, d: forge_weights_file(w["safetensors"], d / "w.safetensors",
                                                               metadata={"num_classes": "20000000"}),
                               ("num_classes is '20000000', not an integer in [1, 1000000]",)),
    "head-hidden-huge": (lambda w, d: forge_weights_file(w["torch"], d / "w.pt", head={"head": "mlp", "hidden": [60_000, 60_000]}),
                         ("with 3 classes its metadata describes: it has no tensor 'fc.0.weight'",)),
    "views-claim-a-huge-head": (lambda w, d: _views_of_a_huge_head(w["torch"], d / "w.pt"),
                                ("is refused: its tensors claim", "stride-0 views",
                                 "'fc.weight' claims 384000000 over a storage of 4")),
}
LOAD_MODEL = """
import sys, finetune
from finetune.errors import UserError
try:
    finetune.load_model(sys.argv[1])
except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def _views_of_a_huge_head(src: Path, dst: Path) -> Path:
    """A .pt weights file of test_resnet with a million classes whose every tensor is one stored element,
    expanded (stride 0) to the model's shape: it matches the model its metadata describes."""
    from finetune.models import build_model

    with torch.device("meta"):
        model, _ = build_model(name="test_resnet", source="timm", num_classes=1_000_000, input_size=32)
    views = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}
    return forge_weights_file(src, dst, metadata={"num_classes": "1000000", "class_names": "[]"}, tensors=views)


@pytest.mark.parametrize("case", sorted(COSTLY_METADATA))
def test_load_model_refuses_costly_metadata_in_seconds(weights_files, tmp_path: Path, case: str) -> None:
    build, fragments = COSTLY_METADATA[case]
    path = build(weights_files, tmp_path)
    assert path.stat().st_size < 2 * weights_files["torch"].stat().st_size  # about test_resnet's 1.5 MB
    started = time.monotonic()
    result = run_bounded(["-c", LOAD_MODEL, str(path)], cwd=tmp_path)
    assert_bounded(result, started)
    assert_clean_error(result, f"'{path}'", *fragments)


def test_a_model_that_cannot_be_built_on_the_meta_device_is_checked_by_its_head(weights_files, tmp_path: Path,
                                                                                monkeypatch, caplog) -> None:
    """Range checks, and the head's rows against the file, when the meta build raises; a good file loads."""
    from finetune.checkpoint import weights_file

    build = weights_file.build_model

    def no_meta(**kwargs):
        if torch.get_default_device().type == "meta":
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return build(**kwargs)

    monkeypatch.setattr(weights_file, "build_model", no_meta)
    for path in weights_files.values():
        with caplog.at_level("DEBUG", logger=weights_file.log.name):
            _, meta = finetune.load_model(path)
        assert meta.num_classes == 3 and "cannot be built on the meta device (RuntimeError" in caplog.text
        forged = forge_weights_file(path, tmp_path / f"forged{path.suffix}", metadata={"num_classes": "5"})
        with pytest.raises(UserError, match=r"its classifier 'fc' has layers of \[3\] rows in the file, the "
                                            r"metadata says \[5\]; the file is damaged or forged"):
            finetune.load_model(forged)
    mlp = write_weights_file(tmp_path / "mlp.safetensors", head="mlp", hidden=(16, 8))
    assert finetune.load_model(mlp)[1].head["hidden"] == [16, 8]
    forged = forge_weights_file(mlp, tmp_path / "mlp-forged.safetensors", head={"hidden": [16, 60_000]})
    with pytest.raises(UserError, match=r"has layers of \[16, 8, 3\] rows in the file, the metadata says \[16, 60000, 3\]"):
        finetune.load_model(forged)


def test_the_bounds_admit_every_timm_pretrained_config() -> None:
    """Every data config timm ships passes `check_data_config`, and every class count the class check."""
    import timm

    from finetune.checkpoint.weights_file import check_classes, check_data_config

    for name in timm.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        config = {"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                  "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"], "crop_mode": cfg["crop_mode"]}
        check_data_config(config, channels=cfg["input_size"][0])
        for key in ("test_input_size", "fixed_input_size"):
            if isinstance(cfg.get(key), (list, tuple)):
                check_data_config({**config, "input_size": list(cfg[key])})
        check_classes([], num_classes=cfg.get("num_classes") or 1)


# ------------------------------------------------------------------ forged metadata in exported files
FORGED_EXPORTS: dict[str, tuple[dict, str]] = {
    "crop-pct-tiny": ({"data_config": {"crop_pct": 0.0005}}, "data_config.crop_pct is '0.0005', not a number in [0.5, 2.0]"),
    "input-size-huge": ({"data_config": {"input_size": [3, 32, 50_000]}},
                        "data_config.input_size (height, width) is '50000', not an integer in [1, 4096]"),
    "channels": ({"data_config": {"input_size": [5, 32, 32]}}, "data_config.input_size[0] (channels) is '5', not one of 1, 3, 4"),
    "std-negative": ({"data_config": {"std": [0.5, -1, 0.5]}}, "data_config.std holds '-1', not a finite number above 0"),
    "not-json": ({"data_config": "{"}, "'data_config' is not JSON (JSONDecodeError"),
    "class-names": ({"class_names": {"a": 1}}, "class_names is \"{'a': 1}\", not a list of strings"),
    "versions": ({"versions": [1]}, "versions is a list, not a mapping"),
}


@pytest.mark.parametrize("case", sorted(FORGED_EXPORTS))
def test_exported_metadata_is_checked_like_a_weights_files(tmp_path: Path, case: str) -> None:
    from finetune.inference import read_export_metadata

    changes, fragment = FORGED_EXPORTS[case]
    assert read_export_metadata(export_metadata(), path=tmp_path / "m.onnx")["data_config"]["crop_pct"] == 0.95
    with pytest.raises(UserError) as info:
        read_export_metadata(export_metadata(**changes), path=tmp_path / "m.onnx")
    assert_one_line(str(info.value), (f"'{tmp_path / 'm.onnx'}' is refused", fragment, "export it again"))


def test_an_onnx_file_with_fewer_outputs_than_class_names_is_refused(tmp_path: Path) -> None:
    from finetune.inference import read_export_metadata
    from finetune.inference import onnx_meta

    exported = read_export_metadata(export_metadata(), path=tmp_path / "m.onnx")
    assert onnx_meta(exported, outputs=5, path=tmp_path / "m.onnx").num_classes == 5
    for outputs, fragment in ((2, "class_names lists 3 classes, more than the model's 2 outputs"),
                              (0, "num_classes is '0', not an integer in [1, 1000000]")):
        with pytest.raises(UserError) as info:
            onnx_meta(exported, outputs=outputs, path=tmp_path / "m.onnx")
        assert_one_line(str(info.value), ("is refused", fragment))


def test_predict_onnx_script_has_finetunes_bounds() -> None:
    """finetune.onnx_predict keeps a torch-free copy of the data-config check: the same bounds as
    finetune's, and timm's interpolation names."""
    import importlib.util

    from timm.data.transforms import _str_to_pil_interpolation

    from finetune.checkpoint import weights_file as library

    spec = importlib.util.spec_from_file_location("predict_onnx", REPO / "finetune" / "onnx_predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name in ("CHANNELS", "MAX_SIDE", "CROP_PCT_RANGE", "CROP_MODES", "DATA_CONFIG_KEYS"):
        assert getattr(script, name) == getattr(library, name), name
    assert tuple(script.FILTERS) == library.INTERPOLATIONS == tuple(_str_to_pil_interpolation)


def test_predict_onnx_script_refuses_forged_metadata_in_seconds(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    model = tiny_onnx(tmp_path / "m.onnx", export_metadata(data_config={"crop_pct": 0.0005}))
    started = time.monotonic()
    result = run_bounded(["-m", "finetune.onnx_predict", str(model), str(image)], cwd=tmp_path)
    assert_bounded(result, started)
    assert_clean_error(result, f"'{model}' is refused", "data_config.crop_pct is '0.0005', not a number in [0.5, 2.0]")


@pytest.mark.slow
def test_predict_and_evaluate_refuse_forged_metadata_in_seconds(weights_files, tmp_path: Path) -> None:
    """``python -m finetune.predict`` on a weights file and an ONNX file asking for a resize to 448,000
    pixels, ``python -m finetune.evaluate`` on one claiming 20 million classes: one line each, in seconds."""
    images = make_image_folder(tmp_path / "images", classes=3, train=1, val=1)
    crop = forge_weights_file(weights_files["safetensors"], tmp_path / "crop.safetensors", data_config={"crop_pct": 0.0005})
    classes = forge_weights_file(weights_files["safetensors"], tmp_path / "classes.safetensors",
                                 metadata={"num_classes": "20000000"})
    onnx = tiny_onnx(tmp_path / "crop.onnx", export_metadata(data_config={"crop_pct": 0.0005}))
    quiet = ["progress_bar=false", "device=cpu"]
    runs = {
        crop: ["-m", "finetune.predict", f"ckpt={crop}", f"inputs={images / 'val'}", "num_workers=0", *quiet],
        onnx: ["-m", "finetune.predict", f"ckpt={onnx}", f"inputs={images / 'val'}", "num_workers=0", *quiet],
        classes: ["-m", "finetune.evaluate", f"ckpt={classes}", "data=custom", f"data.root={images}",
                  "data.num_workers=0", *quiet],
    }
    for path, args in runs.items():
        started = time.monotonic()
        result = run_bounded([*args, f"hydra.run.dir={tmp_path / path.stem}"], cwd=tmp_path)
        assert_bounded(result, started)
        fragment = "num_classes is '20000000'" if path == classes else "data_config.crop_pct is '0.0005'"
        assert_clean_error(result, f"'{path}'", "is refused", fragment)


# ------------------------------------------------------------------ bit flips
FORMATS = {
    "torch-zip": lambda: torch_zip_bytes({"state_dict": tiny_state(), "epoch": 3}),
    "torch-legacy": lambda: torch_zip_bytes({"state_dict": tiny_state()}, legacy=True),
    "safetensors": lambda: safetensors_bytes(tiny_state()),
    "torchscript": lambda: script_bytes("plain"),
    "index": lambda: json.dumps({"metadata": {}, "weight_map": {k: "model.safetensors" for k in tiny_state()}}).encode(),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_bit_flips_load_or_fail_in_one_line(tmp_path: Path, fmt: str) -> None:
    """A flipped bit anywhere: the file still loads (a flip inside tensor data) or fails with one clear line."""
    data = FORMATS[fmt]()
    name = "model.safetensors.index.json" if fmt == "index" else "w.bin"
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(tiny_state()))
    failures = 0
    for position in range(0, len(data), max(1, len(data) // 150)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        (tmp_path / name).write_bytes(flipped)
        try:
            read_state_dict(tmp_path / name)
        except UserError as err:
            failures += 1
            assert "\n" not in str(err) and str(tmp_path) in str(err), (position, str(err))
    assert failures > 0


# ------------------------------------------------------------------ the CLIs, in subprocesses
def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one ``error:`` line holding ``fragments``, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert_one_line(errors[0], fragments)


def run_ckpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.ckpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_ckpt_cli_subprocess(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "hostile").mkdir()
    evil = HOSTILE["pickle-zip"][0](tmp_path, tmp_path / "hostile", marker)
    script = HOSTILE["torchscript-stateful"][0](tmp_path, tmp_path / "hostile", marker)
    index = HOSTILE["index-symlink-out"][0](tmp_path, tmp_path / "hostile", marker)
    assert_clean_error(run_ckpt("inspect", str(evil), cwd=tmp_path), "'posix.system'", "--trust-pickle")
    assert_clean_error(run_ckpt("convert", str(script), str(tmp_path / "out"), cwd=tmp_path),
                       "TorchScript program", "--trust-pickle")
    assert_clean_error(run_ckpt("diff", str(index), "--model", "test_resnet", cwd=tmp_path), "a link out of")
    trusted = run_ckpt("inspect", str(script), "--trust-pickle", "--json", cwd=tmp_path)
    assert trusted.returncode == 0 and json.loads(trusted.stdout)["tensors"] == 1, trusted.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out").exists()


def finetune_cli(tmp_path: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    root = tmp_path / "images"
    if not root.exists():
        make_image_folder(root, classes=3, train=2, val=1)
    return run_cli([*tiny_overrides(root, epochs=1), f"model.weights={weights}", *extra], cwd=tmp_path, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pickle-zip", "torchscript-stateful", "index-sibling", "zip-deflate-bomb"])
def test_finetune_cli_refuses_hostile_weights(tmp_path: Path, name: str) -> None:
    (tmp_path / "hostile").mkdir()
    build, fragments = HOSTILE[name]
    path = build(tmp_path, tmp_path / "hostile", tmp_path / "pwned")
    result = finetune_cli(tmp_path, path, f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_finetune_cli_loads_torchscript_when_trusted(tmp_path: Path) -> None:
    path = _write(tmp_path / "wrapped.pt", script_bytes("wrapped"))
    result = finetune_cli(tmp_path, path, "model.trust_pickle=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert report["sources"][0]["format"] == "torchscript" and report["unexpected"] == ["[0] extra.weight"]


@pytest.mark.slow
def test_finetune_cli_invalid_allow_missing_regex(tmp_path: Path) -> None:
    path = _write(tmp_path / "w.pt", script_bytes("plain"))
    result = finetune_cli(tmp_path, path, "model.allow_missing=[\'[a\']")
    assert_clean_error(result, "model.allow_missing: '[a' is not a valid regular expression")


# ------------------------------------------------------------------ invalid regexes
def test_invalid_regex_is_a_user_error_naming_key_and_pattern(tmp_path: Path, capsys) -> None:
    torch.save(tiny_state(), tmp_path / "w.pt")
    for key, kwargs in (("model.allow_missing", {"allow_missing": ["[a"]}),
                        ("model.allow_mismatch", {"allow_mismatch": ["*.bias"]})):
        with pytest.raises(UserError) as info:
            load_pretrained(TinyNet(), tmp_path / "w.pt", **kwargs)
        pattern = next(iter(kwargs.values()))[0]
        assert str(info.value).startswith(f"{key}: '{pattern}' is not a valid regular expression (")
    assert ckpt_main(["diff", str(tmp_path / "w.pt"), "--model", "test_resnet", "--allow-missing", "(x"]) == 2
    assert "error: --allow-missing: '(x' is not a valid regular expression (missing )" in capsys.readouterr().err
    import timm

    model = timm.create_model("test_resnet")
    for key in ("include", "exclude"):
        with pytest.raises(UserError) as info:
            plan_freeze(model, mode="patterns", head="fc", include=["layer1"] if key == "exclude" else ["[a"],
                        exclude=["[a"] if key == "exclude" else [])
        assert str(info.value).startswith(f"freeze.{key}: '[a' is not a valid regular expression "
                                          "(unterminated character set at position 0)")


# ------------------------------------------------------------------ images and folders
def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header (CRC fixed) claims ``width`` x ``height`` pixels."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before ours raises
@pytest.mark.parametrize("side", [12_000, 100_000])  # over the limit; over twice it (PIL raises itself)
def test_decompression_bomb_is_reported_without_decoding(tmp_path: Path, monkeypatch, side: int) -> None:
    make_image_folder(tmp_path / "data", classes=2, train=2, val=1, split=False)
    bomb = bomb_png(tmp_path / "data" / "class_0" / "bomb.png", side, side)
    decode = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda image: pytest.fail("decoded") if image.size[0] >= side else decode(image))
    [(_, reason)] = find_unreadable_images([str(bomb)])
    assert reason.startswith("DecompressionBombError: ") and "pixels" in reason
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(str(bomb))
    with pytest.raises(UserError, match=r"1 unreadable image\(s\).*'class_0/bomb.png' \(DecompressionBombError"):
        scan_image_folder(tmp_path / "data", val_split=0.5)
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        split = scan_image_folder(tmp_path / "data", val_split=0.5, skip_bad_images=True)
    assert split.skipped == [str(bomb)]


def test_symlink_loops_in_the_data_folder_end_and_list_each_image_once(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=2, train=2, val=1, split=False)
    (root / "class_0" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "class_0" / "sub" / "deep.png")
    (root / "class_0" / "sub" / "up").symlink_to("..")        # a loop
    (root / "class_0" / "sub" / "up2").symlink_to("../sub")   # two links: 2^depth paths without the visited set
    (root / "class_1" / "again").symlink_to(root / "class_1")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the folder scan did not end"))
    signal.alarm(60)
    try:
        split = scan_image_folder(root, val_split=0.5, check_images=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    paths = [p for p, _ in split.train + split.val]
    assert len(paths) == 3 + 1 + 3 and len({os.path.realpath(p) for p in paths}) == len(paths)
