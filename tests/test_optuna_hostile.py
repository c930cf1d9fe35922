"""Someone else's sweep dir: a study (``optuna.db``) made to run code, hang, or break the sweeper.

The sweeper's storage (hydra_plugins/finetune_optuna_sweeper/_guard.py) never lets a sampler
unpickle what the database holds, keeps its own sampler's pickles out of the database, and gives
every storage request a time limit; what the sweeper reads back of a study is checked. The
end-to-end tests continue planted studies with the real CLI: each must end in one ``error:`` line,
before any job, and the planted code must never run.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import make_image_folder, run_bounded, run_cli, run_together, tiny_overrides
from finetune.errors import UserError
from finetune.optuna_trial import PRUNER_ATTR, TrialReporter, build_pruner
from hydra_plugins.finetune_optuna_sweeper import _study
from hydra_plugins.finetune_optuna_sweeper._guard import (MAX_DECODED, RefusedStudy, find_pickled, open_storage,
                                                          pickle_looking)
from hydra_plugins.finetune_optuna_sweeper._search_space import SearchSpace, parse_search_space

SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: finetune_optuna
hydra:
  sweeper:
    study_name: test
    n_trials: 2
    params:
      data.batch_size: range(2, 6)
      seed: range(0, 4)
"""
PARAMS = ["data.batch_size=range(2, 6)", "seed=range(0, 4)"]  # what SEARCH sweeps: every shipped sampler takes it
SHIPPED = ["cmaes", "tpe", "random", "grid", "nsgaii"]
# CMA-ES with popsize 2 (generations of two trials, for short tests) divides by zero in cmaes' weights: harmless.
small_cmaes = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
# A trigger whose every firing runs for hours: the red team's hanging optuna.db.
SLOW = "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c LIMIT {})"
TRIGGERS = [f"CREATE TRIGGER slow_writes AFTER INSERT ON study_user_attributes BEGIN {SLOW.format(10**12)}; END",
            f"CREATE TRIGGER slow_updates AFTER UPDATE ON trials BEGIN {SLOW.format(10**12)}; END"]


class Touch:
    """Unpickled, it creates ``path``: the planted code, observable."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def payload(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> str:
    return pickle.dumps(Touch(marker), protocol=protocol).hex()


def search_distributions() -> dict:
    return parse_search_space(PARAMS, OverridesParser.create()).distributions


def plant_study(db: Path, marker: Path, *, in_trial: bool = True, in_study: bool = True) -> None:
    """A study made with optuna's own API, as the sweep of SEARCH would: a completed trial (CMA-ES
    restores its state from such a trial) and the study hold a pickle that creates ``marker``."""
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    trial = study.ask(search_distributions())
    if in_trial:
        storage.set_trial_system_attr(trial._trial_id, "cma:optimizer:0", payload(marker))
    study.tell(trial, 0.5)
    if in_study:
        storage.set_study_system_attr(study._study_id, "sampler:state", payload(marker))
    storage.engine.dispose()


def stored_system_attrs(db: Path) -> list[tuple[str, object]]:
    """Every system attribute in the file, read with sqlite3 (not through the code under test)."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT key, value_json FROM trial_system_attributes UNION ALL "
                                  "SELECT key, value_json FROM study_system_attributes").fetchall()
    return [(key, json.loads(value)) for key, value in rows]


def assert_one_error_line(result, *texts: str) -> str:
    """The CLI refused: non-zero exit, no traceback, one ``error:`` line holding every text."""
    assert result.returncode not in (0, None), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert all(text in errors[0] for text in texts), errors[0]
    return errors[0]


# ------------------------------------------------------------------ what looks like a pickle
@pytest.mark.parametrize("protocol", range(6))
def test_pickles_are_found_in_every_protocol_and_encoding(tmp_path, protocol):
    data = pickle.dumps(Touch(tmp_path / "marker"), protocol=protocol)
    spaced = " ".join(data.hex()[i:i + 2] for i in range(0, 2 * len(data), 2))  # bytes.fromhex reads it too
    for value in (data.hex(), data.hex().upper(), spaced, base64.b64encode(data).decode(),
                  base64.urlsafe_b64encode(data).decode().rstrip("="), data.decode("latin-1"),
                  [1, data.hex()], {"state": {"inner": base64.b64encode(data).decode()}}):
        assert pickle_looking(value), (protocol, value)
    text = data.hex()
    chunks = {"cma:optimizer:0": text[:3], "cma:optimizer:1": text[3:9], "cma:optimizer:2": text[9:], "n": 1}
    assert not any(pickle_looking(v) for v in chunks.values())  # no chunk alone parses ...
    assert find_pickled(chunks) == "cma:optimizer:0"  # ... joined, as CMA-ES joins them, it does
    assert pickle_looking([text[:5], text[5:]])  # chunks kept in a list
    padded = pickle.dumps(("x" * (2 * MAX_DECODED), Touch(tmp_path / "marker")), protocol=protocol)
    assert pickle_looking(padded.hex())  # a call past the bytes checked: too long to check, refused


