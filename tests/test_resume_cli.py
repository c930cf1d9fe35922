"""The real CLI killed at random moments (SIGTERM once, then SIGKILL) and resumed until done; resume=RUN_DIR."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import as_large_jpegs, assert_manifest_matches_files, make_image_folder, run_cli, tiny_overrides
from finetune.checkpoint import verify_file
from finetune.rundir import hold_run_dir
from test_checkpoint import assert_same_result
from test_cli import assert_clean_error
from test_resume import train_loss_steps


def val_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars("val/acc1")]

pytestmark = pytest.mark.slow


def start(args: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def wait_for_a_save(manifest: Path, before: int | None, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until this attempt has saved something (it is training), or has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and mtime(manifest) == before:
        time.sleep(0.01)


def kill_and_resume(tmp_path: Path, args: list[str], *, epochs: int, updates: int, seed: int,
                    after_save: float) -> list[int]:
    """Run ``args`` straight, then again killed at random moments (SIGTERM once, then SIGKILL) and
    resumed with ``resume=auto`` until done; assert both end identical. Returns the exit codes."""
    ref = tmp_path / "ref"
    result = run_cli(args + [f"hydra.run.dir={ref}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    out, console, rng = tmp_path / "run", tmp_path / "console.txt", random.Random(seed)
    killed_while_running, codes = 0, []
    for attempt in range(5):
        manifest = out / "checkpoints" / "manifest.json"
        before = mtime(manifest)
        proc = start(args + ["resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path, log=console)
        wait_for_a_save(manifest, before, proc, timeout=300)
        time.sleep(rng.uniform(0.0, after_save))  # then somewhere in training, in a save or between saves
        if proc.poll() is None:
            killed_while_running += 1
            proc.send_signal(signal.SIGTERM if attempt == 0 else signal.SIGKILL)
        codes.append(proc.wait(timeout=300))
        if codes[-1] == 0:
            break
        if attempt == 0 and codes[0] == 128 + signal.SIGTERM:  # the graceful path: saved, then stopped
            summary = json.loads((out / "summary.json").read_text())
            assert summary["status"] == "interrupted", summary
    print(f"attempt exit codes: {codes}")
    assert killed_while_running >= 2, (codes, console.read_text()[-3000:])
    if codes[-1] != 0:
        result = run_cli(args + ["resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert set(codes[1:-1]) <= {-signal.SIGKILL}, codes
    assert "does not match manifest.json" not in console.read_text(), console.read_text()[-3000:]

    assert_same_result(out, ref)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, epochs + 1))
    assert train_loss_steps(out) == train_loss_steps(ref) == list(range(1, epochs * updates + 1))
    assert val_steps(out) == val_steps(ref) == [updates * (e + 1) for e in range(epochs)]
    ckpt = out / "checkpoints"
    manifest = assert_manifest_matches_files(ckpt)
    for name, entry in manifest["files"].items():
        verify_file(ckpt / name, entry)
        assert torch.load(ckpt / name, weights_only=True) if name.endswith(".ckpt") else load_file(ckpt / name)
    assert_manifest_matches_files(ref / "checkpoints")
    assert not list(ckpt.glob(".*.tmp"))
    return codes


def test_killed_at_random_moments_and_resumed_ends_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "images", train=8)  # 24 images: 6 updates per epoch
    args = tiny_overrides(root, epochs=6) + ["checkpoint.every_n_steps=2"]
    kill_and_resume(tmp_path, args, epochs=6, updates=6, seed=4, after_save=0.4)


def pickled_record_bytes(path: Path) -> int:
    """Size of the pickled structure (``data.pkl``) inside a ``torch.save`` zip."""
    with zipfile.ZipFile(path) as archive:
        return next(i.file_size for i in archive.infolist() if i.filename.endswith("/data.pkl"))


def test_a_real_model_killed_and_resumed_under_cpu_load_ends_bit_identical(tmp_path, busy_cpus):
    """The default model (its training state pickles to well over 64 KiB) on an oversubscribed machine,
    reading JPEGs decoded at a reduced size in two loader workers: every save verifies, every resume
    succeeds, and the end is bit-identical to the straight run."""
    root = as_large_jpegs(make_image_folder(tmp_path / "images", train=8))  # 24 images, batch 4: 6 updates an epoch
    args = [a for a in tiny_overrides(root, epochs=3) if not a.startswith(("model", "data.num_workers"))]
    args += ["model=efficientnet_lite0", "checkpoint.every_n_steps=2", "data.num_workers=2"]
    kill_and_resume(tmp_path, args, epochs=3, updates=6, seed=8, after_save=1.5)
    assert pickled_record_bytes(tmp_path / "run" / "checkpoints" / "last.ckpt") > 64 << 10


def test_resume_from_a_run_dir_reuses_its_overrides_and_directory(tmp_path):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = run_cli(tiny_overrides(root, epochs=1) + [f"hydra.run.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    result = run_cli([f"resume={out}", "optim.lr=0.01"], cwd=tmp_path)
    assert_clean_error(result, f"resume would change the experiment saved in '{out}", "optim.lr: 0.001 -> 0.01",
                       "resume_allow_config_change=true")

    result = run_cli([f"resume={out}", "trainer.max_epochs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # continued in place, no new run dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert f"data.root={root}" in (out / ".hydra" / "overrides.yaml").read_text()  # replayed, not retyped

    result = run_cli([f"resume={out}", "trainer.max_epochs=3", "optim.lr=0.01", "resume.allow_config_change=true"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optim.lr: 0.001 -> 0.01" in result.stdout  # the warning names what changed
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["epoch"] == 3


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path):
    """``timeout``/schedulers signal every process of the job: the loader's workers must not die first."""
    import os

    root = make_image_folder(tmp_path / "images", train=8)
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(root, epochs=50) if not a.startswith("data.num_workers")]
    with (tmp_path / "console.txt").open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", *args, "data.num_workers=2",
                                 "checkpoint.every_n_steps=2", f"hydra.run.dir={out}"], cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_a_save(out / "checkpoints" / "manifest.json", None, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "console.txt").read_text()[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["global_step"] > 0


def test_loader_workers_left_by_a_killed_run_do_not_hold_its_run_dir(tmp_path):
    """SIGKILL leaves a run's loader workers alive for seconds (they poll for their parent): the run
    dir's lock must be free the moment the run itself is gone, so ``resume=auto`` is not refused."""
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(root, epochs=2) if not a.startswith("data.num_workers")]
    args += ["data.num_workers=2", "checkpoint.every_n_steps=2", f"hydra.run.dir={out}"]
    console = tmp_path / "console.txt"  # a file, not a pipe: waiting for a pipe's end would wait for the workers
    killed = start(args, cwd=tmp_path, log=console, env={"FT_SIGNAL_AT": "0:3:SIGKILL",
                                                          "PYTHONPATH": str(Path(__file__).parent / "signal_at")})
    assert killed.wait(timeout=300) == -signal.SIGKILL, console.read_text()[-3000:]
    with hold_run_dir(out):  # at once, within the workers' polling interval
        orphans = [p for p in Path("/proc").glob("[0-9]*") if str(out).encode() in read_or_empty(p / "cmdline")]
        assert orphans, "no loader worker outlived its run: the test checked nothing"
    resumed = run_cli([*args, "resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["global_step"] == 10


def read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""
