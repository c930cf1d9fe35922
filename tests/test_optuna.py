"""Optuna searches: the project's sweeper (hydra_plugins/finetune_optuna_sweeper) and the trial
reporter inside each job (finetune/optuna_trial.py).

The end-to-end test runs a real study of tiny jobs from a user's config dir: six cases under
``+experiment``, walked by a seeded grid, where ``diverges`` makes the loss NaN (its trial fails)
and ``long`` reaches a second epoch, where a threshold no accuracy reaches prunes it. Every other
case completes in one epoch. Then the same command again, asking for 6 trials, continues the study.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_image_folder, run_cli, tiny_overrides
from finetune.__main__ import CONFIG_DIR
from finetune.errors import RunPruned, UserError
from finetune.loggers import TensorBoardLogger
from finetune.optuna_trial import PRUNER_ATTR, TrialReporter, build_pruner
from finetune.trainer import TrainState
from hydra_plugins.finetune_optuna_sweeper import _study
from hydra_plugins.finetune_optuna_sweeper._search_space import SearchSpace, parse_search_space
from hydra_plugins.finetune_optuna_sweeper._sweep import quoted

SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: finetune_optuna
hydra:
  sweeper:
    study_name: test
    n_trials: 4
    sampler: {_target_: optuna.samplers.GridSampler, seed: 0}
    pruner: {_target_: optuna.pruners.ThresholdPruner, lower: 2.0, n_warmup_steps: 2}
    params:
      +experiment: choice(ok_a, ok_b, diverges, long, ok_c, ok_d)
"""
ONE_EPOCH = {"trainer": {"max_epochs": 1}}
CASES = {"ok_a": {"optim": {"lr": 0.01}, **ONE_EPOCH}, "ok_b": {"optim": {"lr": 0.003}, **ONE_EPOCH},
         "ok_c": {"optim": {"lr": 0.03}, **ONE_EPOCH}, "ok_d": {"optim": {"lr": 0.001}, **ONE_EPOCH},
         "diverges": {"optim": {"lr": 1.0e30}, **ONE_EPOCH}, "long": {"trainer": {"max_epochs": 3}}}
EXPECTED = {"diverges": TrialState.FAIL, "long": TrialState.PRUNED}  # every other case: COMPLETE
STATUS = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def write_search(root: Path) -> Path:
    (root / "hparams_search").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "hparams_search" / "test.yaml").write_text(SEARCH)
    for name, delta in CASES.items():
        (root / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(delta))
    return root


