"""The training state (``last.ckpt``): every part a resume needs, as tensors, dicts, lists and
plain values only, so it loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune._torch_compat import copy_state_dict_versions
from finetune.files import FileFacts, atomic_write_stream
from finetune.errors import UserError
from finetune.trainer import TrainState
from finetune.weights.formats import explain_read_error, unexpected_read_error
from finetune.weights.limits import TooLarge, measure_tree

STATE_FORMAT = "finetune.train_state/1"

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
    if state["cuda"] and torch.cuda.is_available():  # saved on CPU, or resumed on fewer GPUs: as many as fit
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_training_state(path: str | Path, state: dict[str, Any]) -> FileFacts:
    """``torch.save`` the state atomically. The zip's own CRC32 is skipped: the manifest's digest,
    computed while writing, already covers every byte (and ``torch.load`` reads such files)."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        return atomic_write_stream(path, lambda f: torch.save(state, f))
    finally:
        torch.serialization.set_crc32_options(crc)


def load_training_state(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``last.ckpt`` safely; a corrupt or foreign file is a one-line error naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and storage errors have no common base class
        failure = explain_read_error(Path(path), err)
        if failure.kind == "unexpected":
            raise unexpected_read_error(f"training state '{path}' cannot be read", failure) from err
        raise UserError(f"training state '{path}' cannot be read ({failure.detail})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"'{path}' is not a finetune training state (last.ckpt)")
    try:  # a pickle is a graph: dicts shared between levels would expand when restored (optimizer state)
        measure_tree(state, _containers)
    except TooLarge as err:
        raise UserError(f"training state '{path}' is refused: {err}; it was not written by finetune") from err
    return state


def _containers(node: Any) -> list[tuple[str, Any]] | None:
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    return None



def detached_copy(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned to the CPU (a snapshot)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, detached_copy(v)) for k, v in obj.items())
        copy_state_dict_versions(obj, out)  # a module state_dict's per-module versions
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


@dataclass
class TrainingParts:
    """The stateful parts a training state saves and a resume restores, besides the loop's counters.

    Built before the trainer and the checkpoint manager, which both use them (never each other).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # a timm scheduler (``step_update``), or None
    grad_scaler: torch.amp.GradScaler | None = None
    ema: Any = None  # timm ModelEmaV3, or None
    freeze: Any = None  # the FreezeController of a freezing schedule, or None
    adapter: Any = None  # finetune.adapters.LoraAdapter (adapter=lora), or None

    def deploy_model(self) -> nn.Module:
        """The weights a weights file holds: the EMA's when EMA is on; with an adapter, a copy with it merged
        (plain layers and keys: the file loads without peft). The training state keeps the model unmerged."""
        model = self.ema.module if self.ema is not None else self.model
        return self.adapter.merged(model) if self.adapter is not None else model


@dataclass(frozen=True)
class RunFacts:
    """What a training state records about the run that wrote it (fixed for the run)."""

    config_yaml: str  # the resolved config: a resume compares its own against it
    versions: dict[str, str]
    seed: int
    batch_size: int | None
    lr_find: dict[str, Any] | None = None  # how optim.lr=auto chose the rate: a resume takes it, never searches
    world_size: int = 1  # data-parallel processes; batch_size is per process
    streams: int | None = None  # shards: streams per process (loader workers), which shape the epoch's order
    trackers: dict[str, str] = field(default_factory=dict)  # tracker -> its run id, which a resume continues


def training_state(parts: TrainingParts, progress: TrainState, *, run: RunFacts, policy: dict[str, Any],
                   weights_metadata: dict[str, str], rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything ``last.ckpt`` holds, read from the live parts (copy it before writing in the background).

    ``rngs``: every process's RNG state by rank (DDP); ``rng`` is rank 0's, as in a one-process run.
    """
    rngs = rngs or [rng_state()]
    optional = {"scheduler": parts.scheduler, "grad_scaler": parts.grad_scaler, "ema": parts.ema,
                "freeze": parts.freeze}
    return {"format": STATE_FORMAT, "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            **{name: part.state_dict() if part is not None else None for name, part in optional.items()},
            "train_state": progress.to_dict(), "rng": rngs[0], "rng_per_rank": rngs,
            "data_order": {"seed": run.seed, "epoch": progress.epoch, "batches_seen": progress.batches_seen,
                           "batch_size": run.batch_size, "world_size": run.world_size, "streams": run.streams},
            "checkpoint_policy": policy, "config_yaml": run.config_yaml, "versions": run.versions,
            "weights_metadata": weights_metadata, "lr_find": run.lr_find, "trackers": dict(run.trackers)}
