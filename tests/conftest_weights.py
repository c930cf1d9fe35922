"""Helpers shared by the weights tests (imported explicitly; not a pytest conftest)."""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic random values, so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9 if tensor.ndim == 1 else torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def outputs(model: nn.Module, size: int = 64, channels: int = 3, seed: int = 1) -> torch.Tensor:
    """Eval-mode outputs on a fixed random batch."""
    images = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


class TinyNet(nn.Module):
    """A two-layer classifier: conv stem, BN, linear head (named like timm: classifier)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn1(self.conv_stem(x)).mean((2, 3)))


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models.

    On a busy 2-core machine, OpenMP threads spin-waiting on each other made a 32x32
    efficientnet_b0 forward take ~1 s instead of ~10 ms. Restored after the module.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ forged files (tests/test_hostile_weights.py)
def _pickled_string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _pickled_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _pickled_module(cls: str, entries: list[bytes], *, memo: int | None = None) -> bytes:
    """A TorchScript module as ``data.pkl`` pickles it: ``__torch__.cls()``, then its attributes as state.
    ``memo``: where the object is memoised before its state is read (so that the state can hold it)."""
    put = b"q" + bytes([memo]) if memo is not None else b""
    return _pickled_global("__torch__", cls) + b")\x81" + put + b"}(" + b"".join(entries) + b"ub"


def _pickled_tensor() -> bytes:
    """A float tensor of 2 elements over storage record ``data/0`` (``torch._utils._rebuild_tensor_v2``)."""
    storage = (b"(" + _pickled_string("storage") + _pickled_global("torch", "FloatStorage") + _pickled_string("0")
               + _pickled_string("cpu") + b"K\x02tQ")  # the persistent id of data/0, 2 elements
    return (_pickled_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"K\x00K\x02\x85K\x01\x85\x89"
            + _pickled_global("collections", "OrderedDict") + b")Rt" + b"R")


SCRIPT_CODE = b'''class Level(Module):
  __parameters__ = []
  __buffers__ = []
class Leaf(Module):
  __parameters__ = ["weight", ]
  __buffers__ = []
'''


def forged_script_archive(path: Path, *, depth: int, holds_itself: bool = False) -> Path:
    """A TorchScript archive whose ``data.pkl`` is written by hand (``torch.jit.save`` writes every module
    anew): ``depth`` levels of ``Level`` modules whose attributes ``a`` and ``b`` are one module object,
    above a ``Leaf`` with a 2-element ``weight``, so that ``state_dict()`` names 2^depth tensors; or,
    with ``holds_itself``, a ``Level`` whose ``a`` is itself."""
    if holds_itself:
        pickled = _pickled_module("Level", [_pickled_string("a"), b"h\x00", _pickled_string("training"), b"\x88"],
                                  memo=0)
    else:
        pickled = _pickled_module("Leaf", [_pickled_string("weight"), _pickled_tensor(), _pickled_string("training"),
                                           b"\x88"]) + b"q\x00"
        for level in range(1, depth + 1):  # a: the level below, written out; b: the same object, from the memo
            pickled = _pickled_module("Level", [_pickled_string("a"), pickled, _pickled_string("b"),
                                                b"h" + bytes([level - 1]), _pickled_string("training"), b"\x88"])
            pickled += b"q" + bytes([level])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + pickled + b".")
        archive.writestr("archive/code/__torch__.py", SCRIPT_CODE)
        archive.writestr("archive/data/0", struct.pack("<2f", 1.0, 2.0))
        archive.writestr("archive/constants.pkl", b"\x80\x02).")
        archive.writestr("archive/version", b"3\n")
    return path


def shared_dicts(depth: int, *, key: str = "") -> dict:
    """Nested dicts whose two entries at each level are one dict object: 2^depth names in a small pickle.
    ``key`` (the same string object at every level) is put before each level's names."""
    node: dict = {"w": torch.ones(2)}
    first, second = key + "a", key + "b"  # one string object each: the pickle holds each once
    for _ in range(depth):
        node = {first: node, second: node}
    return node


# ------------------------------------------------------------------ finetune weights files, and forged ones
def write_weights_file(path: Path, *, weights_format: str = "safetensors", head: str = "linear",
                       hidden: tuple[int, ...] = ()) -> Path:
    """A finetune weights file of timm's test_resnet with 3 classes at 32 px, as a run writes it."""
    from finetune.checkpoint import ModelDescription, save_weights
    from finetune.data.transforms import effective_data_config
    from finetune.models import build_model

    torch.manual_seed(0)
    model, spec = build_model(name="test_resnet", source="timm", num_classes=3, input_size=32, head=head,
                              hidden=hidden)
    description = ModelDescription(spec, class_names=["cat", "dog", "fox"], versions={"torch": torch.__version__},
                                   data_config=effective_data_config(spec.data_config, 32))
    save_weights(path, model, description.metadata(monitor="val/acc1", value=0.5, epoch=1), weights_format)
    return path


def read_weights_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a finetune weights file, ``.safetensors`` or ``.pt``."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata()), load_file(str(path))
    state = torch.load(path, weights_only=True)
    return dict(state["weights_metadata"]), dict(state["model"])


def forge_weights_file(src: Path, dst: Path, *, metadata: dict | None = None, data_config: dict | None = None,
                       head: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of a weights file (same format, by ``dst``'s suffix) with metadata fields, ``data_config``
    or ``head`` entries, and tensors replaced (a value of None removes the entry)."""
    meta, state = read_weights_file(src)
    for key, changes in (("data_config", data_config), ("head", head)):
        if changes:
            meta[key] = json.dumps({k: v for k, v in {**json.loads(meta[key]), **changes}.items() if v is not None})
    meta = {k: v for k, v in {**meta, **(metadata or {})}.items() if v is not None}
    state = {k: v for k, v in {**state, **(tensors or {})}.items() if v is not None}
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=meta)
    else:
        torch.save({"format": meta.get("format"), "model": state, "weights_metadata": meta}, dst)
    return dst


def tiny_onnx(path: Path, metadata: dict[str, str], *, classes: int = 3) -> Path:
    """An ONNX classifier of 32 px RGB images (global average pool, then a 3 -> ``classes`` matrix), carrying
    ``metadata`` as its ``metadata_props``, as ``python -m finetune.export format=onnx`` writes them."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(3 * classes, dtype=np.float32).reshape(3, classes), "weight")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weight"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def export_metadata(**changes: object) -> dict[str, str]:
    """An exported file's metadata for a 3-class 32 px RGB model, fields replaced by ``changes`` (JSON unless
    a string; ``data_config={...}`` replaces entries of the data config)."""
    data_config = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                   "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "center"}
    if isinstance(changes.get("data_config"), dict):
        changes["data_config"] = {**data_config, **changes["data_config"]}  # type: ignore[dict-item]
    props = {"format": "finetune.export/1", "model_name": "test_resnet", "class_names": json.dumps(["cat", "dog", "fox"]),
             "data_config": json.dumps(data_config), "versions": json.dumps({"torch": "2"}),
             "source_checkpoint": json.dumps({"name": "best.safetensors", "sha256": "0" * 64})}
    return {**props, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()}}
