"""``logger=wandb`` (``pip install 'finetune[wandb]'``): one W&B run per fine-tune, its local files in
``RUN_DIR/wandb``.

- The config is the run's config; metrics keep TensorBoard's names with the optimizer update as ``step``;
  images are ``wandb.Image``; the final and best metrics go into the run's summary.
- ``logger.wandb.mode`` (null: ``$WANDB_MODE``, else online): ``offline`` writes ``RUN_DIR/wandb`` only
  (``wandb sync`` uploads it later), ``disabled`` logs nothing.
- Resume continues the run whose id the training state keeps (``resume="allow"``): W&B keeps a run's
  steps increasing and ignores a step below its last one, so a step the attempt that died logged is not
  logged twice.
- Files: ``summary.json`` and ``load_report.json`` are saved with the run; ``best.<ext>`` is a ``model``
  artifact unless ``log_weights=false``. The run's exit code is 0 when it finished, 1 otherwise
  (W&B has no KILLED; ``finetune.status`` in its summary says which).
- The API key comes from ``WANDB_API_KEY`` or ``wandb login``, never from the config.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from finetune.trackers import TrackerContext

WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def make(settings: dict[str, Any], context: TrackerContext) -> WandbLogger:
    return WandbLogger(settings, context)


class WandbLogger:
    """A `finetune.loggers.Logger` logging into one W&B run (``run_id``)."""

    def __init__(self, settings: dict[str, Any], context: TrackerContext):
        import wandb

        self.wandb = wandb
        self.log_weights = bool(settings.get("log_weights", True))
        resumed = context.resume_ids.get("wandb")
        tags = list(settings.get("tags") or [])
        group = None
        if context.sweep is not None:  # a sweep's jobs are one W&B group
            group = Path(context.sweep["dir"]).name
            tags += [f"trial:{context.sweep['trial']}"] if context.sweep.get("trial") is not None else []
        dir_ = context.run_dir  # W&B adds wandb/ below it
        self.run = wandb.init(project=settings.get("project") or "finetune", entity=settings.get("entity"),
                              mode=settings.get("mode"), name=settings.get("run_name") or context.run_name,
                              tags=tags or None, group=group, dir=str(dir_), id=resumed,
                              resume="allow" if resumed else None, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.run_id = self.run.id

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def log_text(self, tag: str, text: str, *, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.run.summary.update({f"hparam/{k}": v for k, v in metrics.items()})

    def log_artifact(self, path: Path) -> None:
        if path.suffix in WEIGHTS_SUFFIXES:
            if self.log_weights:
                self.run.log_artifact(str(path), name=f"{self.run.id}-{path.stem}", type="model")
        else:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str = "FINISHED") -> None:
        self.run.summary["finetune.status"] = status
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