def files_of(job_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(job_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in job_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_study_records_failed_and_pruned_trials_and_the_same_command_continues_it(tmp_path):
    user, sweep_dir = write_search(tmp_path / "my_conf"), tmp_path / "sweep"
    tiny = [o for o in tiny_overrides(make_image_folder(tmp_path / "images")) if "max_epochs" not in o]
    args = ["-m", "hparams_search=test", f"hydra.searchpath=[file://{user}]", f"hydra.sweep.dir={sweep_dir}", *tiny]
    first = run_cli(args, cwd=tmp_path)

    # A diverged job fails its trial (the sweep's exit status says so), the study goes on.
    assert first.returncode == 1, first.stderr[-3000:]
    assert "job failed: train/loss became nan" in first.stderr and "Traceback" not in first.stderr
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    trials = optuna.load_study(study_name="test", storage=storage).trials
    cases = [t.params["+experiment"] for t in trials]
    assert sorted(cases) == ["diverges", "long", "ok_b", "ok_d"], cases  # the grid's first 4 with seed 0
    for trial, case in zip(trials, cases):
        assert trial.state == EXPECTED.get(case, TrialState.COMPLETE), (case, trial.state, trial.user_attrs)
        job_dir = sweep_dir / str(trial.user_attrs["job"])
        assert trial.user_attrs["job_dir"] == str(job_dir)
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["status"] == STATUS[trial.state] == trial.user_attrs["status"]
        assert yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())["sweep"]["trial"] == trial.number
        if trial.state == TrialState.COMPLETE:
            assert trial.value == summary["best"]["value"] and math.isfinite(trial.value)
    failed = trials[cases.index("diverges")]
    assert failed.value is None and "TrainingDiverged" in failed.user_attrs["error"]
    pruned = trials[cases.index("long")]
    assert sorted(pruned.intermediate_values) == [1, 2] and pruned.value == pruned.intermediate_values[2]
    assert "pruned by the sweep's pruner at epoch 2" in pruned.user_attrs["error"]
    pruned_dir = sweep_dir / str(pruned.user_attrs["job"])
    assert len((pruned_dir / "metrics.jsonl").read_text().splitlines()) == 2  # stopped before its third epoch

    # The best trial, printed as a command to paste, reproduces the trial's best value.
    best = optuna.load_study(study_name="test", storage=storage).best_trial
    line = re.search(rf"^best trial (\d+) \(val/acc1 ([\d.]+)\): ({re.escape(shlex.quote(sys.executable))} -m finetune .*)$",
                     first.stdout, re.MULTILINE)
    assert line and int(line[1]) == best.number, first.stdout[-3000:]
    overrides = shlex.split(line[3])[3:]
    assert f"+experiment={best.params['+experiment']}" in overrides and f"hydra.searchpath=[file://{user}]" in overrides
    assert not [o for o in overrides if o.startswith(("sweep.", "-"))]
    again = run_cli(overrides + [f"hydra.run.dir={tmp_path / 'best'}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "best" / "summary.json").read_text())["best"]["value"] == best.value

    # The same command, 6 trials wanted: only the 2 missing run, numbered after the first jobs,
    # whose directories are left as they were.
    before = {n: files_of(sweep_dir / str(n)) for n in range(4)}
    second = run_cli(args + ["hydra.sweeper.n_trials=6"], cwd=tmp_path)
    assert second.returncode == 1, second.stderr[-3000:]  # the diverged job of the first run still counts
    assert "4 trials so far, 2 to run" in second.stdout
    assert {n: files_of(sweep_dir / str(n)) for n in range(4)} == before
    trials = optuna.load_study(study_name="test", storage=storage).trials
    assert sorted(t.params["+experiment"] for t in trials) == sorted(CASES)  # the whole grid, each case once
    assert [t.user_attrs["job"] for t in trials] == list(range(6))
    assert all(t.state == EXPECTED.get(t.params["+experiment"], TrialState.COMPLETE) for t in trials)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [str(n) for n in range(6)]

    # Continuing with other fixed overrides would mix incomparable trials: refused, in one line.
    third = run_cli(args + ["hydra.sweeper.n_trials=7", "data.batch_size=2"], cwd=tmp_path)
    assert third.returncode == 1 and "Traceback" not in third.stderr
    assert "error: study 'test' was run with other overrides (+data.batch_size=2, -data.batch_size=4)" \
        in third.stderr, third.stderr[-3000:]
    assert not (sweep_dir / "6").exists()


def test_shipped_search_composes_with_the_sweeper():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=lr_freeze"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.finetune_optuna_sweeper.sweeper.OptunaSweeper"
    assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "freeze", "head.dropout"}
    assert cfg.hydra.sweep.dir == "multirun/lr_freeze"  # a stable dir: the same command continues the study
    space = parse_search_space([f"{k}={v}" for k, v in sweeper.params.items()], OverridesParser.create())
    assert space.distributions["optim.lr"] == FloatDistribution(1e-5, 1e-1, log=True)
    assert space.distributions["freeze"] == CategoricalDistribution(["none", "head_only"])


def test_search_space_reads_hydra_optuna_sweeper_syntax():
    space = parse_search_space(["optim.lr=tag(log, interval(1e-5, 1e-1))", "optim.weight_decay=interval(0, 0.1)",
                                "trainer.max_epochs=range(2, 8, 2)", "data.batch_size=tag(log, int(interval(8, 64)))",
                                "head.name=choice(linear, 'mlp head')", "freeze=none,head_only",
                                "data.root=/data/x", "+experiment=mine", "head.name=mlp"], OverridesParser.create())
    assert space.distributions == {
        "optim.lr": FloatDistribution(1e-5, 0.1, log=True), "optim.weight_decay": FloatDistribution(0.0, 0.1),
        "trainer.max_epochs": IntDistribution(2, 6, step=2),  # range() excludes its stop, as in Hydra
        "data.batch_size": IntDistribution(8, 64, log=True),
        "freeze": CategoricalDistribution(["none", "head_only"])}
    assert space.fixed == {"data.root": "data.root=/data/x", "+experiment": "+experiment=mine",
                           "head.name": "head.name=mlp"}  # a later override of a swept key pins it
    assert space.overrides({"optim.lr": 1.2345678901234e-4, "freeze": "head_only"}) == [
        "data.root=/data/x", "+experiment=mine", "head.name=mlp", "optim.lr=0.00012345678901234", "freeze=head_only"]
    spaced = parse_search_space(["head.name=choice(linear, 'mlp head')"], OverridesParser.create())
    assert spaced.overrides({"head.name": "mlp head"}) == ["head.name=mlp\\ head"]  # as Hydra reads it back
    assert parse_search_space(["a=range(1, 4)", "b=choice(x, y)"], OverridesParser.create()).grid() == {
        "a": [1, 2, 3], "b": ["x", "y"]}
    with pytest.raises(ValueError, match=r"sweep param 'a=range\(3, 1\)': the range is empty"):
        parse_search_space(["a=range(3, 1)"], OverridesParser.create())


@pytest.mark.parametrize("text", ["sqlite:////tmp/a b=c/optuna.db", "it's", "back\\slash\\", "q\\'"])
def test_quoted_values_reach_the_job_unchanged(text):
    assert OverridesParser.create().parse_override(f"sweep.storage={quoted(text)}").value() == text


def test_pruner_specs_build_only_optuna_pruners():
    assert type(build_pruner("median")).__name__ == "MedianPruner"
    assert type(build_pruner("none")).__name__ == "NopPruner"
    assert build_pruner({"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5})._lower == 0.5
    with pytest.raises(UserError, match="'optuna.pruners.os.system' is not a pruner"):
        build_pruner({"_target_": "optuna.pruners.os.system"})
    with pytest.raises(UserError, match="'builtins.eval' is not a pruner"):
        build_pruner({"_target_": "builtins.eval"})
    with pytest.raises(UserError, match="pruner 'medain' is unknown: use one of median, hyperband, none"):
        build_pruner("medain")


class Scalars:
    """What the trainer hands its hooks, reduced to what the reporter reads."""

    def __init__(self, acc1: float):
        self.acc1 = acc1

    def scalars(self) -> dict[str, float]:
        return {"val/acc1": self.acc1}


def test_trial_reporter_reports_each_epoch_skips_nan_and_raises_when_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5,
                                      "n_warmup_steps": 2})
    trial = study.ask()
    logger = TensorBoardLogger(tmp_path / "tb")
    reporter = TrialReporter(study="s", storage=storage, trial=trial.number, monitor="val/acc1", logger=logger)
    reporter.on_epoch_end(TrainState(epoch=1), {}, Scalars(0.1), True)  # still warming up: not pruned
    reporter.on_epoch_end(TrainState(epoch=2), {}, Scalars(float("nan")), False)  # never reaches optuna
    with pytest.raises(RunPruned, match=r"pruned by the sweep's pruner at epoch 3 \(val/acc1 0\.2000\)"):
        reporter.on_epoch_end(TrainState(epoch=3, global_step=30), {}, Scalars(0.2), False)
    reporter.close(), logger.close()
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == {1: 0.1, 3: 0.2}
    events = EventAccumulator(str(tmp_path / "tb")).Reload()  # the pruning is in TensorBoard too
    (text,) = events.Tensors("sweep/pruned/text_summary")
    assert text.step == 30 and b"pruned by the sweep's pruner at epoch 3" in text.tensor_proto.string_val[0]

    failed = study.ask()  # a shared study: another sweeper took this trial for dead while its job ran
    on = TrialReporter(study="s", storage=storage, trial=failed.number, monitor="val/acc1")
    study.tell(failed, state=TrialState.FAIL)
    on.on_epoch_end(TrainState(epoch=1), {}, Scalars(0.0), True)  # the run goes on, reporting to no trial
    assert on.trial is None and study.trials[failed.number].intermediate_values == {}
    on.close()

    study.tell(trial, state=TrialState.PRUNED)  # a job dir resumed by hand after its sweep: reports nothing
    late = TrialReporter(study="s", storage=storage, trial=trial.number, monitor="val/acc1")
    late.on_epoch_end(TrainState(epoch=4), {}, Scalars(0.0), False)
    late.close()
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == {1: 0.1, 3: 0.2}
    with pytest.raises(UserError, match="sweep.trial 7 of study 's' is not in"):
        TrialReporter(study="s", storage=storage, trial=7, monitor="val/acc1")


def test_trials_a_killed_sweep_left_running_are_failed_and_asked_again(tmp_path):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    space = SearchSpace(distributions={"x": FloatDistribution(0.0, 1.0)})
    study.tell(study.ask(space.distributions), 0.5)
    stale = study.ask(space.distributions)  # its sweep was killed while its job ran
    stale.set_user_attr("job", 3)
    assert _study.retry_interrupted(study, space) == [stale.number]
    assert study.trials[stale.number].state == TrialState.FAIL
    assert _study.trials_to_go(study, 3, space) == 2  # the killed trial is replaced, not counted
    retry = study.ask(space.distributions)
    assert retry.params == stale.params and retry.user_attrs["retry_of"] == stale.number

    sweep_dir = tmp_path / "sweep"
    for name in ("0", "7", "notes"):
        (sweep_dir / name).mkdir(parents=True)
    assert _study.next_job_number(study, sweep_dir) == 8  # after the dirs on disk and the jobs the study knows
    (sweep_dir / "7").rmdir()
    assert _study.next_job_number(study, sweep_dir) == 4


@pytest.mark.parametrize("storage", ["sqlite:///{}/optuna.db", "journal:{}/optuna.log"])
def test_a_shared_studys_silent_trials_are_failed_and_queued_again_and_live_ones_are_not(tmp_path, storage):
    """Two sweepers of one study (a heartbeat every second, a 6 s grace): one stops beating, as a killed
    one does; the other fails its trial once, queues it again with the same params, and keeps its own.
    (An RDB storage beats by optuna's heartbeat; a journal, which optuna gives none, by a system attribute.)
    The grace is 6 beats: with 2 (a 2 s grace) a busy CI machine once left the live sweeper's beat thread
    unscheduled for 2 s, and its trial was taken for dead too."""
    space = SearchSpace(distributions={"x": FloatDistribution(0.0, 1.0)})
    sweepers = [_study.open_study(name="s", storage=storage.format(tmp_path), direction="maximize",
                                  sampler="random", pruner="none", space=space, seed=0, heartbeat_s=6)
                for _ in range(2)]
    dead, live = sweepers
    silent = _study.ask(dead, space)
    dead._storage.record_heartbeat(silent._trial_id)  # its last beat
    beating = _study.ask(live, space)
    assert beating.params != silent.params  # same seed, yet the two samplers propose apart
    with get_heartbeat_thread(beating._trial_id, live._storage):
        time.sleep(7.0)  # the silent trial's last beat is older than the grace; the live one beat every second
        assert _study.fail_stale(live, space) == [silent.number]
        assert _study.fail_stale(dead, space) == []  # failed once, queued once
    states = {t.number: t.state for t in live.get_trials(deepcopy=False)}
    assert (states[silent.number], states[beating.number]) == (TrialState.FAIL, TrialState.RUNNING)
    retry = _study.ask(live, space)
    assert retry.params == silent.params and retry.user_attrs["retry_of"] == silent.number
    assert _study.first_job_number(live, tmp_path) == _study.first_job_number(dead, tmp_path) == 0


def test_samplers_by_name_or_target_and_a_continued_study_gets_a_fresh_seed():
    space = SearchSpace(distributions={"x": CategoricalDistribution(["a", "b"])})
    assert type(_study.build_sampler("random", space, seed=0, offset=0)).__name__ == "RandomSampler"
    assert type(_study.build_sampler("nsgaii", space, seed=0, offset=0)).__name__ == "NSGAIISampler"
    grid = _study.build_sampler({"_target_": "optuna.samplers.GridSampler", "seed": 1}, space, seed=0, offset=5)
    assert grid._search_space == {"x": ["a", "b"]}

    def proposals(offset: int) -> list:
        sampler = _study.build_sampler({"_target_": "optuna.samplers.RandomSampler", "seed": 0}, space, seed=0,
                                       offset=offset)
        study = optuna.create_study(sampler=sampler)
        return [study.ask({"y": FloatDistribution(0.0, 1.0)}).params["y"] for _ in range(3)]

    assert proposals(0) == proposals(0) and proposals(3) != proposals(0)
    with pytest.raises(ValueError, match="sampler 'bayes' is unknown: use one of tpe, random, grid"):
        _study.build_sampler("bayes", space, seed=0, offset=0)


def finished_job(job_dir: Path, *, status: str | None, returned: object) -> JobReturn:
    """What a launcher hands back for a job that wrote ``summary.json`` with ``status`` (none if None)."""
    job_dir.mkdir(parents=True)
    if status is not None:
        (job_dir / "summary.json").write_text(json.dumps({"status": status, "error": f"{status} for a reason"}))
    job = JobReturn(hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job_dir)}}}))
    job.status = JobStatus.FAILED if isinstance(returned, Exception) else JobStatus.COMPLETED
    job.return_value = returned
    return job


