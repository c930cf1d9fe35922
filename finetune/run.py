"""``run(cfg)``: one fine-tune, start to finish. Reads like a table of contents."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from finetune import builders, distributed
from finetune import resume as resume_lib
from finetune.checkpoint import TrainingParts
from finetune.cli import command, override
from finetune.config import check_config, in_a_sweep
from finetune.errors import RunPruned
from finetune.files import atomic_write_stream, atomic_write_text, open_append
from finetune.rundir import RunDirInUse, check_run_dir, hold_run_dir, resolve_run_dir
from finetune.runtime import seed_ranks, setup_runtime
from finetune.signals import TrainingInterrupted, graceful_stop, ignore_stop_signals, stop_workers
from finetune.trainer import TrainState

log = logging.getLogger("finetune")
FINAL_HPARAM_METRICS = ("val/acc1", "val/loss", "train/loss")  # next to the best value in TensorBoard's HPARAMS


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, float]:
    """Fine-tune as ``cfg`` says, writing everything into ``run_dir`` (default: Hydra's output dir).

    Returns the final metrics (the last epoch's, plus ``best/value`` of the monitored metric).
    With ``cfg.resume`` set, continues from a training state (``finetune.resume``): the
    pretrained load is skipped and everything is restored right before training.
    SIGTERM/SIGINT stop after the current step with ``last.ckpt`` saved (``TrainingInterrupted``).
    Started by torchrun (or srun), every process calls it: one data-parallel run (``finetune.distributed``),
    whose files rank 0 alone writes.
    """
    run_dir = resolve_run_dir(run_dir)
    check_run_dir(run_dir, output_subdir=None)  # before the first write: no link planted in it is followed
    world = distributed.init()
    with RunRecord(run_dir, world=world) as record, graceful_stop() as stop:
        check_config(cfg)
        world.check_same_config(OmegaConf.to_yaml(cfg, resolve=True))
        record.hold()  # this process alone writes into the run dir from here on
        point = resume_lib.locate(cfg, run_dir=run_dir)
        world.barrier()  # every process knows where it starts before rank 0 writes anything
        rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                           deterministic=cfg.trainer.deterministic, job=builders.job_number(), world=world)
        split = record.note_data(builders.build_split(cfg.data, run_dir=run_dir, write=world.main))
        model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=len(split.class_names))
        if point is None:  # a resumed model gets its weights from the training state
            builders.init_weights(cfg.model, model, spec, head=cfg.head, class_names=split.class_names,
                                  run_dir=run_dir, write=world.main)
        model = builders.prepare_for_ddp(cfg, model.to(rt.device), rt=rt)
        data_config = builders.build_data_config(cfg.data, spec)
        loaders = record.watch(builders.build_loaders(cfg.data, split, data_config, seed=cfg.seed,
                                                      device=rt.device, world=world))
        point = resume_lib.at_world_size(point, world, loaders=loaders, accumulate=cfg.trainer.accumulate)
        freeze = builders.build_freeze(cfg, model, spec)
        lr, lr_find = record.note_lr(*builders.choose_lr(cfg, model, spec, loaders=loaders, rt=rt, resume=point))
        optimizer, scheduler = builders.build_optimization(cfg, model, spec, lr=lr,
                                                           updates_per_epoch=builders.updates_per_epoch(cfg, loaders))
        training = TrainingParts(model, optimizer, scheduler, grad_scaler=builders.build_grad_scaler(rt),
                                 ema=builders.build_ema(cfg, model), freeze=freeze)
        parts = record.track(builders.build_run(cfg, training, spec=spec, data_config=data_config,
                                                class_names=split.class_names, loaders=loaders, rt=rt,
                                                run_dir=run_dir, resume=point, stop=stop, lr_find=lr_find),
                             resumed_from=point)
        seed_ranks(cfg.seed, world)
        state = resume_lib.restore(point, parts, resuming=cfg.resume is not None, world=world)
        state = parts.trainer.fit(loaders.train, loaders.val, state)
        return record.finish(state, hparams=builders.hparams(cfg, only=builders.swept_keys()))


def find_lr(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Only the range test of ``optim.lr=auto`` (``python -m finetune.lr_find``), on the model as ``cfg``
    would train it; writes ``lr_find.json`` and ``lr_find.png`` into ``run_dir`` and returns the record."""
    from finetune.lr_find import draw_curve, from_record

    run_dir = resolve_run_dir(run_dir)
    check_run_dir(run_dir, output_subdir=None)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.optim.lr = "auto"
    check_config(cfg)
    rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                       deterministic=cfg.trainer.deterministic)
    split = builders.build_split(cfg.data, run_dir=run_dir)
    model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=len(split.class_names))
    builders.init_weights(cfg.model, model, spec, head=cfg.head, class_names=split.class_names, run_dir=run_dir)
    model = model.to(rt.device)
    loaders = builders.build_loaders(cfg.data, split, builders.build_data_config(cfg.data, spec), seed=cfg.seed,
                                     device=rt.device)
    try:
        builders.build_freeze(cfg, model, spec)
        _, record = builders.choose_lr(cfg, model, spec, loaders=loaders, rt=rt, resume=None)
    finally:
        for loader in (loaders.train, loaders.val):
            stop_workers(loader)
    atomic_write_text(run_dir / "lr_find.json", json.dumps(record, indent=1) + "\n", root=run_dir)
    image = Image.fromarray(draw_curve(from_record(record)))
    atomic_write_stream(run_dir / "lr_find.png", lambda f: image.save(f, format="PNG"), root=run_dir)
    return record