@small_cmaes
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_what_optunas_samplers_store_is_not_taken_for_a_pickle():
    """TPE's and GP's JSON params, NSGA-II's generations and parents, the grid's search space and
    ids, queued params: every value the shipped samplers store passes; CMA-ES's own state is found."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    samplers = {"tpe": optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True, constant_liar=True),
                "random": optuna.samplers.RandomSampler(seed=0),
                "nsgaii": optuna.samplers.NSGAIISampler(seed=0, population_size=2),
                "grid": optuna.samplers.GridSampler({"x": [0.0, 0.5], "y": [0.0, 1.0], "c": ["head_only", "N2b"]}),
                "cmaes": optuna.samplers.CmaEsSampler(seed=0, popsize=2, n_startup_trials=0)}
    stored = {}
    for name, sampler in samplers.items():
        study = optuna.create_study(sampler=sampler)
        study.enqueue_trial({"x": 0.5, "y": 0.0, "c": "head_only"})
        study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1)
                       + (t.suggest_categorical("c", ["head_only", "N2b"]) == "N2b"), n_trials=6)
        trials = study.get_trials(deepcopy=False)
        stored[name] = {key for t in trials for key in t.system_attrs} | set(study._storage.get_study_system_attrs(0))
        found = [find_pickled(t.system_attrs) for t in trials]
        assert find_pickled(study._storage.get_study_system_attrs(study._study_id)) is None, name
        if name == "cmaes":
            assert "cma:optimizer:0" in found, found
        else:
            assert found == [None] * 6, (name, found)
    assert {"tpe:relative_params:0", "fixed_params"} <= stored["tpe"]  # the values checked are really there
    assert {"NSGAIISampler:generation", "NSGAIISampler:parent:1"} <= stored["nsgaii"]
    assert {"search_space", "grid_id"} <= stored["grid"]
    assert not any(pickle_looking(v) for v in ('{"x": 0.5}', "head_only", "deadbeef", "grid", 3, [0, 1], None))
    assert not pickle_looking(pickle.dumps([1, "a", {"b": 2.0}]).hex())  # no import, no call: harmless


# ------------------------------------------------------------------ the guarded storage
@small_cmaes
def test_cmaes_state_stays_in_memory_and_a_continued_study_recomputes_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}

    def run(n_trials: int) -> list[int]:
        sampler = optuna.samplers.CmaEsSampler(seed=0, popsize=2, n_startup_trials=0)
        study = optuna.create_study(study_name="s", storage=open_storage(url), sampler=sampler, load_if_exists=True)
        for _ in range(n_trials):
            trial = study.ask(space)
            study.tell(trial, trial.params["x"] + trial.params["y"])
        return [t.system_attrs.get("cma:generation") for t in study.get_trials(deepcopy=False)]

    # Generations advance only while the optimizer pickled after each one is served back from memory.
    assert run(8) == [None, 0, 0, 1, 1, 2, 2, 3]
    assert {key for key, _ in stored_system_attrs(tmp_path / "optuna.db")} == {"cma:generation"}
    assert run(2)[8:] == [1, 2]  # a fresh process: the state rebuilt from the trials, generation by generation
    assert not [key for key, value in stored_system_attrs(tmp_path / "optuna.db") if pickle_looking(value)]


@small_cmaes
def test_a_pickle_another_process_writes_is_refused_when_the_study_is_read_again(tmp_path):
    url, marker = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "marker"
    space = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    sampler = optuna.samplers.CmaEsSampler(seed=0, popsize=2, n_startup_trials=0)
    study = optuna.create_study(study_name="s", storage=open_storage(url), sampler=sampler)
    for _ in range(3):
        study.tell(trial := study.ask(space), trial.params["x"])

    other = optuna.storages.RDBStorage(url)  # the other process: a completed trial holding a pickle
    planted = other.create_new_trial(study._study_id)
    other.set_trial_param(planted, "x", 0.5, space["x"]), other.set_trial_param(planted, "y", 0.5, space["y"])
    other.set_trial_system_attr(planted, "cma:optimizer:0", payload(marker, protocol=2))
    other.set_trial_state_values(planted, TrialState.COMPLETE, [1.0])
    with pytest.raises(RefusedStudy, match=r"pickled object in system attribute 'cma:optimizer:0' of trial 3 .*"
                                           r"hydra\.sweeper\.study_name=NEW or hydra\.sweep\.dir=NEW_DIR"):
        study.ask(space)
    other.set_study_system_attr(study._study_id, "state", base64.b64encode(bytes.fromhex(payload(marker))).decode())
    with pytest.raises(RefusedStudy, match="pickled object in study system attribute 'state'"):
        study._storage.get_study_system_attrs(study._study_id)
    assert not marker.exists()


def test_a_planted_study_is_refused_before_optuna_opens_it(tmp_path):
    marker = tmp_path / "marker"
    plant_study(tmp_path / "trial" / "optuna.db", marker, in_study=False)
    plant_study(tmp_path / "study" / "optuna.db", marker, in_trial=False)
    with pytest.raises(RefusedStudy, match="system attribute 'cma:optimizer:0' of trial 0"):
        open_storage(f"sqlite:///{tmp_path / 'trial' / 'optuna.db'}").check_study("test")
    with pytest.raises(RefusedStudy, match="study system attribute 'sampler:state'"):
        open_storage(f"sqlite:///{tmp_path / 'study' / 'optuna.db'}").check_study("test")
    open_storage(f"sqlite:///{tmp_path / 'study' / 'optuna.db'}").check_study("another")  # a new study: nothing read
    assert not marker.exists()


def plant_journal(path: Path, marker: Path) -> Path:
    """A journal file made with optuna's own `JournalStorage`, as a sweep of SEARCH would make it, whose
    completed trial holds a pickle that creates ``marker``."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="test", storage=storage, direction="maximize")
    trial = study.ask(search_distributions())
    storage.set_trial_system_attr(trial._trial_id, "cma:optimizer:0", payload(marker))
    study.tell(trial, 0.5)
    return path


