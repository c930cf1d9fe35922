"""A run ends by saying how it ended, where its files are, and what to run next (issue 14)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image_folder, run_cli, tiny_overrides

SIGNAL_AT = str(Path(__file__).parent / "signal_at")
PY = shlex.quote(sys.executable)  # printed commands name this interpreter: they work without the venv activated


@pytest.mark.slow
def test_a_completed_run_ends_with_its_paths_and_the_next_commands(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli([*tiny_overrides(root, epochs=1), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("---- run completed ----"):]
    assert f"weights      {run_dir}/checkpoints/best.safetensors" in tail
    assert f"tensorboard  tensorboard --logdir {run_dir}/tb" in tail
    assert f"{PY} -m finetune.evaluate ckpt={run_dir} data=custom data.root={root}" in tail
    assert f"{PY} -m finetune.predict ckpt={run_dir} inputs=" in tail
    assert f"{PY} -m finetune.export ckpt={run_dir} format=onnx" in tail
    assert "resume=" not in tail
    assert "---- run completed ----" in (run_dir / "train.log").read_text()
    pasted_elsewhere(tail, tmp_path, inputs=root / "val")


def pasted_elsewhere(tail: str, tmp_path: Path, *, inputs: Path) -> None:
    """Each printed command, pasted into a shell in another directory whose PATH lacks this virtual
    environment (the placeholder DIR_OR_GLOB filled in), runs to its end."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin) or "/usr/bin:/bin"
    commands = [line.strip() for line in tail[tail.index("next:"):].splitlines()[1:] if line.startswith("  ")]
    assert len(commands) == 3, tail
    for command in commands:
        pasted = subprocess.run(["bash", "-c", command.replace("DIR_OR_GLOB", shlex.quote(str(inputs)))],
                                cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert pasted.returncode == 0, (command, pasted.stderr[-2000:])


@pytest.mark.slow
def test_an_interrupted_run_ends_with_the_resume_command(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli([*tiny_overrides(root, epochs=3), f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                     env={"FT_SIGNAL_AT": "0:6:SIGTERM", "PYTHONPATH": os.pathsep.join([SIGNAL_AT,
                                                                                       os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 143, result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("---- run interrupted ----"):]
    assert f"{PY} -m finetune resume={run_dir}\n" in tail
    assert "best         val/acc1" in tail  # epoch 1 ended before the stop


@pytest.mark.slow
def test_a_run_that_fails_after_training_started_says_why_and_where(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli([*tiny_overrides(root, epochs=2), "optim.lr=1e12", "trainer.label_smoothing=0",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    tail = result.stdout[result.stdout.index("---- run failed ----"):]
    assert "error        TrainingDiverged: train/loss became" in tail
    assert f"run dir      {run_dir}" in tail