class RunRecord:
    """A run's own account of itself: ``train.log`` while it runs, ``summary.json`` however it ends.

    It also ends what the run started, whatever ended the run: the hooks are closed (a background
    checkpoint save finishes) and the loaders' worker processes are shut down.
    """

    def __init__(self, run_dir: Path, *, world: distributed.World = distributed.SINGLE):
        """``world``: the run's processes; rank 0 alone writes the run's files."""
        self.run_dir, self.world, self.writes = run_dir, world, world.main
        self.handler = RunLogHandler(run_dir / "train.log")
        self.lock = contextlib.ExitStack()
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        self.parts: builders.RunParts | None = None
        self.loaders: Any = None
        self.data_root: str | None = None
        self.record: dict = {"status": "running", "run_dir": str(run_dir)}
        self.started = time.time()

    def __enter__(self) -> RunRecord:
        root = logging.getLogger()
        if self.writes:  # a DDP process other than rank 0 logs as its launcher set up (errors only)
            root.addHandler(self.handler)
            root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.captureWarnings(True)  # e.g. skipped unreadable images reach train.log too
        return self

    def hold(self) -> None:
        """Lock the run dir for this run's life (``hold_run_dir``); refused when another process holds it."""
        if self.writes:
            self.lock.enter_context(hold_run_dir(self.run_dir))

    def note_data(self, split: Any) -> Any:
        """Returns ``split``, whose root the closing block's commands use."""
        self.data_root = split.root
        return split

    def note_lr(self, lr: float, lr_find: dict[str, Any] | None) -> tuple[float, dict[str, Any] | None]:
        """Returns its arguments; ``optim.lr=auto``'s choice goes into ``summary.json`` and ``lr_find.json``."""
        if lr_find is not None:
            self.record["lr_find"] = {k: lr_find[k] for k in ("lr", "chosen", "rule", "reason")}
        if lr_find is not None and self.writes:
            atomic_write_text(self.run_dir / "lr_find.json", json.dumps(lr_find, indent=1) + "\n", root=self.run_dir)
        return lr, lr_find

    def watch(self, loaders: Any) -> Any:
        """Returns ``loaders``, whose workers are shut down when the run ends."""
        self.loaders = loaders
        return loaders

    def track(self, parts: builders.RunParts, *, resumed_from: resume_lib.ResumePoint | None) -> builders.RunParts:
        """Returns ``parts``, whose hooks are closed and whose files are listed when the run ends."""
        self.parts = parts
        if resumed_from is not None:
            self.record["resumed_from"] = str(resumed_from.path)
        return parts

    def finish(self, state: TrainState, *, hparams: dict[str, Any]) -> dict[str, float]:
        """The run completed: its final metrics (the last epoch's, and ``best/value``)."""
        last = self.parts.metrics.last
        final = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final["best/value"] = state.best_value
        self.record |= {"status": "completed", "epochs": state.epoch, "steps": state.global_step, "final": final}
        self.parts.logger.log_hparams(hparams, {"best": state.best_value} |
                                      {f"final/{k}": v for k, v in final.items() if k in FINAL_HPARAM_METRICS})
        return final

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, RunDirInUse):  # another run's dir: write nothing there
            return self._close()
        if exc_type is not None:
            status = ("interrupted" if issubclass(exc_type, KeyboardInterrupt)
                      else "pruned" if issubclass(exc_type, RunPruned) else "failed")
            self.record |= {"status": status, "error": f"{exc_type.__name__}: {exc}"}
            if issubclass(exc_type, TrainingInterrupted):
                self.record["resume_with"] = command("finetune", override("resume", self.run_dir))
        for loader in (self.loaders.train, self.loaders.val) if self.loaders is not None else ():
            stop_workers(loader)  # however the run ended: no worker process outlives it
        if self.parts is not None:
            for hook in self.parts.trainer.hooks:  # first: a background checkpoint save finishes here
                hook.close()
            self._add_training_facts()
        self.record["wall_seconds"] = round(time.time() - self.started, 2)
        if not self.writes:
            return self._close(exc_type)
        if self.parts is None and exc_type is not None and (self.run_dir / "summary.json").exists():
            log.error(f"stopped before training, '{self.run_dir / 'summary.json'}' left as it was: {exc}")
            return self._close()  # refused before any work (a resume, a fresh run here): keep that run's summary
        try:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(self.record, indent=2) + "\n", root=self.run_dir)
        except OSError as err:  # a full disk must not hide the error that ended the run
            log.error(f"could not write '{self.run_dir / 'summary.json'}': {err}")
        if self.parts is not None and not in_a_sweep():  # a sweep ends with its own table instead
            log.info(closing_block(self.record, data_root=self.data_root))
        self._close(exc_type)

    def _close(self, exc_type: type | None = None) -> None:
        if self.parts is not None and (exc_type is None or issubclass(exc_type, TrainingInterrupted)):
            # Every process got here at the same step: none exits before rank 0 has written its files
            # (torchrun stops the other processes as soon as one exits with an error status, 143 included).
            self.world.barrier()
            if self.world.distributed and exc_type is not None:
                ignore_stop_signals()  # each exits 128 + the signal that stopped them all, not killed by torchrun
        self.lock.close()
        logging.getLogger().removeHandler(self.handler)
        logging.captureWarnings(False)
        self.handler.close()

    def _add_training_facts(self) -> None:
        best = self.parts.checkpointer.best()
        self.record["best"] = {"metric": self.parts.trainer.monitor, "value": best.get("value"),
                               "epoch": best.get("epoch")}
        self.record["paths"] = {"run_dir": str(self.run_dir), **self.parts.checkpointer.paths(),
                                "tensorboard": str(self.run_dir / "tb"),
                                "metrics": str(self.run_dir / "metrics.jsonl")}


