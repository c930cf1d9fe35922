"""A run ends by saying how it ended, where its files are, and what to run next (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import make_image_folder, run_cli, tiny_overrides

SIGNAL_AT = str(Path(__file__).parent / "signal_at")


@pytest.mark.slow
def test_a_completed_run_ends_with_its_paths_and_the_next_commands(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli([*tiny_overrides(root, epochs=1), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("---- run completed ----"):]
    assert f"weights      {run_dir}/checkpoints/best.safetensors" in tail
    assert f"tensorboard  tensorboard --logdir {run_dir}/tb" in tail
    assert f"python -m finetune.evaluate ckpt={run_dir} data=custom data.root={root}" in tail
    assert f"python -m finetune.predict ckpt={run_dir} inputs=" in tail
    assert f"python -m finetune.export ckpt={run_dir} format=onnx" in tail
    assert "resume=" not in tail
    assert "---- run completed ----" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_an_interrupted_run_ends_with_the_resume_command(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli([*tiny_overrides(root, epochs=3), f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                     env={"FT_SIGNAL_AT": "0:6:SIGTERM", "PYTHONPATH": os.pathsep.join([SIGNAL_AT,
                                                                                       os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 143, result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("---- run interrupted ----"):]
    assert f"python -m finetune resume={run_dir}\n" in tail
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
