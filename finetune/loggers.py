"""Where metrics go: the `Logger` Protocol (TensorBoard is one implementation), the hook that feeds it
the run's events (`LogEvents`), and ``metrics.jsonl``.

A tracker is one small class with the `Logger` methods (scalars, images, text, the run's config and
final hparams, artifacts); `LogEvents` turns what the trainer does into those calls, the same for
every tracker: per-step ``train/loss`` and ``lr/<group>``, per-epoch ``val/*``, per-class accuracy
and the confusion matrix, the LR finder's curve. `Loggers` sends each call to several.
Tags are ``split/metric``. The confusion matrix is drawn with PIL (no plotting library needed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter

from finetune.files import atomic_write_text, open_append
from finetune.metrics import EvalResult
from finetune.trainer import TrainerHook, TrainState

log = logging.getLogger("finetune")


class Logger(Protocol):
    """What a tracker (TensorBoard, CSV, MLflow, W&B) receives from a run (`finetune.trackers`)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's resolved config (nested), once at the start."""

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        """Values at optimizer update ``step`` (``train/loss``, ``lr/<group>``, ``val/acc1``, ...)."""

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        """An RGB image, (H, W, 3) uint8."""

    def log_text(self, tag: str, text: str, *, step: int) -> None: ...

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings next to its final and best metrics, once at the end."""

    def log_artifact(self, path: Path) -> None:
        """A file the run wrote (best weights, summary.json, load_report.json)."""

    def close(self, status: str = "FINISHED") -> None:
        """The run ended: ``FINISHED``, ``FAILED`` or ``KILLED`` (interrupted)."""


RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class Loggers:
    """Several trackers as one, by name: each call goes to every one of them, in order.

    A tracker that fails (a server down, a disk full) never stops the run: its first failure is one
    warning line, and its events from then on are dropped and counted (`dropped`, in ``summary.json``).
    Dropped, not queued: a tracker that came back would get a curve with a hole, which is no better than
    a count, and a queue of a long run's events would grow without bound.
    """

    def __init__(self, loggers: dict[str, Logger]):
        self.loggers = dict(loggers)
        self.failed: dict[str, str] = {}  # tracker -> its first error
        self.dropped: dict[str, int] = {}  # tracker -> events not delivered

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for name, logger in self.loggers.items():
            if name in self.failed:
                self.dropped[name] += 1
                continue
            try:
                getattr(logger, method)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any tracker error: the run goes on without it
                self.failed[name], self.dropped[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300], 1
                log.warning(f"logger {name}: {self.failed[name]}; training continues, its events from here on "
                            "are dropped (counted in summary.json)")

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        self._each("log_scalars", scalars, step=step)

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        self._each("log_image", tag, image, step=step)

    def log_text(self, tag: str, text: str, *, step: int) -> None:
        self._each("log_text", tag, text, step=step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self._each("log_hparams", hparams, metrics)

    def log_artifact(self, path: Path) -> None:
        if path.is_file():
            self._each("log_artifact", path)

    def resume_ids(self) -> dict[str, str]:
        """Each tracker's run id that a resume continues (kept in the training state)."""
        ids = {name: getattr(logger, "run_id", None) for name, logger in self.loggers.items()}
        return {name: run_id for name, run_id in ids.items() if run_id is not None}

    def report(self) -> dict[str, Any]:
        """What failed and how many events each failed tracker lost (``summary.json``'s ``trackers``)."""
        return {name: {"error": error, "dropped_events": self.dropped[name]} for name, error in self.failed.items()}

    def close(self, status: str = "FINISHED") -> None:
        """End every tracker's run with ``status`` (a failed one's end is one more dropped event)."""
        self._each("close", status)


def trials_table(trials: dict[str, Any]) -> str:
    """``optim.lr=auto``'s trial fine-tunes as a markdown table: each rung's candidates and held-out losses."""
    rows = ["| rung | updates | rate | freeze | held-out loss | kept |", "|---|---:|---:|---|---:|---|"]
    for i, rung in enumerate(trials["rungs"]):
        for candidate, loss in rung["scores"]:
            rate, freeze = candidate if isinstance(candidate, list) else (candidate, "as configured")
            shown = f"{loss:.4f}" if loss is not None else "diverged"
            kept = "yes" if candidate in rung["kept"] else ""
            label = (f"final ({rung['folds']} slices, mean)" if rung.get("folds") else "final") if rung.get("final") \
                else f"{i + 1}"
            rows.append(f"| {label} | {rung['updates']} | {rate:.3g} | {freeze} | {shown} | {kept} |")
    return "\n".join(rows)


