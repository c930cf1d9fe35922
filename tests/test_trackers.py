"""Trackers beyond TensorBoard (issue 25): ``logger=[tensorboard,csv,mlflow]`` on real runs of the CLI,
against a real MLflow tracking server (SQLite backend, local artifact root) on 127.0.0.1, read back
through `mlflow.MlflowClient`."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_image_folder, run_cli, tiny_overrides

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS, UPDATES = 2, 5  # 3 classes x 6 images / batch 4 -> 5 updates an epoch
SIGNAL_AT = str(Path(__file__).parent / "signal_at")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a local artifact root, in ``root``."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=(self.root / "server.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer in {timeout} s: "
                             f"{(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("trackers") / "images")


def tracked(images: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    return [*tiny_overrides(images, epochs=EPOCHS), "logger=[tensorboard,csv,mlflow]",
            f"logger.mlflow.tracking_uri={uri}", f"logger.mlflow.experiment_name={experiment}", *extra]


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def csv_rows(run_dir: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO((run_dir / "metrics.csv").read_text())))


@pytest.fixture(scope="module")
def reference(server, images, tmp_path_factory) -> tuple[Path, object]:
    """One uninterrupted run logged to all three trackers, and its MLflow run."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli(tracked(images, server.uri, "reference", f"hydra.run.dir={cwd / 'run'}"), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(server.uri)
    (run,) = runs_of(client, "reference")
    return cwd / "run", run