@pytest.mark.parametrize("case, refusal", [
    ("pickle", "holds a pickled object in system attribute 'cma:optimizer:0' of trial 0"),
    ("link", "optuna.log' is a symbolic link"),
    ("fifo", "optuna.log' is not a regular file"),
    ("not json", "holds data optuna cannot read (JSONDecodeError"),
    ("unknown operation", "holds data optuna cannot read (AssertionError"),
])
def test_a_journal_made_by_someone_else_is_read_as_data(tmp_path, case, refusal):
    """hydra.sweeper.storage=journal:PATH goes through the same guard: optuna replays the file, and what
    it replays is checked before any sampler sees it."""
    marker, journal = tmp_path / "marker", tmp_path / "optuna.log"
    elsewhere = plant_journal(tmp_path / "elsewhere.log", marker)
    if case == "pickle":
        plant_journal(journal, marker)
    elif case == "link":
        journal.symlink_to(elsewhere)
    elif case == "fifo":
        os.mkfifo(journal)
    else:
        lines = elsewhere.read_text().splitlines()[:2]  # the study made, a user attribute set
        lines.append("{not json" if case == "not json" else
                     '{"op_code": 99, "worker_id": "w"}')
        journal.write_text("\n".join(lines + lines[:1]) + "\n")
    before = elsewhere.read_bytes()
    with pytest.raises(RefusedStudy) as refused:
        open_storage(f"journal:{journal}").check_study("test")
    assert refusal in str(refused.value) and "\n" not in str(refused.value)
    assert "start a new study" in str(refused.value)
    assert elsewhere.read_bytes() == before and not marker.exists()


def test_a_journal_in_a_directory_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"the directory '.*/nowhere' does not exist: make it") as refused:
        open_storage(f"journal:{tmp_path / 'nowhere' / 'optuna.log'}")
    assert "\n" not in str(refused.value) and not (tmp_path / "nowhere").exists()


def make_study_file(path: Path) -> Path:
    optuna.create_study(study_name="test", storage=f"sqlite:///{path}").ask()
    return path


