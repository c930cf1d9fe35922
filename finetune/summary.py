"""How a run ended: ``summary.json`` (status, best metric, paths, wall time), however it ended, and the
closing block on the console with the commands to run next."""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from finetune.cli import command, override
from finetune.errors import RunPruned, UserError, message_of
from finetune.files import atomic_write_text
from finetune.signals import TrainingInterrupted
from finetune.trainer import TrainState

log = logging.getLogger("finetune")
FINAL_HPARAM_METRICS = ("val/acc1", "val/loss", "train/loss")  # next to the best value in the trackers' hparams


class RunSummary:
    """A run's account of itself, kept as it goes and written into ``summary.json`` when it ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.record: dict[str, Any] = {"status": "running", "run_dir": str(run_dir)}
        self.started = time.time()

    def note_lr(self, lr_find: dict[str, Any] | None, *, write: bool) -> None:
        """``optim.lr=auto``'s choice: in ``summary.json``, and whole in ``lr_find.json`` (``write``: this process
        writes the run's files)."""
        if lr_find is None:
            return
        # a state from before trials has no choice; freeze: only where the trials tried freeze candidates
        keys = ("lr", "freeze", "selected_by", "choice", "chosen", "rule", "reason")
        self.record["lr_find"] = {k: lr_find[k] for k in keys if k in lr_find}
        if write:
            atomic_write_text(self.run_dir / "lr_find.json", json.dumps(lr_find, indent=1) + "\n", root=self.run_dir)

    def note_resumed_from(self, path: Path | None) -> None:
        if path is not None:
            self.record["resumed_from"] = str(path)

    def completed(self, state: TrainState, final: dict[str, float]) -> None:
        self.record |= {"status": "completed", "epochs": state.epoch, "steps": state.global_step, "final": final}

    def ended(self, exc_type: type | None, exc: BaseException | None) -> None:
        """How the run ended, when it did not complete: its status and error, and how to resume."""
        if exc_type is None:
            return
        status = ("interrupted" if issubclass(exc_type, KeyboardInterrupt)
                  else "pruned" if issubclass(exc_type, RunPruned) else "failed")
        # A UserError raised in a loader worker carries the worker's traceback: the record keeps its one line.
        message = message_of(exc) if isinstance(exc, UserError) else exc
        self.record |= {"status": status, "error": f"{exc_type.__name__}: {message}"}
        if issubclass(exc_type, TrainingInterrupted):
            self.record["resume_with"] = command("finetune", override("resume", self.run_dir))

    def note_files(self, *, best: dict[str, Any], monitor: str, paths: dict[str, str]) -> None:
        """The best checkpoint's metric and epoch, and every file the run wrote."""
        self.record["best"] = {"metric": monitor, "value": best.get("value"), "epoch": best.get("epoch")}
        self.record["paths"] = {"run_dir": str(self.run_dir), **paths, "tensorboard": str(self.run_dir / "tb"),
                                "metrics": str(self.run_dir / "metrics.jsonl")}

    def write(self) -> None:
        """``summary.json``, written whole; a full disk is logged, never hides the error that ended the run."""
        self.record["wall_seconds"] = round(time.time() - self.started, 2)
        try:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(self.record, indent=2) + "\n",
                              root=self.run_dir)
        except OSError as err:
            log.error(f"could not write '{self.run_dir / 'summary.json'}': {err}")


def start_block(*, data: Any, model: str, source: str, weights: str, trainable: int, total: int, frozen: str,
                device: str, precision: str, input_size: tuple[int, ...], epochs: int, updates: int, batch: int,
                optimizer: str, lr: float, listed: int = 8) -> str:
    """What a run is about to do, before its first epoch: data, model and weights, what trains, where, how long.

    ``data``: the run's `finetune.data.DataSplit`.

    >>> from finetune.data import DataSplit
    >>> split = DataSplit([("a/1.png", 0), ("a/2.png", 0), ("b/1.png", 1)], [("b/2.png", 1)], ["a", "b"], "/d",
    ...                   "split", [], 0.2, 0)
    >>> print(start_block(data=split, model="resnet50", source="timm", weights="random initialisation",
    ...                   trainable=10, total=1234, frozen="freeze=head_only", device="cpu", precision="32",
    ...                   input_size=(3, 224, 224), epochs=2, updates=3, batch=4, optimizer="adamw", lr=1e-3))
    ---- starting: fine-tune resnet50 (timm) ----
    data      /d (class folders, split by data.val_split=0.2): 2 classes, 3 train / 1 val images
    classes   a (2/0), b (1/1)
    weights   random initialisation
    params    10 of 1,234 trainable (freeze=head_only)
    compute   cpu, precision 32, input 3x224x224
    schedule  2 epochs of 3 updates (batch 4), adamw at lr 0.001
    """
    train, val = data.class_counts("train"), data.class_counts("val")
    layout = _layout(data)
    classes = [f"{name} ({t}/{v})" for name, t, v in zip(data.class_names, train, val)]
    more = f", and {len(classes) - listed} more" if len(classes) > listed else ""
    return "\n".join([
        f"---- starting: fine-tune {model} ({source}) ----",
        f"data      {data.root} ({layout}): {len(data.class_names)} classes, {sum(train)} train / {sum(val)} val images",
        f"classes   {', '.join(classes[:listed])}{more}",
        f"weights   {weights}",
        f"params    {trainable:,} of {total:,} trainable ({frozen})",
        f"compute   {device}, precision {precision}, input {'x'.join(map(str, input_size))}",
        f"schedule  {epochs} epochs of {updates} updates (batch {batch}), {optimizer} at lr {lr:.4g}",
    ])


