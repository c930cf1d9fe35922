"""A run's lifecycle: `Recipe.setup` builds every part once, `Recipe.train` fits, `Recipe.cleanup` ends
what setup started, however the run ended.

``setup`` reads as the run's table of contents, in the order that matters (model -> weights ->
freeze -> optimizer -> restore, so that a restored optimizer state lands on the same parameter
groups); each line is one builder (`finetune.builders`, the only other code that reads the config).
Resuming is one `finetune.resume.ResumePlan`, located first and applied last. ``cleanup`` stops the
loaders' workers, closes the hooks (a background checkpoint save finishes), writes ``summary.json``
and the closing block (`finetune.summary`), waits for every DDP process, and releases the run dir.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune import builders
from finetune.checkpoint import TrainingParts
from finetune.config import check_config, in_a_sweep
from finetune.data import DataSplit, Loaders, ShardSplit
from finetune.distributed import SINGLE, World
from finetune.errors import RunPruned
from finetune.files import open_append
from finetune.resume import ResumePlan
from finetune.rundir import RunDirInUse, hold_run_dir
from finetune.runtime import Runtime, seed_ranks, setup_runtime
from finetune.signals import StopRequest, TrainingInterrupted, ignore_stop_signals, stop_workers
from finetune.summary import FINAL_HPARAM_METRICS, RunSummary, closing_block, start_block
from finetune.trainer import TrainState

log = logging.getLogger("finetune")


class Recipe:
    """One fine-tune in ``run_dir``; a context manager whose exit is `cleanup`. Under DDP every process
    runs the same recipe and rank 0 alone writes the run's files."""

    def __init__(self, run_dir: Path, *, world: World = SINGLE):
        self.run_dir, self.world = run_dir, world
        self.summary = RunSummary(run_dir)
        self.run_log = RunLogHandler(run_dir / "train.log")
        self.lock = contextlib.ExitStack()
        self.plan: ResumePlan | None = None
        self.split: DataSplit | None = None
        self.loaders: Loaders | None = None
        self.parts: builders.RunParts | None = None
        self.hparams: dict[str, Any] = {}
        self.state: TrainState | None = None
        self.load_report: dict[str, Any] | None = None  # what the pretrained load placed (a fresh start)
        self.adapter: Any = None  # adapter=lora: finetune.adapters.LoraAdapter
        self.mirror: Any = None  # checkpoint.mirror: finetune.checkpoint.mirror.Mirror (rank 0)

    # ------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig, *, stop: StopRequest | None = None) -> None:
        """Build every part of the run once, in order, and put it where the resume plan starts."""
        check_config(cfg)
        self.world.check_same_config(OmegaConf.to_yaml(cfg, resolve=True))
        if self.world.main:  # this process alone writes into the run dir from here on
            self.lock.enter_context(hold_run_dir(self.run_dir))
        self.mirror = builders.build_mirror(cfg, world=self.world)  # a wrong URL or key fails here, in seconds
        self.plan = ResumePlan.locate(cfg, run_dir=self.run_dir, world=self.world, mirror=self.mirror)
        self.summary.note_resumed_from(self.plan.source)
        self.world.barrier()  # every process knows where it starts before rank 0 writes anything
        rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                           deterministic=cfg.trainer.deterministic, job=builders.job_number(), world=self.world)
        model, spec, data_config = self.build_model_and_data(cfg, rt, pretrained=self.plan.fresh)
        weights = self.weights_line(cfg)
        self.plan.place(loaders=self.loaders, world=self.world, accumulate=cfg.trainer.accumulate)
        freeze = builders.build_freeze(cfg, model, spec)
        lr, lr_find = builders.choose_lr(cfg, model, spec, loaders=self.loaders, rt=rt, split=self.split,
                                         data_config=data_config, saved=self.plan.lr_record)
        frozen_as = builders.with_chosen_freeze(cfg, lr_find)  # optim.lr=auto may choose freeze=head_only too
        if frozen_as is not cfg:  # freeze=none froze nothing: this freezes as freeze=NAME given by hand would
            freeze = builders.build_freeze(frozen_as, model, spec)
        self.summary.note_lr(lr_find, write=self.world.main)
        optimizer, scheduler = builders.build_optimization(
            cfg, model, spec, lr=lr, updates_per_epoch=builders.updates_per_epoch(cfg, self.loaders))
        training = TrainingParts(model, optimizer, scheduler, grad_scaler=builders.build_grad_scaler(rt),
                                 ema=builders.build_ema(cfg, model), freeze=freeze, adapter=self.adapter)
        self.parts = builders.build_run(cfg, training, spec=spec, data_config=data_config,
                                        class_names=self.split.class_names, loaders=self.loaders, rt=rt,
                                        run_dir=self.run_dir, plan=self.plan, stop=stop, lr_find=lr_find,
                                        mirror=self.mirror)
        self.hparams = builders.hparams(cfg, only=builders.swept_keys(), lr_find=lr_find)
        log.info(start_block(data=self.split, model=spec.name, source=spec.source, weights=weights,
                             trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                             total=sum(p.numel() for p in model.parameters()),
                             frozen=frozen_line(frozen_as, chosen=frozen_as is not cfg, adapter=self.adapter),
                             device=str(rt.device), precision=cfg.trainer.precision,
                             input_size=tuple(data_config["input_size"]), epochs=cfg.trainer.max_epochs,
                             updates=builders.updates_per_epoch(cfg, self.loaders),
                             batch=self.loaders.train.batch_size, optimizer=cfg.optim.name, lr=lr))
        seed_ranks(cfg.seed, self.world)
        self.state = self.plan.apply(training=training, checkpointer=self.parts.hooks.checkpoint,
                                     metrics=self.parts.hooks.metrics, max_epochs=cfg.trainer.max_epochs,
                                     world=self.world)

    def weights_line(self, cfg: DictConfig) -> str:
        """Where the model's weights come from, for the start of the run."""
        if not self.plan.fresh:
            return f"from the training state '{self.plan.source}' (resumed)"
        report = self.load_report or {}
        sources = [s.get("path") for s in report.get("sources", [])]
        if not sources:
            return "random initialisation (no transfer learning: model.pretrained=false and model.weights=null)"
        return f"{', '.join(map(str, sources))}: {report.get('loaded_fraction', 0.0):.1%} of the backbone loaded"

    def build_model_and_data(self, cfg: DictConfig, rt: Runtime, *, pretrained: bool) -> tuple[Any, Any, dict]:
        """The data split (recorded in ``split.json``), the model (its pretrained weights loaded when
        ``pretrained``; a resumed model gets its weights from the training state), the loaders."""
        self.split = builders.build_split(cfg.data, run_dir=self.run_dir, write=self.world.main,
                                          multilabel=cfg.task.name == "multilabel")
        model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=len(self.split.class_names))
        builders.set_grad_checkpointing(cfg.trainer, model, spec)
        if pretrained:
            self.load_report = builders.init_weights(cfg.model, model, spec, head=cfg.head,
                                                     class_names=self.split.class_names, run_dir=self.run_dir,
                                                     write=self.world.main)
        self.adapter = builders.build_adapter(cfg, model, spec)
        model = builders.prepare_for_ddp(cfg, model.to(rt.device), rt=rt)
        data_config = builders.build_data_config(cfg.data, spec)
        self.loaders = builders.build_loaders(cfg.data, self.split, data_config, seed=cfg.seed, device=rt.device,
                                              world=self.world)
        return model, spec, data_config

    def search_lr(self, cfg: DictConfig) -> dict[str, Any]:
        """Only the range test of ``optim.lr=auto`` (``python -m finetune.lr_find``), on the model as ``cfg``
        would train it: the same parts as `setup` up to the rate. Returns ``lr_find.json``'s record."""
        rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                           deterministic=cfg.trainer.deterministic)
        try:
            model, spec, data_config = self.build_model_and_data(cfg, rt, pretrained=True)
            builders.build_freeze(cfg, model, spec)
            return builders.choose_lr(cfg, model, spec, loaders=self.loaders, rt=rt, split=self.split,
                                      data_config=data_config)[1]
        finally:
            self.stop_workers()

    # ------------------------------------------------------------ train
    def train(self) -> dict[str, float]:
        """Fit from where setup left off; the final metrics (the last epoch's, and ``best/value``)."""
        state = self.parts.trainer.fit(self.loaders.train, self.loaders.val, self.state)
        last = self.parts.hooks.metrics.last
        final = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final["best/value"] = state.best_value
        self.summary.completed(state, final)
        if self.parts.logger is not None:
            self.parts.logger.log_hparams(self.hparams, {"best": state.best_value} |
                                          {f"final/{k}": v for k, v in final.items() if k in FINAL_HPARAM_METRICS})
        return final

    # ------------------------------------------------------------ cleanup
    def __enter__(self) -> Recipe:
        root = logging.getLogger()
        if self.world.main:  # a DDP process other than rank 0 logs as its launcher set up (errors only)
            root.addHandler(self.run_log)
            root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.captureWarnings(True)  # e.g. skipped unreadable images reach train.log too
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.cleanup(exc_type, exc)

    def cleanup(self, exc_type: type | None = None, exc: BaseException | None = None) -> None:
        """End what setup started, however the run ended: workers, hooks, ``summary.json``, the lock."""
        try:
            if exc_type is None or not issubclass(exc_type, RunDirInUse):  # another run's dir: write nothing there
                self._finish_files(exc_type, exc)
        finally:
            self._release(exc_type)

    def stop_workers(self) -> None:
        """However the run ended: no loader worker process outlives it."""
        for loader in (self.loaders.train, self.loaders.val) if self.loaders is not None else ():
            stop_workers(loader)

    def _finish_files(self, exc_type: type | None, exc: BaseException | None) -> None:
        self.stop_workers()
        if self.parts is not None:
            for hook in self.parts.hooks.ordered():  # first: a background checkpoint save finishes here
                if hook is not self.parts.hooks.log:  # the trackers end last, with the run's files
                    hook.close()
            checkpoint = self.parts.hooks.checkpoint
            self.summary.note_files(best=checkpoint.best(), monitor=self.parts.trainer.monitor, paths=checkpoint.paths())
        self.summary.ended(exc_type, exc)
        if not self.world.main:
            return
        if self.parts is None and exc_type is not None and (self.run_dir / "summary.json").exists():
            log.error(f"stopped before training, '{self.run_dir / 'summary.json'}' left as it was: {exc}")
            return  # refused before any work (a resume, a fresh run here): keep that run's summary
        self.summary.write()
        if self.parts is not None and self.parts.logger is not None:
            self.close_trackers(tracker_status(exc_type))
        if self.parts is not None and not in_a_sweep():  # a sweep ends with its own table instead
            log.info(closing_block(self.summary.record, data_root=self.folder_root(),
                                   evaluates=self.evaluable()))

    def evaluable(self) -> bool:
        """Whether finetune.evaluate reads this run's data: folders, tables and Hugging Face datasets on disk,
        not streams (yet; `finetune.evaluate.choose_images` refuses those)."""
        return self.split is not None and not isinstance(self.split, ShardSplit)

    def folder_root(self) -> str | None:
        """The image folder a later evaluate names (None for a table or shards: evaluate takes the run's own
        data, or none)."""
        if self.split is None or isinstance(self.split, ShardSplit):
            return None
        return self.split.root if self.split.source is None else None

    def close_trackers(self, status: str) -> None:
        """The run's files to the trackers (best weights, ``summary.json``, ``load_report.json``), then their
        end (``status``); a tracker that dropped events is noted in ``summary.json`` (written again)."""
        loggers = self.parts.logger
        best = [Path(p) for name, p in self.parts.hooks.checkpoint.paths().items() if name.startswith("best.")]
        for path in [*best, self.run_dir / "summary.json", self.run_dir / "load_report.json"]:
            loggers.log_artifact(path)
        self.parts.hooks.log.close(status)
        if loggers.report():
            self.summary.record["trackers"] = loggers.report()
            self.summary.write()

    def _release(self, exc_type: type | None) -> None:
        if self.parts is not None and (exc_type is None or issubclass(exc_type, TrainingInterrupted)):
            # Every process got here at the same step: none exits before rank 0 has written its files
            # (torchrun stops the other processes as soon as one exits with an error status, 143 included).
            self.world.barrier()
            if self.world.distributed and exc_type is not None:
                ignore_stop_signals()  # each exits 128 + the signal that stopped them all, not killed by torchrun
        self.lock.close()
        logging.getLogger().removeHandler(self.run_log)
        logging.captureWarnings(False)
        self.run_log.close()


