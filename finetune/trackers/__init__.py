"""The trackers ``logger=[tensorboard,csv,mlflow,wandb]`` selects: one module and one YAML each.

A tracker is a `finetune.loggers.Logger` made by a ``make(settings, context)`` function listed in
`TRACKERS`; `build_trackers` makes those the config turned on, as one `finetune.loggers.Loggers`.
A tracker whose library is missing is a one-line `UserError` (the extra to install); one that cannot
start (a server down) is one warning, and the run goes on with the others.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.loggers import Logger, Loggers

log = logging.getLogger("finetune")

# name -> (module, the pip extra its library comes with; None: a dependency of finetune)
TRACKERS: dict[str, tuple[str, str | None]] = {
    "tensorboard": ("finetune.trackers.tensorboard_tracker", None),
    "csv": ("finetune.trackers.csv_tracker", None),
    "mlflow": ("finetune.trackers.mlflow_tracker", "mlflow"),
    "wandb": ("finetune.trackers.wandb_tracker", "wandb"),
}


@dataclass
class TrackerContext:
    """What a tracker knows of the run besides its own settings."""

    run_dir: Path
    run_name: str  # the run dir's name; a sweep's job: the job's number
    purge_step: int | None = None  # a resume: events from this step on were logged by an attempt that died
    resume_ids: dict[str, str] = field(default_factory=dict)  # tracker -> the run id a resume continues
    sweep: dict[str, Any] | None = None  # in a sweep: dir, job, and with Optuna study and trial


def build_trackers(sections: dict[str, dict[str, Any] | None], context: TrackerContext) -> Loggers:
    """The trackers whose section is set (``logger.<name>`` not null), in `TRACKERS` order."""
    made: dict[str, Logger] = {}
    failed: dict[str, str] = {}
    for name, (module_name, extra) in TRACKERS.items():
        settings = sections.get(name)
        if settings is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"logger={name} needs {err.name}: pip install 'finetune[{extra}]'") from err
        try:
            made[name] = module.make(settings, context)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a tracker that cannot start never stops the run
            failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning(f"logger {name}: could not start ({failed[name]}); training continues without it")
    loggers = Loggers(made)
    for name, error in failed.items():
        loggers.failed[name], loggers.dropped[name] = error, 0
    return loggers


URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s/]+@")
SECRET_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)  # as finetune.config's


def without_passwords(config: Any, *, options: bool = False) -> Any:
    """``config`` with the password of every URL in it as ``***`` (a tracker logs the config: a
    ``sweep.storage`` URL would carry its password to the tracking server), and every credential under a
    ``storage_options`` table too (``checkpoint.storage_options.secret``, resolved from the environment).

    >>> without_passwords({"sweep": {"storage": "postgresql://ft:s3cret@db/optuna"}, "n": [1]})
    {'sweep': {'storage': 'postgresql://ft:***@db/optuna'}, 'n': [1]}
    >>> without_passwords({"storage_options": {"key": "AKIA", "client_kwargs": {"region_name": "eu"}}})
    {'storage_options': {'key': '***', 'client_kwargs': {'region_name': 'eu'}}}
    """
    if isinstance(config, dict):
        return {k: "***" if options and isinstance(v, str) and SECRET_NAME.search(str(k))
                else without_passwords(v, options=options or k == "storage_options") for k, v in config.items()}
    if isinstance(config, list):
        return [without_passwords(v, options=options) for v in config]
    return URL_PASSWORD.sub(r"\1***@", config) if isinstance(config, str) else config
