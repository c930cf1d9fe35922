"""The Optuna sweeper on a real PostgreSQL server (issue 25): ``hydra.sweeper.storage=postgresql://...``.

The server is Debian's ``postgresql`` (`.ci/run` installs it when missing), started for this module on
127.0.0.1 with its own port and data dir, as an unprivileged user (PostgreSQL refuses to run as root,
and CI runs as root), and stopped however the tests end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_image_folder, run_cli, tiny_overrides
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
