"""The Optuna sweeper on a real PostgreSQL server (issue 25): ``hydra.sweeper.storage=postgresql://...``,
one study shared by several sweepers (each ``n_trials``), a SIGKILLed one's trial retried after its heartbeat.

The server is Debian's ``postgresql`` (`.ci/run` installs it when missing), started for this module on
127.0.0.1 with its own port and data dir, as an unprivileged user (PostgreSQL refuses to run as root,
and CI runs as root), and stopped however the tests end.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import yaml
from conftest import make_image_folder, run_cli, run_together, tiny_overrides
from test_optuna import files_of
from test_optuna_hostile import assert_one_error_line

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.slow
PASSWORD = "ft-test-secret"


def pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]
    return next((c for c in candidates if (c / "pg_ctl").exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (password authentication, user ``ft``); its SQLAlchemy URL."""
    bindir = pg_bindir()
    if bindir is None:
        message = ("PostgreSQL is not installed (no initdb): the PostgreSQL sweeper tests are SKIPPED; "
                   "apt-get install postgresql (.ci/run does)")
        print(f"\n{'!' * 20} {message} {'!' * 20}")
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="issue-track-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses root: run it as nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    root.chmod(0o700)
    port = free_port()
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, -1)
    started = False
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "ft", f"--pwfile={pwfile}",
                        "-A", "scram-sha-256"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                        "-t", "120", "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"],
                       check=True, capture_output=True, timeout=180)
        started = True
        yield f"postgresql+psycopg2://ft:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_a_sweep_keeps_its_study_on_postgresql(postgres, tmp_path):
    sweep_dir = tmp_path / "sweep"
    tiny = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=1)
    result = run_cli(["-m", "hparams_search=lr_freeze", f"hydra.sweeper.storage={postgres}", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.study_name=pg", f"hydra.sweep.dir={sweep_dir}", *tiny], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="pg", storage=postgres).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.user_attrs["job_dir"] for t in trials) == [str(sweep_dir / "0"), str(sweep_dir / "1")]
    assert not (sweep_dir / "optuna.db").exists()


def test_bad_credentials_are_one_line_without_the_password(postgres, tmp_path):
    wrong = postgres.replace(PASSWORD, "not-the-password")
    result = run_cli(["-m", "hparams_search=lr_freeze", f"hydra.sweeper.storage={wrong}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", *tiny_overrides(tmp_path / "nowhere")], cwd=tmp_path)
    line = assert_one_error_line(result, "password authentication failed", "check the URL")
    assert "not-the-password" not in result.stderr + result.stdout and "ft:***@127.0.0.1" in line


def test_a_url_naming_a_driver_that_is_not_installed_is_one_line(tmp_path):
    result = run_cli(["-m", "hparams_search=lr_freeze", "hydra.sweeper.storage=postgresql+pg8000://ft@127.0.0.1:1/x",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", *tiny_overrides(tmp_path / "nowhere")], cwd=tmp_path)
    assert_one_error_line(result, "needs the database driver 'pg8000', which is not installed")


def shared_sweep(postgres: str, tmp_path: Path, study: str, *extra: str) -> list[str]:
    """The lr_freeze search of tiny jobs, its study ``study`` on the server, its jobs in tmp_path/sweep."""
    images = tmp_path / "images"
    if not images.exists():
        make_image_folder(images)
    # No pruner: these tests count trials run and completed; a median pruner may stop the fourth trial of a
    # shared study (its one epoch worse than the median of the three before it), as it should in a real sweep.
    return ["-m", "hparams_search=lr_freeze", f"hydra.sweeper.storage={postgres}", f"hydra.sweeper.study_name={study}",
            "hydra.sweeper.pruner=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", *tiny_overrides(images, epochs=1),
            *extra]


def trials_run(result) -> list[int]:
    """The trials a sweeper says it ran (its log: ``trial N (job N): complete (...)``), job = trial checked."""
    ran = re.findall(r"\btrial (\d+) \(job (\d+)\): complete", result.stdout)
    assert all(trial == job for trial, job in ran), ran
    return sorted(int(trial) for trial, _ in ran)


def test_two_sweepers_started_together_share_one_study(postgres, tmp_path):
    args = shared_sweep(postgres, tmp_path, "together", "hydra.sweeper.n_trials=2")
    results = run_together({"a": args, "b": args}, module="finetune", cwd=tmp_path)
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]

    # n_trials is each sweeper's: 4 trials, each run by one of them, none taken for dead.
    trials = optuna.load_study(study_name="together", storage=postgres).trials
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(4)]
    ran = {name: trials_run(result) for name, result in results.items()}
    assert len(ran["a"]) == len(ran["b"]) == 2 and sorted(ran["a"] + ran["b"]) == [0, 1, 2, 3], ran
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # the two samplers proposed different trials
    # Job dirs by trial number: distinct, each holding its own trial's job.
    sweep_dir = tmp_path / "sweep"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    for trial in trials:
        assert trial.user_attrs["job_dir"] == str(sweep_dir / str(trial.number))
        config = yaml.safe_load((sweep_dir / str(trial.number) / ".hydra" / "config.yaml").read_text())
        assert config["sweep"]["trial"] == trial.number
    summary = subprocess.run([sys.executable, "-m", "finetune.sweep", str(sweep_dir)], capture_output=True, text=True,
                             timeout=300)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "sweep summary: 4 jobs (4 completed)" in summary.stdout


def test_a_sigkilled_sweepers_trial_is_failed_and_retried_after_its_heartbeat(postgres, tmp_path):
    args = shared_sweep(postgres, tmp_path, "killed", "hydra.sweeper.heartbeat_s=4", "trainer.max_epochs=2")
    # The sweeper (its job runs in its process) kills itself at its trial's third update, mid-epoch.
    killed = run_cli(args + ["hydra.sweeper.n_trials=1"], cwd=tmp_path,
                     env={"FT_SIGNAL_AT": "0:3:SIGKILL", "PYTHONPATH": str(Path(__file__).parent / "signal_at")})
    assert killed.returncode == -9, killed.stderr[-3000:]
    (dead,) = optuna.load_study(study_name="killed", storage=postgres).trials
    assert dead.state.name == "RUNNING" and dead.intermediate_values == {}
    left = files_of(tmp_path / "sweep" / "0")

    after = run_cli(args + ["hydra.sweeper.n_trials=2"], cwd=tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "trials [0] were left running by a sweeper silent for 4 s (hydra.sweeper.heartbeat_s): failed, " \
           "and queued again" in after.stdout + after.stderr
    trials = optuna.load_study(study_name="killed", storage=postgres).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.params == dead.params and retry.number != 0
    assert trials_run(after) == [1, 2]
    assert files_of(tmp_path / "sweep" / "0") == left  # the killed job's dir is left as it was
    assert sorted(t.user_attrs.get("job_dir") for t in trials[1:]) == [str(tmp_path / "sweep" / n) for n in "12"]