@pytest.mark.parametrize("status, returned, state, value", [
    ("completed", 0.75, TrialState.COMPLETE, 0.75),
    ("completed", float("nan"), TrialState.FAIL, None),  # optuna never sees NaN or inf
    ("completed", float("inf"), TrialState.FAIL, None),
    ("completed", None, TrialState.FAIL, None),
    ("failed", None, TrialState.FAIL, None),  # the job caught its error and returned None
    ("pruned", None, TrialState.PRUNED, 0.25),  # the last value the job reported
    ("completed", RuntimeError("boom"), TrialState.FAIL, None),  # the job raised past the task function
    (None, None, TrialState.FAIL, None),  # no summary.json: it died before writing one
])
def test_each_job_outcome_is_told_to_its_trial(tmp_path, status, returned, state, value):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    trial.report(0.25, step=1)
    said = _study.record_outcome(study, trial, finished_job(tmp_path / "0", status=status, returned=returned))
    (told,) = study.trials
    assert (told.state, told.value) == (state, value) and said.startswith(_study.FINISHED[state])
    assert told.user_attrs["status"] == (status or "failed")


@pytest.mark.slow
def test_a_journal_study_run_through_the_slurm_launcher_numbers_its_jobs_by_trial(tmp_path):
    """hydra.sweeper.storage=journal:PATH (a shared study): n_trials counts each sweeper's trials, and a
    second sweeper launching through submitit (hydra/launcher=slurm_local, SLURM's path on this machine)
    runs its batch as jobs numbered by their trials; each job reports to the journal from its own process."""
    journal, sweep_dir = tmp_path / "shared" / "optuna.log", tmp_path / "sweep"
    journal.parent.mkdir()
    tiny = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=2)
    args = ["-m", "hparams_search=lr_freeze", f"hydra.sweeper.storage=journal:{journal}", "hydra.sweeper.n_trials=1",
            "hydra.sweeper.study_name=shared", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.pruner=none", *tiny]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(args + ["hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=slurm_local"],
                     cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 trials so far, 2 to run" in second.stdout

    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert [(t.number, t.state) for t in study.trials] == [(n, TrialState.COMPLETE) for n in range(3)]
    for trial in study.trials:
        job_dir = sweep_dir / str(trial.number)
        assert trial.user_attrs["job"] == trial.number and trial.user_attrs["job_dir"] == str(job_dir)
        assert sorted(trial.intermediate_values) == [1, 2]  # reported by the job itself, every epoch
        assert trial.value == json.loads((job_dir / "summary.json").read_text())["best"]["value"]
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2  # trials 1 and 2 ran through submitit
    assert not (sweep_dir / "optuna.db").exists()


def test_a_heartbeat_too_short_to_tell_a_live_sweeper_from_a_dead_one_is_refused():
    from hydra_plugins.finetune_optuna_sweeper.sweeper import OptunaSweeper, SweepError

    settings = dict(direction=None, n_trials=1, n_jobs=1, study_name="s", storage=None, sampler="tpe", pruner="none",
                    params={})
    assert OptunaSweeper(**settings, heartbeat_s=2).settings["heartbeat_s"] == 2
    with pytest.raises(SweepError, match=r"^error: hydra\.sweeper\.heartbeat_s must be at least 2 \(seconds\), got 1$"):
        OptunaSweeper(**settings, heartbeat_s=1)
