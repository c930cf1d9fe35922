"""What to save and when (``conf/checkpoint/``), and the names of the files it saves."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.checkpoint.weights_file import WEIGHTS_EXTENSIONS
from finetune.confine import confined
from finetune.errors import UserError
from finetune.metrics import infer_mode, is_better

STATE_FILE = re.compile(r"^epoch\d{3,}-step\d{6,}\.ckpt$")  # periodic training states

@dataclass(frozen=True)
class CheckpointPolicy:
    """What to save and when (``conf/checkpoint/``); see ``CheckpointManager``."""

    monitor: str = "val/acc1"
    mode: str | None = None  # max | min; inferred from ``monitor`` when None
    save_best: bool = True
    save_last: bool = True
    save_top_k: int = 0
    every_n_epochs: int = 1
    every_n_steps: int | None = None
    keep_last_k: int | None = 1
    weights_format: str = "safetensors"

    @property
    def resolved_mode(self) -> str:
        return self.mode or infer_mode(self.monitor)

    @property
    def ext(self) -> str:
        return WEIGHTS_EXTENSIONS[self.weights_format]

    def better(self, value: float, than: float | None) -> bool:
        return is_better(value, than, mode=self.resolved_mode)


def state_file_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:03d}-step{step:06d}.ckpt"


def top_k_file_name(epoch: int, metric: str, value: float, ext: str) -> str:
    return f"epoch{epoch:03d}-{re.sub(r'[^A-Za-z0-9_.]+', '_', metric)}-{value:.4f}{ext}"


def check_policy_state(saved: Any, *, directory: Path, named_in: Path) -> dict[str, Any]:
    """The checkpoint-policy state saved in a training state, checked before any name in it is used.

    Its top-k and best names are later read, linked and deleted in ``directory``: each must stay
    inside it (``confined``), and each top-k entry must carry its value, epoch and step.
    """
    if saved is None:
        return {}
    top_k = saved.get("top_k", []) if isinstance(saved, dict) else None
    if not isinstance(top_k, list):
        raise UserError(f"'{named_in}' holds a malformed checkpoint-policy state: refused")
    for entry in top_k:
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)) \
                or not all(isinstance(entry.get(k), int) for k in ("epoch", "step")):
            raise UserError(f"'{named_in}' holds a malformed top-k entry {entry!r:.200}: refused")
        confined(directory, entry.get("name"), named_in=named_in)
    if saved.get("best") is not None:
        confined(directory, saved["best"], named_in=named_in)
    return saved