def test_mlflow_holds_params_curves_artifacts_and_the_end_status(server, reference):
    run_dir, run = reference
    client = MlflowClient(server.uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["model.name"] == "test_resnet" and float(params["optim.lr"]) > 0
    assert params["trainer.max_epochs"] == str(EPOCHS) and params["logger.mlflow.experiment_name"] == "reference"
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS * UPDATES + 1))
    assert steps(client, run.info.run_id, "val/acc1") == [UPDATES * (e + 1) for e in range(EPOCHS)]
    assert steps(client, run.info.run_id, "lr/head") == list(range(1, EPOCHS * UPDATES + 1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/acc1")}
    assert [history[r["step"]] for r in records] == [r["val/acc1"] for r in records]
    assert run.data.metrics["hparam/best"] == json.loads((run_dir / "summary.json").read_text())["best"]["value"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.safetensors", "summary.json", "load_report.json", "val", "lr_find"} - {"lr_find"} <= artifacts
    confusion = {a.path for a in client.list_artifacts(run.info.run_id, "val/confusion_matrix")}
    assert confusion == {f"val/confusion_matrix/step_{UPDATES * (e + 1):08d}.png" for e in range(EPOCHS)}
    local = Path(client.download_artifacts(run.info.run_id, "best.safetensors", str(run_dir.parent)))
    assert local.read_bytes() == next((run_dir / "checkpoints").glob("best.safetensors")).read_bytes()


def test_csv_has_one_row_per_step_and_the_same_values_as_mlflow(server, reference):
    run_dir, run = reference
    header, *rows = csv_rows(run_dir)
    assert header[0] == "step" and header[1:] == sorted(header[1:])
    assert {"train/loss", "val/acc1", "val/loss", "lr/head", "epoch", "val_class/class_0"} <= set(header)
    assert [int(r[0]) for r in rows] == list(range(1, EPOCHS * UPDATES + 1))
    loss = {m.step: m.value for m in MlflowClient(server.uri).get_metric_history(run.info.run_id, "train/loss")}
    assert [float(r[header.index("train/loss")]) for r in rows] == [loss[int(r[0])] for r in rows]
    assert [r[header.index("epoch")] for r in rows if r[header.index("epoch")]] == ["1", "2"]


def test_killed_run_resumes_into_the_same_mlflow_run_with_no_step_twice(server, images, reference, tmp_path):
    """SIGKILL at step 8 (last save at step 5): the MLflow run is left RUNNING; resume=auto continues that
    run (no second run), logs each step once, ends FINISHED; metrics.csv equals the uninterrupted run's."""
    args = tracked(images, server.uri, "resumed", f"hydra.run.dir={tmp_path / 'run'}")
    killed = run_cli(args, cwd=tmp_path, env={"FT_SIGNAL_AT": "0:8:SIGKILL", "PYTHONPATH": SIGNAL_AT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client = MlflowClient(server.uri)
    (first,) = runs_of(client, "resumed")
    assert first.info.status == "RUNNING" and steps(client, first.info.run_id, "train/loss")[-1] == 8

    result = run_cli(args + ["resume=auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(client, "resumed")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS * UPDATES + 1))
    assert steps(client, run.info.run_id, "val/acc1") == [UPDATES * (e + 1) for e in range(EPOCHS)]
    assert csv_rows(tmp_path / "run") == csv_rows(reference[0])  # bit-identical resume, same columns


def test_interrupted_run_ends_killed(server, images, tmp_path):
    args = tracked(images, server.uri, "interrupted", f"hydra.run.dir={tmp_path / 'run'}")
    result = run_cli(args, cwd=tmp_path, env={"FT_SIGNAL_AT": "0:3:SIGTERM", "PYTHONPATH": SIGNAL_AT})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    (run,) = runs_of(MlflowClient(server.uri), "interrupted")
    assert run.info.status == "KILLED"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"


def test_a_failed_run_ends_failed(server, images, tmp_path):
    args = tracked(images, server.uri, "failed", f"hydra.run.dir={tmp_path / 'run'}", "optim.lr=1e30",
                   "trainer.max_epochs=1")
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode not in (0, None) and "train/loss became" in result.stderr, result.stderr[-3000:]
    (run,) = runs_of(MlflowClient(server.uri), "failed")
    assert run.info.status == "FAILED"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_mlflow_down_at_start_is_one_warning_and_the_run_completes(images, tmp_path):
    result = run_cli(tracked(images, f"http://127.0.0.1:{free_port()}", "nowhere", f"hydra.run.dir={tmp_path / 'run'}"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    warnings = [line for line in console.splitlines() if "logger mlflow" in line]
    assert len(warnings) == 1 and "training continues" in warnings[0], console[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trackers"]["mlflow"]["dropped_events"] == 0
    assert [int(r[0]) for r in csv_rows(tmp_path / "run")[1:]] == list(range(1, EPOCHS * UPDATES + 1))


def test_mlflow_server_killed_mid_run_drops_its_events_and_counts_them(images, tmp_path):
    """The server dies once the run has logged its first step: the run completes, the other trackers
    have every step, one warning line, and summary.json counts what MLflow lost."""
    srv = MlflowServer(tmp_path / "server")
    try:
        srv.start()
        args = tracked(images, srv.uri, "dies", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=3")
        proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client, deadline = MlflowClient(srv.uri), time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = runs_of(client, "dies")
            if runs and steps(client, runs[0].info.run_id, "train/loss"):
                break
            time.sleep(0.2)
        srv.stop()
        out, err = proc.communicate(timeout=600)
    finally:
        srv.stop()
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in (out + err).splitlines() if "logger mlflow" in line]
    assert len(warnings) == 1 and "dropped" in warnings[0], (out + err)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trackers"]["mlflow"]["dropped_events"] > 0
    assert [int(r[0]) for r in csv_rows(tmp_path / "run")[1:]] == list(range(1, 3 * UPDATES + 1))


def test_a_sweep_is_a_parent_run_with_a_child_run_per_job(server, images, tmp_path):
    args = ["-m", *tracked(images, server.uri, "sweep"), "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "optim.lr=0.001,0.002"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(MlflowClient(server.uri), "sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert [c.info.run_name for c in children] == ["0", "1"]
    assert [c.data.params["optim.lr"] for c in children] == ["0.001", "0.002"]
    assert all(c.info.status == "FINISHED" for c in children) and parents[0].info.status == "FINISHED"


def test_wandb_offline_run_files_and_resume_into_the_same_run_id(images, tmp_path):
    """WANDB_MODE=offline: the run's W&B files are in RUN_DIR/wandb; a resume after SIGKILL continues the
    same W&B run id (kept in the training state). (W&B 0.31 ships no reader of its offline history
    file, so the curves themselves are not read back here.)"""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(images, epochs=EPOCHS), "logger=[csv,wandb]", f"hydra.run.dir={run_dir}"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = run_cli(args, cwd=tmp_path, env={**env, "FT_SIGNAL_AT": "0:8:SIGKILL", "PYTHONPATH": SIGNAL_AT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    result = run_cli(args + ["resume=auto"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and len({p.name.rpartition("-")[2] for p in attempts}) == 1, attempts
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["trackers"] == {"wandb": attempts[0].name.rpartition("-")[2]}
    assert {"summary.json", "load_report.json"} <= {p.name for p in (attempts[1] / "files").iterdir()}
    assert (attempts[0] / f"run-{state['trackers']['wandb']}.wandb").stat().st_size > 0
