"""``run(cfg)``: one fine-tune, start to finish. Reads like a table of contents."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from finetune import builders
from finetune.checkpoint import atomic_write_text
from finetune.config import check_config
from finetune.errors import UserError
from finetune.runtime import setup_runtime

log = logging.getLogger("finetune")


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, float]:
    """Fine-tune as ``cfg`` says, writing everything into ``run_dir`` (default: Hydra's output dir).

    Returns the final metrics (the last epoch's, plus ``best/value`` of the monitored metric).
    """
    run_dir = resolve_run_dir(run_dir)
    started = time.time()
    with RunLog(run_dir) as summary:
        check_config(cfg)
        if cfg.resume is not None:
            raise UserError(f"resume '{cfg.resume}' is not supported yet: start a new run without resume")
        rt = setup_runtime(seed=cfg.seed, device=cfg.trainer.device, precision=cfg.trainer.precision,
                           deterministic=cfg.trainer.deterministic)
        split = builders.build_split(cfg.data, run_dir=run_dir)
        model, spec = builders.build_network(cfg.model, head=cfg.head, num_classes=len(split.class_names))
        builders.load_weights(cfg.model, model, spec, head_init=cfg.head.init, run_dir=run_dir)
        model = model.to(rt.device)
        loaders = builders.build_loaders(cfg.data, split, spec, seed=cfg.seed, pin_memory=rt.device.type == "cuda")
        trainer = builders.build_trainer(cfg, model=model, spec=spec, loaders=loaders, rt=rt, run_dir=run_dir,
                                         class_names=split.class_names)
        summary.track(trainer)
        state = trainer.fit(loaders.train, loaders.val)
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
        self.trainer = None
        self.record: dict = {"status": "running", "run_dir": str(run_dir)}
        self.started = time.time()

    def __enter__(self) -> "RunLog":
        root = logging.getLogger()
        root.addHandler(self.handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        return self

    def track(self, trainer) -> None:
        self.trainer = trainer

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
            status = "interrupted" if exc_type is KeyboardInterrupt else "failed"
            self.record |= {"status": status, "error": f"{exc_type.__name__}: {exc}"}
        if self.trainer is not None:
            self._add_training_facts()
            for hook in self.trainer.hooks:
                hook.close()
        self.record["wall_seconds"] = round(time.time() - self.started, 2)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(self.record, indent=2) + "\n")
        logging.getLogger().removeHandler(self.handler)
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