class RunLogHandler(logging.FileHandler):
    """``train.log``: appended to, created by the first line, never through a link planted at its name."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self) -> Any:
        return open_append(self.baseFilename, encoding=self.encoding)


def closing_block(record: dict[str, Any], *, data_root: str | None) -> str:
    """The end of a run's console output: how it ended, where its files are, and what to run next
    (each command quoted for Hydra and the shell: `finetune.cli.command`).

    >>> print(closing_block({"status": "interrupted", "run_dir": "R", "epochs": None, "steps": 7,
    ...     "best": {"metric": "val/acc1", "value": 0.5, "epoch": 1},
    ...     "paths": {"best.safetensors": "R/checkpoints/best.safetensors", "last.ckpt": "R/checkpoints/last.ckpt"}},
    ...     data_root="my photos"))  # doctest: +NORMALIZE_WHITESPACE
    ---- run interrupted ----
    best         val/acc1 0.5000 at epoch 1
    weights      R/checkpoints/best.safetensors
    run dir      R
    tensorboard  tensorboard --logdir R/tb
    next:
      python -m finetune resume=R
      python -m finetune.evaluate ckpt=R data=custom "data.root='my photos'"
      python -m finetune.predict ckpt=R inputs=DIR_OR_GLOB
      python -m finetune.export ckpt=R format=onnx
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
        commands += [command("finetune.evaluate", ckpt, *data),
                     command("finetune.predict", ckpt, "inputs=DIR_OR_GLOB"),
                     command("finetune.export", ckpt, "format=onnx")]
    return "\n".join(lines + (["next:"] + [f"  {c}" for c in commands] if commands else []))
