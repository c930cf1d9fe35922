"""``run(cfg)``: one fine-tune, start to finish. Reads like a table of contents."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from finetune import builders
from finetune import resume as resume_lib
from finetune.checkpoint import atomic_write_text
from finetune.config import check_config
from finetune.runtime import setup_runtime
from finetune.signals import TrainingInterrupted, graceful_stop, stop_workers

log = logging.getLogger("finetune")


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, float]:
    """Fine-tune as ``cfg`` says, writing everything into ``run_dir`` (default: Hydra's output dir).

    Returns the final metrics (the last epoch's, plus ``best/value`` of the monitored metric).
    With ``cfg.resume`` set, continues from a training state (``finetune.resume``): the
    pretrained load is skipped and everything is restored right before training.
    SIGTERM/SIGINT stop after the current step with ``last.ckpt`` saved (``TrainingInterrupted``).
    """
    run_dir = resolve_run_dir(run_dir)
    started = time.time()
    with RunLog(run_dir) as summary, graceful_stop() as stop:
        check_config(cfg)
        point = resume_lib.locate_resume(cfg.resume, checkpoint_dir=run_dir / "checkpoints",
                                         allow_unverified=cfg.resume_allow_unverified)
        if point is not None:
            resume_lib.check_config_change(point.state["config_yaml"], cfg, source=point.path,
                                           allow=cfg.resume_allow_config_change)
        rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                           deterministic=cfg.trainer.deterministic)
        split = builders.build_split(cfg.data, run_dir=run_dir)
        model, spec = builders.build_network(cfg.model, head=cfg.head, num_classes=len(split.class_names))
        if point is None:  # a resumed model gets its weights from the training state
            builders.load_weights(cfg.model, model, spec, head_init=cfg.head.init, run_dir=run_dir)
        model = model.to(rt.device)
        loaders = builders.build_loaders(cfg.data, split, spec, seed=cfg.seed, pin_memory=rt.device.type == "cuda")
        trainer = builders.build_trainer(cfg, model=model, spec=spec, loaders=loaders, rt=rt, run_dir=run_dir,
                                         class_names=split.class_names, resume=point, stop=stop)
        summary.track(trainer, loaders=(loaders.train, loaders.val), resumed_from=point.path if point else None)
        state = resume_lib.restore_training(trainer, point, run_dir=run_dir) if point else None
        if cfg.resume is not None and point is None:
            resume_lib.rewind_metrics(run_dir / "metrics.jsonl", epochs_done=0)  # resume=auto starting fresh
        state = trainer.fit(loaders.train, loaders.val, state)
        final = summary.finish(state, cfg, wall=time.time() - started)
    return final


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLog:
    """``train.log`` for the run's duration and ``summary.json`` however the run ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        self.trainer, self.loaders = None, ()
        self.record: dict = {"status": "running", "run_dir": str(run_dir)}
        self.started = time.time()

    def __enter__(self) -> "RunLog":
        root = logging.getLogger()
        root.addHandler(self.handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.captureWarnings(True)  # e.g. skipped unreadable images reach train.log too
        return self

    def track(self, trainer, *, loaders: tuple = (), resumed_from: Path | None = None) -> None:
        self.trainer, self.loaders = trainer, loaders
        if resumed_from is not None:
            self.record["resumed_from"] = str(resumed_from)

    def finish(self, state, cfg: DictConfig, *, wall: float) -> dict[str, float]:
        metrics_path = self.run_dir / "metrics.jsonl"
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        last = json.loads(lines[-1]) if lines else {}
        final = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final["best/value"] = state.best_value
        self.record |= {"status": "completed", "epochs": state.epoch, "steps": state.global_step,
                        "final": final}
        tb = next((h for h in self.trainer.hooks if hasattr(h, "log_hparams")), None)
        if tb is not None:
            tb.log_hparams(builders.hparams(cfg), {"best": state.best_value})
        return final

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.record |= {"status": status, "error": f"{exc_type.__name__}: {exc}"}
            if issubclass(exc_type, TrainingInterrupted):
                self.record["resume_with"] = f"python -m finetune resume={self.run_dir}"
        for loader in self.loaders:  # however the run ended: no worker outlives it
            stop_workers(loader)
        if self.trainer is not None:
            for hook in self.trainer.hooks:  # first: a background checkpoint save finishes here
                hook.close()
            self._add_training_facts()
        self.record["wall_seconds"] = round(time.time() - self.started, 2)
        if self.trainer is None and exc_type is not None and (self.run_dir / "summary.json").exists():
            logging.getLogger("finetune").error(f"stopped before training, '{self.run_dir / 'summary.json'}' "
                                                f"left as it was: {exc}")
            return self._close()  # refused before any work (a resume, a fresh run here): keep that run's summary
        try:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(self.record, indent=2) + "\n")
        except OSError as err:  # a full disk must not hide the error that ended the run
            logging.getLogger("finetune").error(f"could not write '{self.run_dir / 'summary.json'}': {err}")
        self._close()

    def _close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        logging.captureWarnings(False)
        self.handler.close()

    def _add_training_facts(self) -> None:
        manager = next((h for h in self.trainer.hooks if hasattr(h, "manifest")), None)
        paths = manager.paths() if manager else {}
        best_file = manager.manifest.data.get("best") if manager else None
        best = manager.manifest.data["files"].get(best_file, {}) if best_file else {}
        self.record["best"] = {"metric": self.trainer.monitor, "value": best.get("value"),
                               "epoch": best.get("epoch")}
        self.record["paths"] = {"run_dir": str(self.run_dir), **paths,
                                "tensorboard": str(self.run_dir / "tb"),
                                "metrics": str(self.run_dir / "metrics.jsonl")}
