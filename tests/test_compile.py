"""trainer.compile=true (issue 15): torch.compile in place, with freezing, EMA, checkpoints and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_manifest_matches_files, make_image_folder, run_cli, tiny_overrides
from safetensors.torch import load_file

from finetune import load_model

SIGNAL_AT = str(Path(__file__).parent / "signal_at")
FEATURES = ["freeze=gradual", "trainer.ema=true", "trainer.ema_decay=0.9"]  # unfreezes after epoch 2: a recompile


@pytest.mark.slow
def test_a_compiled_run_trains_like_eager_and_resumes_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "images", train=8)  # 24 images, batch 4: 6 updates per epoch
    args = [*tiny_overrides(root, epochs=3), *FEATURES]
    env = {"PYTHONPATH": os.pathsep.join([SIGNAL_AT, os.environ.get("PYTHONPATH", "")])}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        result = run_cli([*args, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "the model's forward is compiled by torch.compile" in (tmp_path / "compiled" / "train.log").read_text()
    eager, compiled = (load_file(tmp_path / n / "checkpoints" / "last.safetensors") for n in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()  # the model's own keys: no "_orig_mod."
    worst = max(float((eager[k].double() - compiled[k].double()).abs().max()) for k in eager)
    assert worst < 1e-3, worst  # inductor's kernels round differently; 3 epochs of adamw keep it small
    load_model(tmp_path / "compiled" / "checkpoints" / "best.safetensors")

    stopped = run_cli([*args, "trainer.compile=true", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                      env=env | {"FT_SIGNAL_AT": "0:14:SIGTERM"})  # epoch 3, after the unfreeze
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = run_cli([*args, "trainer.compile=true", "resume=auto", f"hydra.run.dir={tmp_path / 'run'}"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(again[k], compiled[k]) for k in compiled)
    ema = [torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["ema"] for n in ("compiled", "run")]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert_manifest_matches_files(tmp_path / "run" / "checkpoints")
