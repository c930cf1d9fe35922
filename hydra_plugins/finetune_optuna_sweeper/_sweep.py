"""The sweep: ask a batch of trials, launch their jobs, tell each trial how its job ended.

Each job gets the fixed overrides, the trial's sampled params, and ``sweep.study``,
``sweep.storage``, ``sweep.trial``, by which its ``TrialReporter`` (``finetune.optuna_trial``)
reports every epoch's monitored value and is pruned. Re-running the same command continues the
study: only the missing trials run, their jobs numbered after every job already there, and no
job ever writes into an existing directory. A study refused on the way (``_guard.RefusedStudy``:
a pickle in someone else's ``optuna.db``, a statement past its time limit) ends the sweep in one line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import UserError, message_of
from finetune.files import atomic_write_text
from finetune.metrics import infer_mode
from hydra_plugins.finetune_optuna_sweeper import _study
from hydra_plugins.finetune_optuna_sweeper._search_space import SearchSpace, parse_search_space
from hydra_plugins.finetune_optuna_sweeper.sweeper import SweepError

log = logging.getLogger(__name__)

DIRECTIONS = {"max": "maximize", "min": "minimize"}  # checkpoint.mode -> the study's direction


class StudySweep:
    def __init__(self, *, config: DictConfig, hydra_context: HydraContext, launcher: Launcher,
                 direction: str | None, n_trials: int, n_jobs: int, study_name: str, storage: str | None,
                 sampler: str | dict, pruner: Any, params: dict[str, str]) -> None:
        self.config, self.hydra_context, self.launcher = config, hydra_context, launcher
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.study_name, self.storage = study_name, storage
        self.sampler, self.pruner, self.params = sampler, pruner, params

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        try:
            return self.run_study(arguments)
        except UserError as err:  # the study's storage refused on the way (optuna.db is someone else's)
            raise SweepError(message_of(err)) from None

    def run_study(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config), root=sweep_dir)
        storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        space, study = self.open_study(arguments, storage=storage)
        if retried := _study.retry_interrupted(study, space):
            log.warning(f"trials {retried} were left running by an earlier sweep: failed, and queued again")
        to_go, job = _study.trials_to_go(study, self.n_trials, space), _study.next_job_number(study, sweep_dir)
        log.info(f"study '{self.study_name}' in {storage}: {len(study.trials)} trials so far, {max(to_go, 0)} to run")
        returns = []
        while to_go > 0:
            trials = [study.ask(space.distributions) for _ in range(min(self.n_jobs, to_go))]
            returns.append(self.run_trials(study, trials, space=space, storage=storage, first_job=job))
            job, to_go = job + len(trials), to_go - len(trials)
        searchpath = [o for o in self.config.hydra.overrides.hydra if o.startswith("hydra.searchpath=")]
        print(_study.report(study, storage=storage, monitor=self.config.checkpoint.monitor, extra=searchpath))
        return returns

    def open_study(self, arguments: list[str], *, storage: str) -> tuple[SearchSpace, optuna.Study]:
        """The search space (``params``, then the command line's overrides) and the study, new or continued."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        given = [f"{key}={value}" for key, value in self.params.items()]
        try:
            space = parse_search_space(given + [a for a in arguments if not a.startswith("sweep.")], parser)
            study = _study.open_study(name=self.study_name, storage=storage, direction=self.study_direction(),
                                      sampler=self.sampler, pruner=self.pruner, space=space, seed=self.config.seed)
        except (UserError, ValueError) as err:
            raise SweepError(str(err)) from None
        return space, study

    def study_direction(self) -> str:
        """``maximize`` or ``minimize``: each job returns its best ``checkpoint.monitor`` value in
        ``checkpoint.mode``, so a direction that disagrees is refused."""
        checkpoint = self.config.checkpoint
        wanted = DIRECTIONS[checkpoint.mode or infer_mode(checkpoint.monitor)]
        if self.direction not in (None, wanted):
            raise ValueError(f"hydra.sweeper.direction '{self.direction}' disagrees with checkpoint.monitor "
                             f"'{checkpoint.monitor}', whose best value each job returns: set "
                             f"hydra.sweeper.direction={wanted}, or null to follow the monitor")
        return wanted

    def run_trials(self, study: optuna.Study, trials: list[optuna.Trial], *, space: SearchSpace, storage: str,
                   first_job: int) -> Sequence[JobReturn]:
        """Launch one job per trial, numbered from ``first_job``, and tell each trial how its job ended."""
        batch = [space.overrides(trial.params) for trial in trials]
        for number, (trial, overrides, job_dir) in enumerate(zip(trials, batch, self.job_dirs(batch, first_job)),
                                                             start=first_job):
            for key, value in {"job": number, "job_dir": str(job_dir), "overrides": overrides}.items():
                trial.set_user_attr(key, value)
        launched = [overrides + trial_overrides(study.study_name, storage, trial.number)
                    for overrides, trial in zip(batch, trials)]
        results = self.launcher.launch(launched, initial_job_idx=first_job)
        for trial, result in zip(trials, results):
            log.info(f"trial {trial.number} (job {trial.user_attrs['job']}): "
                     f"{_study.record_outcome(study, trial, result)}")
        return results

    def job_dirs(self, batch: list[list[str]], first: int) -> list[Path]:
        """Where the launcher will put each job, found by composing the job's config as the launcher
        will (which also checks that it composes). An existing directory is refused, never written into."""
        dirs = []
        for number, overrides in enumerate(batch, start=first):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = cfg.hydra.job.id = number
            job_dir = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
            if job_dir.exists():
                raise SweepError(f"job {number}'s directory '{job_dir}' exists: refused to write into it; "
                                 "keep ${hydra.job.num} in hydra.sweep.subdir")
            dirs.append(job_dir)
        return dirs


def trial_overrides(study: str, storage: str, number: int) -> list[str]:
    """What tells a job which trial it is (``finetune.config.SweepConfig``)."""
    return [f"sweep.study={quoted(study)}", f"sweep.storage={quoted(storage)}", f"sweep.trial={number}"]


def quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra override value (a path may hold spaces or ``=``): a quote
    is escaped, and so are the backslashes right before a quote or the end (Hydra's rule)."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text) + "'"
