"""Hostile input, built in ``tmp_path`` and fed to every entry point that reads it.

Weights files (pickles that run code, TorchScript programs, truncated, bit-flipped and forged
archives, shard indexes that point out of their directory) go through `read_state_dict`,
`load_pretrained`, ``python -m finetune.ckpt inspect|diff|convert``, `finetune.load_model` and
``python -m finetune model.weights=FILE``. Each must end in one clear line (the CLIs: exit 2,
a single ``error:`` line, no traceback), run nothing from the file, read nothing outside the
index's directory and write nothing. Then the smaller hostile inputs: decompression-bomb
images, symlink loops in the data folder, invalid regexes.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from torch import nn

import finetune
from conftest import make_image_folder, run_cli, tiny_overrides
from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from conftest_weights import TinyNet
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
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
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


def test_load_model_runs_nothing_and_reads_nothing_outside(hostile) -> None:
    path, _, _ = hostile
    with pytest.raises(Exception):  # noqa: B017 - the fixture asserts nothing ran or changed
        finetune.load_model(path)


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