@pytest.mark.parametrize("case, refusal", [
    ("link", "optuna.db' is a symbolic link"),
    ("journal link", "optuna.db-journal' is a symbolic link"),
    ("fifo", "optuna.db' is not a regular file"),
    ("text", "optuna.db' is not an SQLite file (it starts with 'studies: []"),
    ("trigger", "holds a trigger 'slow_writes', which optuna's schema does not have"),
    ("view", "holds a view 'trials_view', which optuna's schema does not have"),
])
def test_sqlite_files_that_are_not_plain_optuna_databases_are_refused(tmp_path, case, refusal):
    db, elsewhere = tmp_path / "sweep" / "optuna.db", make_study_file(tmp_path / "elsewhere.db")
    db.parent.mkdir()
    if case == "link":
        db.symlink_to(elsewhere)
    elif case == "journal link":
        make_study_file(db)
        db.with_name("optuna.db-journal").symlink_to(elsewhere)  # SQLite would write its journal there
    elif case == "fifo":
        os.mkfifo(db)  # opened for reading, it would block
    elif case == "text":
        db.write_text("studies: []\n")
    else:
        make_study_file(db)
        with sqlite3.connect(db) as connection:
            connection.execute(TRIGGERS[0] if case == "trigger" else "CREATE VIEW trials_view AS SELECT * FROM trials")
    before = elsewhere.read_bytes()
    with pytest.raises(RefusedStudy, match="hydra.sweep.dir=NEW_DIR") as refused:
        open_storage(f"sqlite:///{db}")
    assert refusal in str(refused.value) and "\n" not in str(refused.value)
    assert elsewhere.read_bytes() == before


def test_a_job_reports_to_its_trial_only_through_the_guard(tmp_path):
    """A job dir resumed by hand replays its sweep.storage, which may be someone else's optuna.db: the
    job's trial reporter opens it through the sweeper's guard (a planted trigger is refused in one line,
    as for the sweeper; it would make every report hang), and a plain study still takes its reports."""
    (tmp_path / "sweep").mkdir()
    db = make_study_file(tmp_path / "sweep" / "optuna.db")
    reporter = TrialReporter(study="test", storage=f"sqlite:///{db}", trial=0, monitor="val/acc1")
    assert reporter._report(0.5, epoch=1) is False and reporter.trial is not None
    reporter.close()
    assert optuna.load_study(study_name="test", storage=f"sqlite:///{db}").trials[0].intermediate_values == {1: 0.5}
    with sqlite3.connect(db) as connection:
        connection.execute(TRIGGERS[0])
    with pytest.raises(RefusedStudy, match="holds a trigger 'slow_writes'") as refused:
        TrialReporter(study="test", storage=f"sqlite:///{db}", trial=0, monitor="val/acc1")
    assert "\n" not in str(refused.value)