def _layout(data: Any) -> str:
    """How the images were found and split, in words."""
    if data.layout == "shards":
        return "WebDataset shards"
    if data.layout == "hf-stream":
        return "Parquet files, streamed"
    what = f"table {data.source}" if data.source else "class folders"
    if data.layout == "folds":
        return f"{what}, fold {data.fold} of data.folds={data.folds} validated"
    return {"train_val": "train/ and val/ folders", "column": f"{what}, split by its split column"}.get(
        data.layout, f"{what}, split by data.val_split={data.val_split}")


def closing_block(record: dict[str, Any], *, data_root: str | None, evaluates: bool = True) -> str:
    """The end of a run's console output: how it ended, where its files are, and what to run next
    (each command quoted for Hydra and the shell: `finetune.cli.command`). ``evaluates``: whether
    ``finetune.evaluate`` reads the run's data (not shards nor Hugging Face datasets yet): no command
    is offered that would only be refused.

    >>> print(closing_block({"status": "interrupted", "run_dir": "R", "epochs": None, "steps": 7,
    ...     "best": {"metric": "val/acc1", "value": 0.5, "epoch": 1},
    ...     "paths": {"best.safetensors": "R/checkpoints/best.safetensors", "last.ckpt": "R/checkpoints/last.ckpt"}},
    ...     data_root="my photos"))  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
    ---- run interrupted ----
    best         val/acc1 0.5000 at epoch 1
    weights      R/checkpoints/best.safetensors
    run dir      R
    tensorboard  tensorboard --logdir R/tb
    next:
      ...python -m finetune resume=R
      ...python -m finetune.evaluate ckpt=R data=custom "data.root='my photos'"
      ...python -m finetune.predict ckpt=R inputs=DIR_OR_GLOB
      ...python -m finetune.export ckpt=R format=onnx
    >>> block = closing_block({"status": "completed", "run_dir": "R", "paths": {"best.safetensors": "R/b"}},
    ...                       data_root=None, evaluates=False)  # a run on shards
    >>> "finetune.evaluate" in block, "finetune.predict" in block
    (False, True)
    """
    run_dir, status, paths = record["run_dir"], record["status"], record.get("paths", {})
    best, weights = record.get("best") or {}, paths.get("best.safetensors") or paths.get("best.pt")
    lines = [f"---- run {status} ----"]
    if record.get("error") and status not in ("completed", "interrupted"):
        lines.append(f"error        {record['error']}")
    if best.get("value") is not None:
        lines.append(f"best         {best['metric']} {best['value']:.4f} at epoch {best['epoch']}")
    if weights:
        lines.append(f"weights      {weights}")
    lines += [f"run dir      {run_dir}", f"tensorboard  {shlex.join(['tensorboard', '--logdir', f'{run_dir}/tb'])}"]
    ckpt = override("ckpt", run_dir)
    commands = ([command("finetune", override("resume", run_dir))]
                if status != "completed" and "last.ckpt" in paths else [])
    if weights:
        data = ["data=custom", override("data.root", data_root)] if data_root else []
        commands += [command("finetune.evaluate", ckpt, *data)] if evaluates else []
        commands += [command("finetune.predict", ckpt, "inputs=DIR_OR_GLOB"),
                     command("finetune.export", ckpt, "format=onnx")]
    return "\n".join(lines + (["next:"] + [f"  {c}" for c in commands] if commands else []))
