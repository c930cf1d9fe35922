"""SLURM through submitit (issue 13): hydra/launcher=slurm composes, and the same submitit path runs
for real on this machine with hydra/launcher=slurm_local, requeue on SIGUSR2 included.

The data: 24 training images (3 classes x 8), batches of 4: 6 updates an epoch, 3 epochs. The
interrupted sweep gets SIGUSR2 right after update 8, 2 batches into epoch 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_manifest_matches_files, make_image_folder, tiny_overrides
from safetensors.torch import load_file

SIGNAL_AT = str(Path(__file__).parent / "signal_at")
JOBS = ("0", "1")  # optim.lr=1e-3,3e-4


def sweep(args: list[str], *, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m finetune -m ARGS`` with the FT_SIGNAL_AT test helper importable (inactive unless set)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FT_SIGNAL_AT")}
    full_env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": SIGNAL_AT} | (env or {})
    return subprocess.run([sys.executable, "-m", "finetune", "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=full_env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def submitit_log(sweep_dir: Path, job: str) -> str:
    """What submitit's job ``job`` of the sweep printed: the stdout file that names its run dir
    (submitit names the files by its own job id, a pid under the local executor)."""
    logs = [p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.out"))]
    ours = [text for text in logs if f"'{sweep_dir / job / 'checkpoints'}" in text]
    assert len(ours) == 1, f"{len(ours)} of submitit's logs in '{sweep_dir / '.submitit'}' name job {job}'s run dir"
    return ours[0]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> tuple[Path, Path]:
    """The same two-job sweep twice, side by side: once plain, once with SIGUSR2 after update 8."""
    base = tmp_path_factory.mktemp("slurm")
    root = make_image_folder(base / "images", train=8, val=2)
    args = ["hydra/launcher=slurm_local", *tiny_overrides(root, epochs=3), "trainer.device=cpu", "resume=auto",
            "optim.lr=1e-3,3e-4"]
    plain, requeued = base / "plain", base / "requeued"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(sweep, [*args, f"hydra.sweep.dir={plain}"], cwd=base),
                pool.submit(sweep, [*args, f"hydra.sweep.dir={requeued}"], cwd=base,
                            env={"FT_SIGNAL_AT": "0:8:SIGUSR2"})]
        for run in runs:
            ok(run.result())
    return plain, requeued


@pytest.mark.slow
def test_a_sweep_through_submitit_completes_every_job(sweeps):
    plain, _ = sweeps
    for job in JOBS:
        summary = json.loads((plain / job / "summary.json").read_text())
        assert (summary["status"], summary["steps"]) == ("completed", 18)
        assert_manifest_matches_files(plain / job / "checkpoints")
        assert "Job completed successfully" in submitit_log(plain, job)  # it ran through submitit
    rows = [json.loads(line) for line in (plain / "sweep_summary.jsonl").read_text().splitlines()]
    assert sorted(str(r["job"]) for r in rows) == list(JOBS)


@pytest.mark.slow
def test_a_job_stopped_by_sigusr2_is_requeued_and_ends_bit_identical(sweeps):
    plain, requeued = sweeps
    for job in JOBS:
        run_dir = requeued / job
        log = (run_dir / "train.log").read_text()
        assert "SIGUSR2 received" in log
        assert f"resuming from '{run_dir / 'checkpoints' / 'last.ckpt'}': epoch 1, step 8" in log
        submitit_out = submitit_log(requeued, job)
        assert "Requeued job" in submitit_out  # by submitit's handler: exit 144, the local controller reran it
        assert submitit_out.count("Loading pickle") == 2  # the same job, twice, not a new submission
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["status"], summary["steps"]) == ("completed", 18)
        assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
        assert_manifest_matches_files(run_dir / "checkpoints")
        ours, reference = (load_file(d / job / "checkpoints" / "last.safetensors") for d in (requeued, plain))
        assert ours.keys() == reference.keys()
        different = [k for k in ours if not torch.equal(ours[k], reference[k])]
        assert not different, f"job {job}: {len(different)} tensors differ from the plain run, e.g. {different[:3]}"


def launcher_config(overrides: list[str]) -> dict:
    """``hydra.launcher`` as the CLI composes and resolves it (``--cfg hydra``)."""
    result = subprocess.run([sys.executable, "-m", "finetune", *overrides, "--cfg", "hydra", "-p", "hydra.launcher",
                             "--resolve"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def test_the_slurm_launcher_runs_one_task_per_gpu():
    launcher = launcher_config(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                                "hydra.sweep.dir=/sweeps/a"])
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0  # requeued at the time limit
    assert launcher["submitit_folder"].startswith("/sweeps/a/")


def test_the_local_stand_in_takes_the_submitit_path_with_one_task():
    launcher = launcher_config(["hydra/launcher=slurm_local", "hydra.sweep.dir=/sweeps/a"])
    assert launcher["_target_"].endswith("LocalLauncher")
    assert launcher["tasks_per_node"] == 1 and launcher["submitit_folder"].startswith("/sweeps/a/")


@pytest.mark.slow
def test_a_ddp_job_of_two_submitit_tasks_stopped_on_one_rank_is_requeued_and_ends_bit_identical(tmp_path):
    """tasks_per_node=2: the two tasks submitit starts for one job are one DDP run (as srun's are); SIGUSR2
    to rank 1 stops both at update 4, rank 0 saves and has submitit requeue the job, which continues."""
    root = make_image_folder(tmp_path / "images", train=7, val=2)  # 21 images, global batch 8: 3 updates an epoch
    args = ["hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2", *tiny_overrides(root, epochs=3),
            "trainer.device=cpu", "resume=auto"]
    plain, requeued = tmp_path / "plain", tmp_path / "requeued"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(sweep, [*args, f"hydra.sweep.dir={plain}"], cwd=tmp_path),
                pool.submit(sweep, [*args, f"hydra.sweep.dir={requeued}"], cwd=tmp_path,
                            env={"FT_SIGNAL_AT": "1:4:SIGUSR2"})]
        for run in runs:
            ok(run.result())
    log = (requeued / "0" / "train.log").read_text()
    assert "DDP: 2 processes x data.batch_size 4 = global batch 8" in log
    assert f"resuming from '{requeued / '0' / 'checkpoints' / 'last.ckpt'}': epoch 1, step 4" in log
    task_logs = [p.read_text() for p in (requeued / ".submitit").glob("*/*_log.out")]
    assert sum("Requeued job" in text for text in task_logs) == 1  # by rank 0's submitit handler only
    for sweep_dir in (plain, requeued):
        summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
        assert (summary["status"], summary["steps"]) == ("completed", 9)
        assert_manifest_matches_files(sweep_dir / "0" / "checkpoints")
    ours, reference = (load_file(d / "0" / "checkpoints" / "last.safetensors") for d in (requeued, plain))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
