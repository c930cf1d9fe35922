"""The sweep: ask a batch of trials, launch their jobs, tell each trial how its job ended.

Each job gets the fixed overrides, the trial's sampled params, and ``sweep.study``,
``sweep.storage``, ``sweep.trial``, by which its ``TrialReporter`` (``finetune.optuna_trial``)
reports every epoch's monitored value and is pruned. A job's number, and so its directory, is
its trial's (`_study.first_job_number`), and no job ever writes into an existing directory.

Two ways to run, by ``hydra.sweeper.storage``:

* null (the sweep dir's ``optuna.db``): one sweeper per study, ``n_trials`` the study's total.
  Re-running the same command continues it: trials a killed sweep left running are retried at
  once, and only the missing trials run.
* set (a database URL, or ``journal:PATH`` on a shared filesystem): any number of sweepers, on any
  machines, share the study, each running ``n_trials`` trials (as optuna's ``optimize`` counts). Each
  beats optuna's heartbeat for its running trials; the trials of a sweeper silent for ``heartbeat_s``
  are failed and queued again by the next sweeper that asks for a trial.

A study refused on the way (``_guard.RefusedStudy``: a pickle in someone else's ``optuna.db``, a
statement past its time limit) ends the sweep in one line.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages._heartbeat import get_heartbeat_thread  # optuna's own, as optimize() uses it
from optuna.trial import TrialState

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
                 heartbeat_s: int, sampler: str | dict, pruner: Any, params: dict[str, str]) -> None:
        self.config, self.hydra_context, self.launcher = config, hydra_context, launcher
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.study_name, self.storage = study_name, storage
        self.heartbeat_s = heartbeat_s if storage is not None else None  # shared studies only
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
        first_job = _study.first_job_number(study, sweep_dir)
        if self.heartbeat_s is None:
            if retried := _study.retry_interrupted(study, space):
                log.warning(f"trials {retried} were left running by an earlier sweep: failed, and queued again")
            to_go = _study.trials_to_go(study, self.n_trials, space)
        else:
            to_go = self.n_trials  # this sweeper's, whatever the others run
        log.info(f"study '{self.study_name}' in {storage}: {len(study.trials)} trials so far, {max(to_go, 0)} to run")
        returns = []
        while to_go > 0 and not self.grid_done(study):
            if self.heartbeat_s is not None and (stale := _study.fail_stale(study, space)):
                log.warning(f"trials {stale} were left running by a sweeper silent for {self.heartbeat_s} s "
                            "(hydra.sweeper.heartbeat_s): failed, and queued again")
            trials = [_study.ask(study, space) for _ in range(min(self.n_jobs, to_go))]
            returns.append(self.run_trials(study, trials, space=space, storage=storage, first_job=first_job))
            to_go -= len(trials)
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
                                      sampler=self.sampler, pruner=self.pruner, space=space, seed=self.config.seed,
                                      heartbeat_s=self.heartbeat_s)
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

    def grid_done(self, study: optuna.Study) -> bool:
        """Whether a grid has no point left that no trial has taken (other sweepers' included)."""
        return isinstance(study.sampler, optuna.samplers.GridSampler) and self.heartbeat_s is not None \
            and study.sampler.is_exhausted(study)

    def run_trials(self, study: optuna.Study, trials: list[optuna.Trial], *, space: SearchSpace, storage: str,
                   first_job: int) -> list[JobReturn]:
        """Launch one job per trial, numbered ``first_job`` + its trial number, and tell each trial how
        its job ended; optuna's heartbeat (a shared study) beats for each trial meanwhile."""
        batch = [space.overrides(trial.params) for trial in trials]
        numbers = [first_job + trial.number for trial in trials]
        with ExitStack() as beating:
            for trial in trials:
                beating.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
            for trial, number, overrides, job_dir in zip(trials, numbers, batch, self.job_dirs(study, trials, batch,
                                                                                              numbers)):
                for key, value in {"job": number, "job_dir": str(job_dir), "overrides": overrides}.items():
                    trial.set_user_attr(key, value)
            launched = [overrides + trial_overrides(study.study_name, storage, trial.number)
                        for overrides, trial in zip(batch, trials)]
            results = []
            for run in consecutive(numbers):  # a launcher numbers a batch's jobs from its first one
                results += self.launcher.launch(launched[len(results):len(results) + len(run)],
                                                initial_job_idx=run[0])
            for trial, number, result in zip(trials, numbers, results):
                log.info(f"trial {trial.number} (job {number}): {_study.record_outcome(study, trial, result)}")
        return results

    def job_dirs(self, study: optuna.Study, trials: list[optuna.Trial], batch: list[list[str]],
                 numbers: list[int]) -> list[Path]:
        """Where the launcher will put each job, found by composing the job's config as the launcher
        will (which also checks that it composes). An existing directory is refused, never written into
        (the batch's trials are failed first: no other sweeper waits for them)."""
        dirs = []
        for number, overrides in zip(numbers, batch):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = cfg.hydra.job.id = number
            job_dir = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
            if job_dir.exists():
                for trial in trials:
                    _study.tell(study, trial, TrialState.FAIL)
                raise SweepError(f"job {number}'s directory '{job_dir}' exists: refused to write into it; "
                                 "keep ${hydra.job.num} in hydra.sweep.subdir")
            dirs.append(job_dir)
        return dirs


def consecutive(numbers: list[int]) -> list[list[int]]:
    """``numbers`` cut into runs of consecutive ones (other sweepers may take numbers in between).

    >>> consecutive([3, 4, 6, 7, 9])
    [[3, 4], [6, 7], [9]]
    """
    runs = itertools.groupby(enumerate(numbers), key=lambda pair: pair[1] - pair[0])
    return [[number for _, number in run] for _, run in runs]


def trial_overrides(study: str, storage: str, number: int) -> list[str]:
    """What tells a job which trial it is (``finetune.config.SweepConfig``)."""
    return [f"sweep.study={quoted(study)}", f"sweep.storage={quoted(storage)}", f"sweep.trial={number}"]


def quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra override value (a path may hold spaces or ``=``): a quote
    is escaped, and so are the backslashes right before a quote or the end (Hydra's rule)."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text) + "'"
