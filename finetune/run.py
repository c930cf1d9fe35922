"""``run(cfg)``: one fine-tune, start to finish (`finetune.recipe.Recipe`), and ``find_lr(cfg)``: only its
learning-rate range test."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image

from finetune import distributed
from finetune.config import check_config
from finetune.files import atomic_write_stream, atomic_write_text
from finetune.recipe import Recipe
from finetune.rundir import check_run_dir, resolve_run_dir
from finetune.signals import graceful_stop


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, float]:
    """Fine-tune as ``cfg`` says, writing everything into ``run_dir`` (default: Hydra's output dir).

    Returns the final metrics (the last epoch's, plus ``best/value`` of the monitored metric).
    With ``cfg.resume`` set, continues from a training state (`finetune.resume.ResumePlan`): the
    pretrained load is skipped and everything is restored right before training.
    SIGTERM/SIGINT stop after the current step with ``last.ckpt`` saved (``TrainingInterrupted``).
    Started by torchrun (or srun), every process calls it: one data-parallel run (``finetune.distributed``),
    whose files rank 0 alone writes.
    """
    run_dir = resolve_run_dir(run_dir)
    check_run_dir(run_dir, output_subdir=None)  # before the first write: no link planted in it is followed
    with Recipe(run_dir, world=distributed.init()) as recipe, graceful_stop() as stop:
        recipe.setup(cfg, stop=stop)
        return recipe.train()


def find_lr(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Only the range test of ``optim.lr=auto`` (``python -m finetune.lr_find``), on the model as ``cfg``
    would train it; writes ``lr_find.json`` and ``lr_find.png`` into ``run_dir`` and returns the record."""
    from finetune.lr_find import draw_curve, from_record

    run_dir = resolve_run_dir(run_dir)
    check_run_dir(run_dir, output_subdir=None)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.optim.lr = "auto"
    check_config(cfg)
    record = Recipe(run_dir).search_lr(cfg)
    atomic_write_text(run_dir / "lr_find.json", json.dumps(record, indent=1) + "\n", root=run_dir)
    image = Image.fromarray(draw_curve(from_record(record)))
    atomic_write_stream(run_dir / "lr_find.png", lambda f: image.save(f, format="PNG"), root=run_dir)
    return record
