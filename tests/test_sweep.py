"""Sweeps that summarise themselves (issue 11): Hydra multiruns of the real CLI on tiny models."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import make_image_folder, run_cli, tiny_overrides
from finetune.runtime import device_for_job

pytestmark = pytest.mark.slow


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def hparams_of(run_dir: Path) -> tuple[dict, list[str]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    plugin = {tag.removeprefix("_hparams_/"): HParamsPluginData.FromString(content)
              for tag, content in events.PluginTagToContent("hparams").items()}
    hparams = plugin["session_start_info"].session_start_info.hparams
    return hparams, [m.name.tag for m in plugin["experiment"].experiment.metric_infos]


@pytest.fixture(scope="module")
def three_job_sweep(tmp_path_factory):
    """lr 1e-3 (fine), -1 (fails validation), 1e6 (diverges), 3e-4 (fine)."""
    base = tmp_path_factory.mktemp("sweep")
    root = make_image_folder(base / "images")
    sweep_dir = base / "sweep"
    result = run_cli(["-m", *tiny_overrides(root, epochs=2), "optim.lr=1e-3,-1,1e6,3e-4",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=base)
    return result, sweep_dir


def test_failed_jobs_do_not_sink_the_sweep_and_the_summary_says_why(three_job_sweep):
    result, sweep_dir = three_job_sweep
    assert result.returncode == 1, result.stderr[-3000:]  # non-zero, after the summary was written
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert [(r["job"], r["optim.lr"], r["status"]) for r in rows][2:] == [("1", "-1", "failed"),
                                                                          ("2", "1000000.0", "failed")]  # as Hydra records it
    assert {r["job"] for r in rows[:2]} == {"0", "3"} and {r["status"] for r in rows[:2]} == {"completed"}
    assert float(rows[0]["best val/acc1"]) >= float(rows[1]["best val/acc1"])  # best first
    assert "optim.lr must be positive, got '-1.0'" in rows[2]["error"]
    assert "train/loss became" in rows[3]["error"]  # diverged
    for r in rows[:2]:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["best val/acc1"]) == summary["best"]["value"] and int(r["epochs"]) == 2
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]  # a dir per job
    jsonl = [json.loads(line) for line in (sweep_dir / "sweep_summary.jsonl").read_text().splitlines()]
    assert [r["job"] for r in jsonl] == [0, 1, 2, 3]  # appended as each job ended


def test_the_printed_table_names_the_best_job_its_command_and_the_failures(three_job_sweep):
    result, sweep_dir = three_job_sweep
    out = result.stdout
    assert "sweep summary: 4 jobs (2 completed, 2 failed)" in out
    best = read_csv(sweep_dir / "sweep_summary.csv")[0]
    assert f"best: job {best['job']}, val/acc1 {float(best['best val/acc1']):.4f}" in out
    reproduce = next(line for line in out.splitlines() if line.startswith(f"reproduce: {shlex.quote(sys.executable)} -m finetune "))
    assert f"optim.lr={best['optim.lr']}" in reproduce and "data.root=" in reproduce
    assert "job 1 failed: UserError: optim.lr must be positive" in out
    assert result.stderr.count("job failed: ") == 2


def test_tensorboard_over_the_sweep_dir_has_one_hparams_row_per_job(three_job_sweep):
    _, sweep_dir = three_job_sweep
    completed = [row for row in read_csv(sweep_dir / "sweep_summary.csv") if row["status"] == "completed"]
    assert sorted(row["job"] for row in completed) == ["0", "3"]
    for row in completed:
        hparams, metrics = hparams_of(Path(row["run_dir"]))
        assert hparams["optim.lr"].number_value == pytest.approx(float(row["optim.lr"]))
        assert "sched.name" not in hparams  # only what the jobs override, not every setting
        assert {"hparam/best", "hparam/final/val/acc1"} <= set(metrics)


def test_a_killed_sweep_is_rebuilt_from_its_job_dirs(tmp_path):
    root = make_image_folder(tmp_path / "images")
    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(root) if not a.startswith("trainer.max_epochs")]
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "-m", *args, "optim.lr=1e-3,3e-4",
                             "trainer.max_epochs=1,50", f"hydra.sweep.dir={sweep_dir}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    second = sweep_dir / "1" / "train.log"  # the second job (50 epochs) has started
    while time.monotonic() < deadline and not ((sweep_dir / "sweep_summary.jsonl").exists() and second.exists()):
        time.sleep(0.1)  # the first job (1 epoch) ended and its row is in
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert second.exists(), "the sweep did not reach its second job within 240 s"
    assert not (sweep_dir / "sweep_summary.csv").exists()  # the sweep never got to its end

    result = subprocess.run([sys.executable, "-m", "finetune.sweep", str(sweep_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "crashed")]  # 1: killed mid-run
    assert "sweep summary:" in result.stdout and "best: job 0" in result.stdout


def test_parallel_jobs_with_the_joblib_launcher_and_one_device_per_job(tmp_path):
    root = make_image_folder(tmp_path / "images")
    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(root, epochs=1) if not a.startswith("data.num_workers")]
    result = run_cli(["-m", *args, "data.num_workers=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "trainer.device=per_job", "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]


def test_per_job_devices_spread_jobs_over_the_gpus():
    assert [device_for_job(j, 4) for j in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert device_for_job(3, 0) == "cpu"
