"""What to save and when (``conf/checkpoint/``), and the names of the files it saves."""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.checkpoint.weights_file import WEIGHTS_EXTENSIONS
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
