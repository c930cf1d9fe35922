"""``logger=tensorboard`` (the default): event files in ``RUN_DIR/tb`` (`finetune.loggers.TensorBoardLogger`);
a resume purges the events an attempt that died logged after its last save."""

from __future__ import annotations

from typing import Any

from finetune.loggers import TensorBoardLogger
from finetune.trackers import TrackerContext


def make(settings: dict[str, Any], context: TrackerContext) -> TensorBoardLogger:
    return TensorBoardLogger(context.run_dir / "tb", purge_step=context.purge_step)
