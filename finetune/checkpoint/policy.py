"""What to save and when (``conf/checkpoint/``), and the names of the files it saves.

The decisions are pure functions of the run's progress and its monitored metric (`plan_epoch_end`,
`CheckpointPolicy.saves_state_at`): every process of a DDP run computes them alike, and the
`CheckpointManager` takes rank 0's. "Better" is one rule (`CheckpointPolicy.better`: by more than
``checkpoint.min_delta`` in the monitor's direction) for the best weights, the top-k files and
early stopping alike.
"""

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
    min_delta: float = 0.0  # a value is better than another only by more than this (best, top-k, early stopping)

    @property
    def resolved_mode(self) -> str:
        return self.mode or infer_mode(self.monitor)

    @property
    def ext(self) -> str:
        return WEIGHTS_EXTENSIONS[self.weights_format]

    def better(self, value: float, than: float | None) -> bool:
        """The one rule for "better": ``value`` beats ``than`` by more than ``min_delta`` (None: nothing to beat).

        >>> CheckpointPolicy(monitor="val/loss", min_delta=0.01).better(0.495, 0.5)
        False
        """
        return is_better(value, than, mode=self.resolved_mode, min_delta=self.min_delta)

    def saves_state_at(self, step: int, *, epoch_end: bool) -> bool:
        """Whether ``last.ckpt`` is written after optimizer update ``step`` (``every_n_steps``); not at an
        epoch's last update when the epoch's own save follows at once (``every_n_epochs=1``)."""
        n = self.every_n_steps
        return bool(self.save_last and n and step % n == 0 and not (epoch_end and self.every_n_epochs == 1))


@dataclass(frozen=True)
class EpochSaves:
    """What one epoch's end saves (`plan_epoch_end`): rank 0's decision, which every process follows."""

    best: bool = False  # best.<ext>: the monitored metric improved
    top_k_name: str | None = None  # the top-k file to write, or None
    top_k: tuple[dict[str, Any], ...] = ()  # the top-k list once it is written, best first
    displaced: tuple[str, ...] = ()  # top-k files that leave the list (deleted after the new one is written)
    last: bool = False  # last.<ext> and last.ckpt (every_n_epochs)


def plan_epoch_end(policy: CheckpointPolicy, *, epoch: int, step: int, value: float | None, improved: bool,
                   top_k: list[dict[str, Any]]) -> EpochSaves:
    """What the end of epoch ``epoch`` saves: best weights when ``improved`` (by `CheckpointPolicy.better`),
    a top-k file when ``value`` beats the worst of the ``save_top_k`` kept (same rule), ``last`` every
    ``every_n_epochs`` epochs.

    >>> plan = plan_epoch_end(CheckpointPolicy(save_top_k=1), epoch=2, step=8, value=0.9, improved=True,
    ...                       top_k=[{"name": "epoch001-val_acc1-0.5000.safetensors", "value": 0.5, "epoch": 1, "step": 4}])
    >>> plan.best, plan.top_k_name, plan.displaced, plan.last
    (True, 'epoch002-val_acc1-0.9000.safetensors', ('epoch001-val_acc1-0.5000.safetensors',), True)
    """
    saves = {"best": policy.save_best and improved, "last": policy.save_last and epoch % policy.every_n_epochs == 0}
    k = policy.save_top_k
    if not k or value is None or (len(top_k) >= k and not policy.better(value, top_k[-1]["value"])):
        return EpochSaves(**saves, top_k=tuple(top_k))
    name = top_k_file_name(epoch, policy.monitor, value, policy.ext)
    entries = [e for e in top_k if e["name"] != name] + [{"name": name, "value": value, "epoch": epoch, "step": step}]
    sign = -1.0 if policy.resolved_mode == "max" else 1.0
    entries.sort(key=lambda e: (sign * e["value"], e["epoch"]))
    return EpochSaves(**saves, top_k_name=name, top_k=tuple(entries[:k]),
                      displaced=tuple(e["name"] for e in entries[k:] if e["name"] != name))


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
