"""``logger=mlflow`` (``pip install 'finetune[mlflow]'``): one MLflow run per fine-tune, through
`mlflow.MlflowClient` (no global active run: two runs in one process do not mix).

- Params: the flattened config (``optim.lr``, ...), within MLflow's limits: a key over 250 characters is
  cut and ends in a hash of the whole key, a value over 6000 characters is cut and ends in
  ``...[sha256:...]``; both are listed in the ``finetune.params_shortened`` tag.
- Metrics keep TensorBoard's names (``train/loss``, ``lr/<group>``, ``val/acc1``) with the optimizer
  update as ``step``; a character MLflow refuses in a name (from a class name) becomes ``_``.
- Images (the confusion matrix, the LR finder's curve) are artifacts ``<tag>/step_<step>.png``;
  files (``best.<ext>`` unless ``log_weights=false``, ``summary.json``, ``load_report.json``) are artifacts.
- Resume continues the run whose id the training state keeps: the run is set RUNNING again, and a
  metric step already in its history is not logged again (the attempt that died logged it; a resume
  of this project recomputes those steps identically on the same hardware), so no step appears twice.
- The run ends ``FINISHED``, ``FAILED``, or ``KILLED`` (interrupted, or a pruned trial).
- In a sweep, each job is a child run of one parent run per sweep dir (``mlflow.parentRunId``); with
  Optuna, ``optuna.trial`` and ``optuna.study`` tags. The parent is RUNNING while a job runs and FINISHED
  when one ends (after the last job: FINISHED).

A request waits at most ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds (default here 10) with
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` retries (default here 1): a server that is down costs the run one
timeout, then `finetune.loggers.Loggers` drops this tracker's events and counts them.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import UserError
from finetune.files import atomic_write_text, open_lock
from finetune.trackers import TrackerContext

REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
MAX_KEY, MAX_VALUE, BATCH = 250, 6000, 100  # MLflow's key and param value lengths, params per request
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def make(settings: dict[str, Any], context: TrackerContext) -> MlflowLogger:
    for name, value in REQUEST_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowLogger(settings, context)


class MlflowLogger:
    """A `finetune.loggers.Logger` logging into one MLflow run (``run_id``)."""

    def __init__(self, settings: dict[str, Any], context: TrackerContext):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.get("tracking_uri"))
        self.log_weights = bool(settings.get("log_weights", True))
        experiment = experiment_id(self.client, settings.get("experiment_name") or "finetune")
        self.run_id = context.resume_ids.get("mlflow")
        self.logged: dict[str, int] = {}  # metric -> the last step the run already holds (a resume)
        self.params: dict[str, str] = {}
        self.parent_id: str | None = None
        if self.run_id is not None:
            run = self.client.get_run(self.run_id)
            self.params = dict(run.data.params)
            self.logged = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                           for key in run.data.metrics}
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {**{str(k): str(v) for k, v in (settings.get("tags") or {}).items()},
                    "finetune.run_dir": str(context.run_dir)}
            if context.sweep is not None:
                tags |= sweep_tags(self.client, experiment, context.sweep)
                self.parent_id = tags["mlflow.parentRunId"]
                self.client.update_run(self.parent_id, status="RUNNING")
            run_name = settings.get("run_name") or context.run_name
            self.run_id = self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params, shortened = mlflow_params(flatten(config))
        changed = sorted(k for k, v in params.items() if k in self.params and self.params[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in self.params]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])
        tags = {"finetune.params_shortened": ", ".join(shortened)[:MAX_VALUE]} if shortened else {}
        if changed:  # MLflow never changes a logged param: a resume's allowed change is a tag
            tags["finetune.changed_on_resume"] = ", ".join(f"{k}={params[k]}" for k in changed)[:MAX_VALUE]
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.params |= params

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, step) for name, v in ((metric_name(k), v) for k, v in scalars.items())
                   if step > self.logged.get(name, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{metric_name(tag)}/step_{step:08d}.png")

    def log_text(self, tag: str, text: str, *, step: int) -> None:
        self.client.log_text(self.run_id, text, artifact_file=f"{metric_name(tag)}/step_{step:08d}.txt")

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The final and best metrics (the settings are the params already)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(f"hparam/{k}"), float(v), now, 0)
                                                    for k, v in metrics.items() if v is not None])

    def log_artifact(self, path: Path) -> None:
        if self.log_weights or path.suffix not in WEIGHTS_SUFFIXES:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        """End the run; a sweep's parent run is RUNNING while a job of it runs, FINISHED after the last."""
        self.client.set_terminated(self.run_id, status=status)
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status="FINISHED")


def experiment_id(client: Any, name: str) -> str:
    """The id of the experiment ``name``, created when missing (by another process at the same time too)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(f"logger.mlflow.experiment_name '{name}' is a deleted MLflow experiment: restore it "
                            "(mlflow experiments restore) or choose another name")
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created by another job meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def sweep_tags(client: Any, experiment: str, sweep: dict[str, Any]) -> dict[str, str]:
    """A sweep job's tags: its parent run (one per sweep dir, created by the first job), job and trial."""
    tags = {"mlflow.parentRunId": parent_run(client, experiment, Path(sweep["dir"])), "finetune.job": str(sweep["job"])}
    if sweep.get("trial") is not None:
        tags |= {"optuna.trial": str(sweep["trial"]), "optuna.study": str(sweep.get("study"))}
    return tags


def parent_run(client: Any, experiment: str, sweep_dir: Path) -> str:
    """The sweep's parent run: its id in ``SWEEP_DIR/.mlflow_parent_run`` (under a lock, so that jobs
    started together, by one process or several machines, agree), created by the first job."""
    record, lock = sweep_dir / ".mlflow_parent_run", sweep_dir / ".mlflow_parent_run.lock"
    import fcntl

    fd = open_lock(lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if record.is_file():
            run_id = record.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{32}", run_id):
                return run_id
        run = client.create_run(experiment, run_name=f"sweep {sweep_dir.name}",
                                tags={"finetune.sweep_dir": str(sweep_dir)})
        atomic_write_text(record, run.info.run_id + "\n")
        return run.info.run_id
    finally:
        os.close(fd)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``group.key`` -> value.

    >>> flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0})
    {'optim.lr': 0.1, 'optim.betas': [0.9, 0.99], 'seed': 0}
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def mlflow_params(flat: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """``flat`` within MLflow's limits: keys and values as text, the long ones cut with a hash
    (never an error); the keys that were shortened.

    >>> params, cut = mlflow_params({"a" * 300: "x" * 7000, "b": None})
    >>> [(len(k), len(v) <= 6000) for k, v in params.items()], params["b"], cut == ["a" * 300]
    ([(250, True), (1, True)], 'None', True)
    """
    params, shortened = {}, []
    for key, value in flat.items():
        text = str(value)
        name = metric_name(key)
        if len(name) > MAX_KEY:
            name = name[:MAX_KEY - 17] + "~" + hashlib.sha256(key.encode()).hexdigest()[:16]
        if len(text) > MAX_VALUE:
            text = text[:MAX_VALUE - 80] + f"...[sha256:{hashlib.sha256(text.encode()).hexdigest()}]"
        if (name, text) != (key, str(value)):
            shortened.append(key)
        params[name] = text
    return params, shortened


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a key as ``_``.

    >>> metric_name("val_class/chat: noir?")
    'val_class/chat: noir_'
    """
    return re.sub(r"[^\w\-./ :]", "_", name)