class LogEvents(TrainerHook):
    """The trainer's events as `Logger` calls: per-step ``train/loss`` and ``lr/*`` (every
    ``log_every_n_steps``), per-epoch ``val/*``, ``train/epoch_loss``, ``epoch``, ``val_class/<name>`` and
    the confusion matrix image; `log_lr_find` for ``optim.lr=auto``'s curve."""

    def __init__(self, logger: Logger, *, class_names: list[str], log_every_n_steps: int = 1,
                 replay: tuple[int, dict[str, float]] | None = None):
        """``replay``: (step, logs) of an update a resume logs again (its events were purged)."""
        self.logger, self.class_names, self.every = logger, class_names, log_every_n_steps
        if replay is not None:
            self._log_step(*replay)

    def on_step(self, state: TrainState, logs: dict[str, float]) -> None:
        self._log_step(state.global_step, logs)

    def _log_step(self, step: int, logs: dict[str, float]) -> None:
        if step % self.every == 0:
            self.logger.log_scalars(logs, step=step)

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        per_class = {f"val_class/{name}": value for name, value in zip(self.class_names, result.per_class)}
        self.logger.log_scalars({**result.scalars(), "train/epoch_loss": logs["train/loss"], "epoch": state.epoch,
                                 **per_class}, step=state.global_step)
        if result.confusion is not None:  # multi-label results have none
            self.logger.log_image("val/confusion_matrix", render_confusion(result.confusion, self.class_names),
                                  step=state.global_step)

    def log_lr_find(self, record: dict[str, Any]) -> None:
        """``optim.lr=auto``'s range test: the curve with the chosen point (image) and the choice (text), at step 0."""
        from finetune.lr_find import draw_curve, from_record

        self.logger.log_image("lr_find/curve", draw_curve(from_record(record)), step=0)
        freeze = f", freeze={record['freeze']}" if record.get("freeze") else ""
        choice = record.get("choice", record["reason"])
        self.logger.log_text("lr_find/choice", f"lr {record['lr']:.4g}{freeze}: {choice}", step=0)
        if record.get("trials", {}).get("rungs"):
            self.logger.log_text("lr_find/trials", trials_table(record["trials"]), step=0)

    def close(self, status: str = "FINISHED") -> None:
        self.logger.close(status)


class TensorBoardLogger:
    """A `Logger` writing TensorBoard event files into ``log_dir``."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        """``purge_step``: TensorBoard hides this directory's events from that step on (a resume)."""
        wait_for_a_later_second(Path(log_dir))
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # the settings that matter go to the HPARAMS tab at the end (log_hparams)

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def log_text(self, tag: str, text: str, *, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings next to its best metric (TensorBoard's HPARAMS tab)."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def log_artifact(self, path: Path) -> None:
        pass  # the files are in the run dir beside the event files

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def wait_for_a_later_second(log_dir: Path) -> None:
    """Let a new event file sort after the ones already in ``log_dir``.

    TensorBoard reads a directory's files in name order, and purges by the order it reads
    them. A name is ``events.out.tfevents.<second>.<host>.<pid>.<counter>``: within one second
    and one process the counter decides, and it sorts "10" before "9". So a writer opened in
    the same second as an existing file first waits for the next second (at most one).
    """
    seconds = [int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*")
               if p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


class MetricsJsonl(TrainerHook):
    """``metrics.jsonl``: one JSON object per epoch, appended and flushed at once; ``last`` is the newest.

    ``path=None`` keeps ``last`` only (a DDP process other than rank 0).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.last: dict[str, Any] = {}

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        record = {"epoch": state.epoch, "step": state.global_step, "train/loss": logs["train/loss"],
                  **result.scalars(), f"val/per_class_{result.per_class_name}": result.per_class,
                  "lr": {k.removeprefix("lr/"): v for k, v in logs.items() if k.startswith("lr/")},
                  "seconds": logs["seconds"], "best": improved}
        if self.path is not None:
            with open_append(self.path) as f:  # never through a link planted at its name
                f.write(json.dumps(record) + "\n")
        self.last = record

    def rewind(self, *, epochs_done: int) -> None:
        """Drop the records of epochs after ``epochs_done`` (a resume runs them again); ``last`` is the
        newest record kept.

        Keyed on the epoch, not the step: a step checkpoint taken on an epoch's last update has that
        epoch's final step but not its evaluation, so its record is written again on resume.
        A line that is not an epoch's record (a damaged file, or someone else's) is dropped with a warning.
        """
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text(errors="replace").splitlines()
        records = [_epoch_record(line) for line in lines]
        kept = [(line, r) for line, r in zip(lines, records) if r is not None and r["epoch"] <= epochs_done]
        if None in records:
            log.warning(f"'{self.path}': {records.count(None)} lines are not epoch records (damaged?): dropped")
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line, _ in kept))
        self.last = kept[-1][1] if kept else {}


def _epoch_record(line: str) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` line as its record, or None when it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return record if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def render_confusion(confusion: torch.Tensor, class_names: list[str], cell: int = 28) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB image: rows true class, columns predicted."""
    n = confusion.shape[0]
    class_names = list(class_names) + [f"#{i}" for i in range(len(class_names), n)]  # model.num_classes > data's
    rates = (confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    label_w = min(max((len(c) for c in class_names), default=4) * 6 + 8, 140)
    image = Image.new("RGB", (label_w + n * cell + 4, label_w + n * cell + 4), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        draw.text((2, label_w + i * cell + cell // 3), class_names[i][:22], fill="black")
        draw.text((label_w + i * cell + 2, label_w - 12), class_names[i][:4], fill="black")
        for j in range(n):
            shade = int(255 * (1.0 - rates[i, j]))
            box = (label_w + j * cell, label_w + i * cell, label_w + (j + 1) * cell - 1, label_w + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            if n <= 20:
                draw.text((box[0] + 3, box[1] + cell // 3), str(int(confusion[i, j])),
                          fill="white" if rates[i, j] > 0.5 else "black")
    return np.asarray(image)