def test_a_slow_statement_ends_in_one_line_within_the_time_limit(tmp_path):
    """Past the file check (a trigger made after it, say), the storage's own time limit still holds."""
    db = make_study_file(tmp_path / "optuna.db")
    with sqlite3.connect(db) as connection:
        for trigger in TRIGGERS:
            connection.execute(trigger)
    script = f"""
import time, optuna
from hydra_plugins.finetune_optuna_sweeper._guard import GuardedStorage, RefusedStudy
study = optuna.create_study(study_name="test", storage=GuardedStorage("sqlite:///{db}", limit_s=1.0),
                            load_if_exists=True)
start = time.monotonic()
try:
    study.set_user_attr("key", 1)
except RefusedStudy as err:
    print(f"{{time.monotonic() - start:.1f}} s: {{err}}")
"""
    result = run_bounded(["-c", script], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    seconds, message = result.stdout.strip().split(" s: ")
    assert float(seconds) < 10 and "took more than 1 s to answer one request: refused to wait" in message


# ------------------------------------------------------------------ what the sweeper reads back
@pytest.mark.parametrize("corruption, refusal", [
    ("UPDATE study_user_attributes SET value_json = '{bad'", "cannot read (JSONDecodeError"),
    ("UPDATE trial_system_attributes SET value_json = '" + "[" * 100_000 + "'", "cannot read (RecursionError"),
    ("UPDATE trials SET state = 'BOGUS'", "cannot read (LookupError"),
    ("UPDATE study_directions SET direction = 'SIDEWAYS'", "cannot read (LookupError"),
    ("""UPDATE trial_params SET distribution_json = '{"name": "FloatDistribution"}'""", "cannot read (KeyError"),
    ("UPDATE trial_values SET value = 'abc'", "holds trial 0 with values that are not numbers"),
    ("UPDATE trial_params SET param_value = 'zzz'", "holds trial 0 with params that are not numbers"),
])
def test_a_study_optuna_cannot_read_is_refused_in_one_line(tmp_path, corruption, refusal):
    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="test", storage=f"sqlite:///{db}", direction="maximize")
    study.set_user_attr("note", "x")
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    study._storage.set_trial_system_attr(trial._trial_id, "grid_id", 0)
    study.tell(trial, 0.5)
    with sqlite3.connect(db) as connection:
        connection.execute(corruption)
    space = SearchSpace(distributions={"x": FloatDistribution(0.0, 1.0)})
    with pytest.raises(UserError, match=re.escape(refusal)) as refused:
        _study.open_study(name="test", storage=f"sqlite:///{db}", direction="maximize", sampler="random",
                          pruner="none", space=space, seed=0)
    assert "hydra.sweeper.study_name=NEW or hydra.sweep.dir=NEW_DIR" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_malformed_study_attributes_are_ignored_or_refused_in_one_line(tmp_path):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    space = SearchSpace(distributions={"x": FloatDistribution(0.0, 1.0)})
    for job, retry_of in [(3, ["unhashable"]), ("7", None), (-1, None), (True, None), (10**12, None), ([2], None)]:
        trial = study.ask(space.distributions)
        trial.set_user_attr("job", job), trial.set_user_attr("retry_of", retry_of)
        trial.set_user_attr("overrides", {"not": "a list"}), trial.set_user_attr("job_dir", "\x1b]0;pwned\x07")
        study.tell(trial, trial.number / 10)
    sweep_dir = tmp_path / "sweep"
    for name in ("1", "²", "9" * 40):
        (sweep_dir / name).mkdir(parents=True)
    assert _study.next_job_number(study, sweep_dir) == 4  # after job 3 (and dir 1); the others are not job numbers
    assert _study.trials_to_go(study, 10, space) == 4
    said = _study.report(study, storage="s", monitor="val/acc1", extra=[])
    assert f"python -m finetune x={study.best_trial.params['x']}" in said  # its params: its overrides are no list
    assert "\x1b" not in said and "its run: \\x1b]0;pwned\\x07" in said

    for first in (-1, "0", True, 10**12, [0]):  # the job number of trial 0, as a sweeper sharing the study set it
        study.set_user_attr(_study.FIRST_JOB_ATTR, first)
        with pytest.raises(RefusedStudy, match="user attribute 'finetune.first_job' that is not a job number"):
            _study.first_job_number(study, sweep_dir)

    for fixed in ({"a": 1}, ["ok", 3], "data.root=x"):
        study.set_user_attr(_study.FIXED_ATTR, fixed)
        with pytest.raises(RefusedStudy, match="user attribute 'finetune.fixed_overrides' that is not a list"):
            _study.check_same_fixed_overrides(study, {"data.root": "data.root=x"})


def test_a_killed_trial_is_retried_only_with_params_of_the_search_space(tmp_path):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for x in (5.0, 0.25):  # two trials a killed sweep left running, of a wider search space
        study.enqueue_trial({"x": x, "gone": 0.5})
        study.ask({"x": FloatDistribution(0.0, 10.0), "gone": FloatDistribution(0.0, 1.0)})
    space = SearchSpace(distributions={"x": FloatDistribution(0.0, 1.0)})
    assert _study.retry_interrupted(study, space) == [0, 1]
    retries = [study.ask(space.distributions) for _ in range(2)]
    assert [list(r.params) for r in retries] == [["x"], ["x"]]
    assert 0.0 <= retries[0].params["x"] <= 1.0 and retries[1].params["x"] == 0.25  # 5.0 is sampled anew


