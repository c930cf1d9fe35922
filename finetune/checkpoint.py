"""Checkpoint files: deployable weights, training state, and the manifest.

Every file is written atomically (temporary file in the same directory, fsync,
``os.replace``, fsync of the directory), so a kill during a save leaves the
previous file intact. ``manifest.json`` is updated only after the file it
describes is in place.

* ``*.safetensors``: the model's own ``state_dict()`` keys plus string metadata
  (architecture, classes, head, preprocessing) enough to rebuild it alone.
* ``last.ckpt``: the training state for resume; only tensors, dicts, lists and
  plain values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from finetune.errors import UserError
from finetune.metrics import EvalResult
from finetune.models import BackboneSpec, build_model
from finetune.trainer import TrainerHook, TrainState

WEIGHTS_FORMAT = "finetune.weights/1"
STATE_FORMAT = "finetune.train_state/1"
_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------ atomic I/O
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place durably."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------- weights
def weights_metadata(spec: BackboneSpec, *, class_names: list[str], versions: dict[str, str],
                     monitor: str | None = None, value: float | None = None,
                     epoch: int | None = None) -> dict[str, str]:
    """String metadata stored in every weights file: enough to rebuild model and preprocessing."""
    return {
        "format": WEIGHTS_FORMAT, "model_name": spec.name, "model_source": spec.source,
        "num_classes": str(spec.num_classes), "in_chans": str(spec.in_chans),
        "class_names": json.dumps(class_names), "head": json.dumps(spec.head),
        "classifier": spec.classifier, "first_conv": spec.first_conv,
        "data_config": json.dumps(spec.data_config), "monitor": json.dumps(monitor),
        "value": json.dumps(value), "epoch": json.dumps(epoch), "versions": json.dumps(versions),
    }


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the model's own state_dict (what safetensors needs)."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str]) -> None:
    tensors = portable_state_dict(model)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@dataclass
class ModelMeta:
    """What a weights file says about its model, parsed."""

    name: str
    source: str
    num_classes: int
    in_chans: int
    class_names: list[str]
    head: dict[str, Any]
    data_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # monitor, value, epoch, versions

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> ModelMeta:
        if meta.get("format") != WEIGHTS_FORMAT:
            raise UserError(f"'{path}' is not a finetune weights file (no '{WEIGHTS_FORMAT}' metadata): "
                            "to start from other weights use model.weights=PATH")
        data_config = json.loads(meta["data_config"])
        data_config["input_size"] = tuple(data_config["input_size"])
        return cls(name=meta["model_name"], source=meta["model_source"], num_classes=int(meta["num_classes"]),
                   in_chans=int(meta["in_chans"]), class_names=json.loads(meta["class_names"]),
                   head=json.loads(meta["head"]), data_config=data_config,
                   extra={k: json.loads(meta[k]) for k in ("monitor", "value", "epoch", "versions") if k in meta})


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a fine-tuned model from a ``.safetensors`` weights file or a ``last.ckpt``.

    Returns the model in eval mode and its metadata (class names, data config for preprocessing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = ModelMeta.from_metadata(f.metadata() or {}, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = ModelMeta.from_metadata(state.get("weights_metadata", {}), path)
        tensors = state["model"]
    input_size = meta.data_config["input_size"][-1]
    model, _ = build_model(name=meta.name, source=meta.source, num_classes=meta.num_classes,
                           in_chans=meta.in_chans, input_size=input_size, **meta.head)
    model.load_state_dict(tensors)  # strict: the file holds exactly this model's keys
    return model.to(device).eval(), meta


# -------------------------------------------------------------- training state
def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as plain values and tensors (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read ``last.ckpt`` safely; a corrupt or foreign file is a one-line error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UserError(f"training state '{path}' cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"'{path}' is not a finetune training state (last.ckpt)")
    return state


# -------------------------------------------------------------------- manifest
class Manifest:
    """``manifest.json``: sha256, size, epoch, step, metric of every checkpoint file; which is best."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {"files": {}, "best": None}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def record(self, name: str, *, epoch: int, step: int, metric: str, value: float | None) -> None:
        file = self.path.parent / name
        self.data["files"][name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size,
                                    "epoch": epoch, "step": step, "metric": metric, "value": value,
                                    "written": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def set_best(self, name: str) -> None:
        self.data["best"] = name

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


# ---------------------------------------------------------- checkpoint manager
class CheckpointManager(TrainerHook):
    """A ``TrainerHook`` that writes best/last weights and ``last.ckpt`` after every epoch."""

    def __init__(self, directory: str | Path, *, monitor: str, metadata: Callable[..., dict[str, str]],
                 weights_model: Callable[[], nn.Module], training_state: Callable[[TrainState], dict],
                 save_best: bool = True, save_last: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.monitor, self.save_best, self.save_last = monitor, save_best, save_last
        self.metadata, self.weights_model, self.training_state = metadata, weights_model, training_state
        self.manifest = Manifest(self.dir / "manifest.json")

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        value = (result.scalars() | logs).get(self.monitor)
        meta = self.metadata(monitor=self.monitor, value=value, epoch=state.epoch)
        written = []
        if self.save_best and improved:
            written.append(("best.safetensors", lambda p: save_weights(p, self.weights_model(), meta)))
        if self.save_last:
            written.append(("last.safetensors", lambda p: save_weights(p, self.weights_model(), meta)))
            written.append(("last.ckpt", lambda p: save_training_state(p, self.training_state(state))))
        for name, write in written:
            write(self.dir / name)
            self.manifest.record(name, epoch=state.epoch, step=state.global_step, metric=self.monitor,
                                 value=value)
            if name == "best.safetensors":
                self.manifest.set_best(name)
            self.manifest.save()

    def paths(self) -> dict[str, str]:
        return {name: str(self.dir / name) for name in self.manifest.data["files"]}