def frozen_line(cfg: DictConfig, *, chosen: bool, adapter: Any) -> str:
    """What the run freezes, for the start of the run: ``freeze.*`` (or what ``optim.lr=auto`` chose), the adapter."""
    return (f"freeze={cfg.freeze.name}" + (" (chosen by optim.lr=auto)" if chosen else "")
            + (", thawing on schedule" if cfg.freeze.schedule else "")
            + (f", adapter={cfg.adapter.name} (r={cfg.adapter.r})" if adapter else ""))


def tracker_status(exc_type: type | None) -> str:
    """How the trackers see the run's end: ``FINISHED``, ``KILLED`` (interrupted, a pruned trial) or ``FAILED``.

    >>> from finetune.signals import TrainingInterrupted
    >>> [tracker_status(e) for e in (None, TrainingInterrupted, KeyboardInterrupt, RunPruned, ValueError, OSError)]
    ['FINISHED', 'KILLED', 'KILLED', 'KILLED', 'FAILED', 'FAILED']
    """
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, (KeyboardInterrupt, RunPruned)) else "FAILED"


class RunLogHandler(logging.FileHandler):
    """``train.log``: appended to, created by the first line, never through a link planted at its name."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self) -> Any:
        return open_append(self.baseFilename, encoding=self.encoding)