@pytest.mark.parametrize("spec, refusal", [
    (["median"], "is neither a name nor a mapping"),
    (3, "is neither a name nor a mapping"),
    ({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": [1]}, "not a name with a plain value"),
    ({"_target_": "optuna.pruners.MedianPruner", "bogus": 1}, "cannot be built (TypeError"),
    ({"_target_": "optuna.pruners.PercentilePruner", "percentile": 200}, "cannot be built (ValueError"),
])
def test_pruner_specs_that_are_not_pruners_are_one_line_errors(tmp_path, spec, refusal):
    with pytest.raises(UserError, match=r"^hydra\.sweeper\.pruner") as refused:
        build_pruner(spec)
    assert refusal in str(refused.value) and "\n" not in str(refused.value)
    # A job reads the spec back from the study: the same one line, no traceback.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, spec)
    with pytest.raises(UserError, match=re.escape(refusal)):
        TrialReporter(study="s", storage=storage, trial=study.ask().number, monitor="val/acc1")


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory) -> tuple[Path, list[str]]:
    """A user's config dir with SEARCH, tiny images, and the arguments every sweep here shares."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "conf" / "hparams_search").mkdir(parents=True)
    (root / "conf" / "hparams_search" / "hostile.yaml").write_text(SEARCH)
    tiny = tiny_overrides(make_image_folder(root / "images"), epochs=1)
    return root, ["-m", "hparams_search=hostile", f"hydra.searchpath=[file://{root / 'conf'}]", *tiny]


@pytest.mark.slow
def test_a_planted_study_is_refused_with_every_shipped_sampler_before_any_job(cli_setup, tmp_path):
    root, args = cli_setup
    marker = tmp_path / "marker"
    commands = {}
    for sampler in SHIPPED:
        plant_study(tmp_path / sampler / "optuna.db", marker)
        commands[sampler] = args + [f"hydra.sweep.dir={tmp_path / sampler}", f"hydra.sweeper.sampler={sampler}"]
    # And a study whose attributes are the wrong kind of data (no pickle): refused too, in one line.
    (tmp_path / "malformed").mkdir()
    malformed = optuna.create_study(study_name="test", storage=f"sqlite:///{tmp_path / 'malformed' / 'optuna.db'}",
                                    direction="maximize")
    malformed.set_user_attr(_study.FIXED_ATTR, {"data.root": ["not", "a", "list"]})
    commands["malformed"] = args + [f"hydra.sweep.dir={tmp_path / 'malformed'}"]

    results = run_together(commands, module="finetune", cwd=root)
    for sampler in SHIPPED:
        assert_one_error_line(results[sampler], f"'{tmp_path / sampler / 'optuna.db'}' holds a pickled object in "
                              "system attribute 'cma:optimizer:0' of trial 0",
                              "start a new study: hydra.sweeper.study_name=NEW or hydra.sweep.dir=NEW_DIR")
        assert sorted(p.name for p in (tmp_path / sampler).iterdir()) == ["multirun.yaml", "optuna.db"]  # no job
    assert_one_error_line(results["malformed"], "user attribute 'finetune.fixed_overrides' that is not a list")
    assert not marker.exists()


@pytest.mark.slow
def test_a_study_whose_writes_hang_is_refused_in_one_line(cli_setup, tmp_path):
    root, args = cli_setup
    db = tmp_path / "sweep" / "optuna.db"
    plant_study(db, tmp_path / "marker", in_trial=False, in_study=False)
    with sqlite3.connect(db) as connection:
        for trigger in TRIGGERS:
            connection.execute(trigger)
    start = time.monotonic()
    result = run_bounded(["-m", "finetune", *args, f"hydra.sweep.dir={db.parent}"], cwd=root, timeout=90)
    assert result.returncode is not None, "the sweep hung: killed after 90 s"
    assert_one_error_line(result, f"'{db}' holds a trigger 'slow_writes', which optuna's schema does not have")
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_cmaes_sweep_stores_no_pickle_and_a_second_process_continues_it(cli_setup, tmp_path):
    root, args = cli_setup
    sweep_dir, db = tmp_path / "sweep", tmp_path / "sweep" / "optuna.db"
    # popsize 2: the optimizer is formed after trial 0 (sampled independently), told generation 0
    # (trials 1 and 2) and pickled when trial 3 is asked (the default popsize needs 8 trials).
    sampler = "{_target_: optuna.samplers.CmaEsSampler, popsize: 2, n_startup_trials: 0, seed: 0}"
    cmaes = [f"hydra.sweeper.sampler={sampler}", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(args + cmaes + ["hydra.sweeper.n_trials=4"], cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    generations = [v for key, v in stored_system_attrs(db) if key == "cma:generation"]
    assert generations == [0, 0, 1]  # trial 3 was asked of an optimizer told generation 0: it was pickled
    assert {key for key, _ in stored_system_attrs(db)} == {"cma:generation"}  # ... in memory only

    second = run_cli(args + cmaes + ["hydra.sweeper.n_trials=6"], cwd=root)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "4 trials so far, 2 to run" in second.stdout
    trials = optuna.load_study(study_name="test", storage=f"sqlite:///{db}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    # Trial 4: an optimizer rebuilt from the trials (generation 0 told again); trial 5: that one, from memory.
    assert [t.system_attrs.get("cma:generation") for t in trials] == [None, 0, 0, 1, 1, 2]
    assert not [(key, value) for key, value in stored_system_attrs(db) if pickle_looking(value)]
    assert {key for key, _ in stored_system_attrs(db)} == {"cma:generation"}
