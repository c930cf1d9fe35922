"""Reading checkpoints: formats by content, safety, containers, bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from conftest_weights import TinyNet
from finetune.errors import UserError
from finetune.weights import read_checkpoint, read_state_dict


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in TinyNet().state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("saver", "fmt"),
    [
        (lambda sd, p: torch.save(sd, p), "torch-zip"),
        (lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False), "torch-legacy"),
        (lambda sd, p: save_file(sd, str(p)), "safetensors"),
    ],
)
@pytest.mark.parametrize("name", ["w.pth", "w.safetensors", "w.bin", "noext"])
def test_format_is_detected_by_content_not_name(tmp_path: Path, state, saver, fmt, name) -> None:
    path = tmp_path / name
    saver(state, path)
    ckpt = read_checkpoint(path)
    assert ckpt.format == fmt
    assert_same(ckpt.tensors, state)
    assert all(t.device.type == "cpu" for t in ckpt.tensors.values())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_gives_its_state_dict(tmp_path: Path) -> None:
    model = TinyNet().eval()
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt.format == "torchscript"
    assert_same(ckpt.tensors, model.state_dict())


def _shard(state: dict[str, torch.Tensor], directory: Path, index_name: str, saver) -> None:
    keys = list(state)
    names = [f"part-1-of-2{saver[1]}", f"part-2-of-2{saver[1]}"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, part in zip(names, halves):
        saver[0]({k: state[k] for k in part}, directory / name)
    weight_map = {k: names[i] for i, part in enumerate(halves) for k in part}
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


SAFE = (lambda sd, p: save_file(sd, str(p)), ".safetensors")
BIN = (lambda sd, p: torch.save(sd, p), ".bin")


@pytest.mark.parametrize(("index_name", "saver", "fmt"), [
    ("model.safetensors.index.json", SAFE, "sharded-safetensors"),
    ("pytorch_model.bin.index.json", BIN, "sharded-torch"),
])
def test_sharded_index_and_its_directory(tmp_path: Path, state, index_name, saver, fmt) -> None:
    _shard(state, tmp_path, index_name, saver)
    for path in (tmp_path / index_name, tmp_path):
        ckpt = read_checkpoint(path)
        assert ckpt.format == fmt
        assert_same(ckpt.tensors, state)


def test_index_naming_a_missing_shard_is_refused_before_loading(tmp_path: Path, state) -> None:
    _shard(state, tmp_path, "model.safetensors.index.json", SAFE)
    (tmp_path / "part-2-of-2.safetensors").unlink()
    with pytest.raises(UserError, match="missing shard.*'part-2-of-2.safetensors'"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "looks like a PNG image"),
        (b"hello, this is a text file\n", "looks like a text file starting 'hello, this '"),
        (b'{"a": 1}', "without a 'weight_map'"),
    ],
)
def test_non_checkpoint_files_get_one_clear_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as info:
        read_state_dict(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'.*nope\.pth' does not exist"):
        read_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("saver", [lambda sd, p: torch.save(sd, p), lambda sd, p: save_file(sd, str(p)),
                                   lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False)])
def test_truncated_files_are_reported_as_corrupt(tmp_path: Path, state, saver) -> None:
    path = tmp_path / "w.pt"
    saver(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)


class Payload:
    """Unpickling this runs ``os.system``: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_payload_does_not_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UserError, match="'posix.system'.*blocks.*trust_pickle=true"):
        read_state_dict(path)
    assert not marker.exists()


def test_bare_pickle_payload_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    with pytest.raises(UserError, match="blocks"):
        read_state_dict(path)
    assert not marker.exists()


def test_blocked_global_is_named_and_trust_pickle_warns(tmp_path: Path, state) -> None:
    import argparse

    path = tmp_path / "timm_style.pth.tar"
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": state}, path)
    with pytest.raises(UserError, match=r"needs the pickled object 'argparse.Namespace'.*--trust-pickle"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="trust_pickle=true"):
        ckpt = read_checkpoint(path, trust_pickle=True)
    assert_same(ckpt.tensors, state)
    assert ckpt.container == ["state_dict"] and ckpt.metadata["epoch"] == "3"


@pytest.mark.parametrize("container", [["state_dict"], ["model"], ["model_state_dict"], ["module"], ["net"], ["model", "state_dict"]])
def test_containers_are_unwrapped(tmp_path: Path, state, container: list[str]) -> None:
    obj: object = state
    for key in reversed(container):
        obj = {key: obj, "epoch": 1}
    torch.save(obj, tmp_path / "c.ckpt")
    ckpt = read_checkpoint(tmp_path / "c.ckpt")
    assert ckpt.container == container
    assert_same(ckpt.tensors, state)


def test_ema_weights_only_when_asked(tmp_path: Path, state) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema}, tmp_path / "ema.pth")
    assert_same(read_state_dict(tmp_path / "ema.pth"), state)
    assert_same(read_state_dict(tmp_path / "ema.pth", ema=True), ema)


def test_lightning_checkpoint_keeps_its_prefixes(tmp_path: Path, state) -> None:
    nested = {f"model.backbone.{k}": v for k, v in state.items()}
    torch.save({"epoch": 2, "global_step": 10, "state_dict": nested, "optimizer_states": [{"state": {}}]}, tmp_path / "l.ckpt")
    assert list(read_state_dict(tmp_path / "l.ckpt")) == list(nested)


def _rewrite_location(path: Path, old: str, new: str) -> None:
    """Make a legacy file claim its storages live on ``new`` (as if saved on a GPU)."""
    encode = lambda s: b"X" + len(s).to_bytes(4, "little") + s.encode()  # noqa: E731  BINUNICODE
    data = path.read_bytes()
    assert encode(old) in data
    path.write_bytes(data.replace(encode(old), encode(new)))


def test_file_saved_from_cuda_tensors_lands_on_cpu(tmp_path: Path, state) -> None:
    path = tmp_path / "cuda.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    _rewrite_location(path, "cpu", "cuda:0")
    tensors = read_state_dict(path)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert_same(tensors, state)
