"""The study behind a sweep: opened or continued, each job's outcome told to its trial, the best trial shown.

A trial's user attributes record its job: ``job`` (number), ``job_dir``, ``overrides`` (what the
job was launched with, ``sweep.*`` left out), ``status`` (its ``summary.json``'s) and ``error``;
a retried trial's, ``retry_of`` (the number of the trial it replaces). Job numbers are trial numbers
plus the study's ``finetune.first_job``, so that sweepers sharing a study never pick the same job dir.
A continued study may be someone else's: what is read back of it is checked for its type (and
shown with control characters escaped), and its storage is a `_guard.GuardedStorage`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, Trial, TrialState

from finetune import cli
from finetune.optuna_trial import PRUNER_ATTR, build_pruner
from hydra_plugins.finetune_optuna_sweeper._guard import RefusedStudy, escaped, open_storage, shown
from hydra_plugins.finetune_optuna_sweeper._search_space import SearchSpace

FINISHED = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}  # -> words
FIXED_ATTR = "finetune.fixed_overrides"  # the study's user attribute: what every job of it was given
FIRST_JOB_ATTR = "finetune.first_job"  # the study's user attribute: the job number of its trial 0
# ``sampler: NAME`` -> the optuna.samplers class, seeded with the config's ``seed``.
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler",
            "nsgaii": "NSGAIISampler", "qmc": "QMCSampler", "gp": "GPSampler"}
NEEDS = {"CmaEsSampler": "cmaes", "QMCSampler": "scipy", "GPSampler": "scipy"}  # optuna samplers' own extras
MAX_JOB = 1_000_000  # a job number read back from a study or a sweep dir above this is ignored
JOB_DIR = re.compile(r"[0-9]{1,7}")  # a job's directory name (str.isdigit would take "²", which int() refuses)


def open_study(*, name: str, storage: str, direction: str, sampler: str | Mapping, pruner: Any,
               space: SearchSpace, seed: int, heartbeat_s: int | None = None) -> optuna.Study:
    """Create the study, or load it to continue it with the same fixed overrides. Its storage is
    guarded (`_guard.open_storage`), and an existing study is checked before optuna loads it.
    ``heartbeat_s``: the study is shared with other sweepers (optuna's heartbeat on; see `fail_stale`),
    and the sampler's seed gets a random part: concurrent sweepers must not propose the same trials
    (their interleaving makes a shared study's order unrepeatable anyway)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper says what happens, once
    guarded = open_storage(storage, heartbeat_s=heartbeat_s)
    guarded.check_study(name)
    study = optuna.create_study(study_name=name, storage=guarded, direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ValueError(f"study '{name}' in '{storage}' was created to {study.direction.name.lower()}, "
                         f"not to {direction}: start another with hydra.sweeper.study_name=NEW_NAME")
    check_same_fixed_overrides(study, space.fixed)
    offset = len(study.trials) + (secrets.randbelow(1 << 30) if heartbeat_s else 0)
    study.sampler = build_sampler(sampler, space, seed=seed, offset=offset)
    study.pruner = build_pruner(pruner)
    study.set_user_attr(PRUNER_ATTR, pruner)  # what each job's TrialReporter prunes with
    return study


def check_same_fixed_overrides(study: optuna.Study, fixed: dict[str, str]) -> None:
    """A continued study must run the same experiment: trials given other data or settings
    would not be comparable with those already in it."""
    before = study.user_attrs.get(FIXED_ATTR)
    if before is None:
        study.set_user_attr(FIXED_ATTR, sorted(fixed.values()))
        return
    if not (isinstance(before, list) and all(isinstance(o, str) for o in before)):
        raise RefusedStudy(f"study '{study.study_name}' has a user attribute '{FIXED_ATTR}' that is not a list of "
                           f"overrides ({shown(before)}): refused to continue it; start a new study: "
                           "hydra.sweeper.study_name=NEW or hydra.sweep.dir=NEW_DIR")
    added, dropped = set(fixed.values()) - set(before), set(before) - set(fixed.values())
    if added or dropped:
        change = escaped(", ".join([f"+{o}" for o in sorted(added)] + [f"-{o}" for o in sorted(dropped)]))
        raise ValueError(f"study '{study.study_name}' was run with other overrides ({change}): continue it with "
                         "the same ones, or start another with hydra.sweeper.study_name=NEW_NAME "
                         "or hydra.sweep.dir=NEW_DIR")


def build_sampler(spec: str | Mapping, space: SearchSpace, *, seed: int, offset: int) -> optuna.samplers.BaseSampler:
    """The sampler ``spec`` names: one of ``SAMPLERS`` (seeded with ``seed``) or
    ``{_target_: optuna.samplers.NAME, ...}``. A grid gets the search space; any other seeded
    sampler gets its seed + ``offset`` (the trials already in the study), so a continued study does
    not replay the proposals of its first run."""
    if isinstance(spec, str):
        if spec not in SAMPLERS:
            raise ValueError(f"hydra.sweeper.sampler '{spec}' is unknown: use one of {', '.join(SAMPLERS)} "
                             "or {_target_: optuna.samplers.NAME, ...}")
        spec = {"_target_": f"optuna.samplers.{SAMPLERS[spec]}", "seed": seed}
    spec = dict(spec)
    needed = NEEDS.get(str(spec.get("_target_")).rpartition(".")[2])
    if needed and importlib.util.find_spec(needed) is None:
        raise ValueError(f"hydra.sweeper.sampler {spec['_target_']} needs the package '{needed}', which is not "
                         f"installed: pip install {needed}, or choose another sampler")
    if spec.get("_target_") == "optuna.samplers.GridSampler":
        spec["search_space"] = space.grid()
    elif spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + offset
    return instantiate(spec, _convert_="all")


def retry_interrupted(study: optuna.Study, space: SearchSpace) -> list[int]:
    """Trials a killed sweep left running: failed now, and queued again (`retry`). For a study of
    one sweeper (its sweep dir's): another one's running trials would be taken for dead."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        retry(study, trial, space)
        tell(study, trial.number, TrialState.FAIL)
    return [t.number for t in stale]


def retry(study: optuna.Study, trial: FrozenTrial, space: SearchSpace) -> None:
    """Queue ``trial`` again with the same params (those still in ``space``: the others are sampled anew)."""
    params = {key: value for key, value in trial.params.items() if in_space(space, key, value)}
    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})


def fail_stale(study: optuna.Study, space: SearchSpace) -> list[int]:
    """In a shared study: fail, and queue again (`retry`), the running trials whose sweeper has been silent
    for ``heartbeat_s`` (killed, or its machine lost), by optuna's heartbeat; their numbers. Each is failed
    by one sweeper only, which queues it (optuna calls the storage's callback for the trials this process
    failed)."""
    failed: list[int] = []

    def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, trial, space)
        failed.append(trial.number)

    study._storage.stale_trial_callback = requeue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def ask(study: optuna.Study, space: SearchSpace) -> Trial:
    """``study.ask``, without optuna's warning that heartbeats are meant for ``optimize()``: the sweeper
    beats for its trials itself (`_sweep.StudySweep.run_trials`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask(space.distributions)


def in_space(space: SearchSpace, key: str, value: Any) -> bool:
    """Whether ``value`` is one ``space`` could sample for ``key``."""
    dist = space.distributions.get(key)
    try:
        return dist is not None and dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def trials_to_go(study: optuna.Study, n_trials: int, space: SearchSpace) -> int:
    """How many trials the study still lacks: finished ones count, those a retry replaces don't;
    a grid has no more trials than points."""
    if isinstance(study.sampler, optuna.samplers.GridSampler):
        n_trials = min(n_trials, math.prod(len(values) for values in space.grid().values()))
    trials = study.get_trials(deepcopy=False)
    retried = {r for t in trials if type(r := t.user_attrs.get("retry_of")) is int}
    return n_trials - sum(t.state in FINISHED and t.number not in retried for t in trials)


def first_job_number(study: optuna.Study, sweep_dir: Path) -> int:
    """The job number of the study's trial 0 (`FIRST_JOB_ATTR`): the first sweeper of a new study sets it
    after every job dir there (a second study in a sweep dir numbers its jobs after the first's), so that
    trial N's job is always this + N, whichever sweeper runs it. Sweepers that start together set the same."""
    first = study.user_attrs.get(FIRST_JOB_ATTR)
    if first is None:
        first = max(0, next_job_number(study, sweep_dir) - len(study.trials))
        study.set_user_attr(FIRST_JOB_ATTR, first)
    if type(first) is not int or not 0 <= first <= MAX_JOB:
        raise RefusedStudy(f"study '{study.study_name}' has a user attribute '{FIRST_JOB_ATTR}' that is not a job "
                           f"number ({shown(first)}): refused to continue it; start a new study: "
                           "hydra.sweeper.study_name=NEW or hydra.sweep.dir=NEW_DIR")
    return first


def next_job_number(study: optuna.Study, sweep_dir: Path) -> int:
    """After every job this study or this sweep dir has seen (numbered dirs on disk included).
    Numbers that are not ints from 0 to `MAX_JOB` (someone else's study or dir) are ignored."""
    numbers = [t.user_attrs.get("job") for t in study.get_trials(deepcopy=False)]
    numbers += [int(p.name) for p in sweep_dir.iterdir() if JOB_DIR.fullmatch(p.name) and p.is_dir()]
    return max((n for n in numbers if type(n) is int and 0 <= n <= MAX_JOB), default=-1) + 1


def record_outcome(study: optuna.Study, trial: Trial, job: JobReturn) -> str:
    """Tell ``trial`` how its job ended: COMPLETE with its value, PRUNED, or FAIL (a failed job, or a
    value that is missing or not finite: optuna never sees NaN or inf). Returns it in words."""
    job_dir = Path(job.hydra_cfg.hydra.runtime.output_dir)
    summary = read_summary(job_dir / "summary.json")
    status = summary.get("status", "failed")
    value = job.return_value if job.status == JobStatus.COMPLETED else None
    if status == "pruned":
        state = TrialState.PRUNED  # its value: the last one its job reported
    elif status == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
        state = TrialState.COMPLETE
    else:
        state = TrialState.FAIL
    error = summary.get("error") or ("" if summary else f"no readable {job_dir / 'summary.json'}")
    try:
        trial.set_user_attr("status", status)
        if error:
            trial.set_user_attr("error", str(error)[:500])
        tell(study, trial, state, float(value) if state == TrialState.COMPLETE else None)
    except UpdateFinishedTrialError:  # its heartbeat came too late: another sweeper failed it and queued it again
        return f"{status}, not recorded: the trial was taken for dead (raise hydra.sweeper.heartbeat_s)"
    return f"{FINISHED[state]} ({value:.4g})" if state == TrialState.COMPLETE else f"{FINISHED[state]} ({error})"


def read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def tell(study: optuna.Study, trial: Trial | int, state: TrialState, value: float | None = None) -> None:
    """``study.tell``, outside ``optimize()``."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:  # GridSampler calls study.stop() once the grid is done: for optimize() only
        if "Study.stop" not in str(err):
            raise


def report(study: optuna.Study, *, storage: str, monitor: str, extra: list[str]) -> str:
    """What the study holds, and the best trial as a command to paste: its job's overrides, then ``extra``."""
    trials = study.get_trials(deepcopy=False, states=tuple(FINISHED))
    counts = ", ".join(f"{sum(t.state == state for t in trials)} {word}" for state, word in FINISHED.items())
    lines = [f"study '{study.study_name}' ({storage}): {len(trials)} trials, {counts}"]
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return "\n".join(lines + ["no trial completed: no best trial"])
    best = study.best_trial
    overrides = best.user_attrs.get("overrides")
    if not (isinstance(overrides, list) and overrides and all(isinstance(o, str) for o in overrides)):
        overrides = [f"{k}={v}" for k, v in best.params.items()]
    command = escaped(cli.command("finetune", *overrides, *extra), limit=None)
    lines.append(f"best trial {best.number} ({monitor} {best.value:.4g}): {command}")
    if isinstance(best.user_attrs.get("job_dir"), str):
        lines.append(f"  its run: {escaped(best.user_attrs['job_dir'])}")
    return "\n".join(lines)

