"""A run's lifecycle and the rules every rank shares (issue 21): one rule for "better" (best, top-k
and early stopping), hooks in named slots, a resume plan placed once, and a sweep's pruning decided
by rank 0 for every DDP process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune.builders import RunHooks
from finetune.optuna_trial import PRUNER_ATTR
from finetune.resume import ResumePlan
from finetune.run import run

TESTS = Path(__file__).parent


def test_best_top_k_and_early_stopping_share_one_rule_for_better(tmp_path):
    """checkpoint.min_delta larger than any change of val/loss: epoch 1 stays the best, the top-k file
    and the early-stopping reference alike (before, top-k ignored min_delta and moved on to a later,
    lower loss, so a top-k file beat best.safetensors)."""
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(root, epochs=3) + [
        "checkpoint.monitor=val/loss", "checkpoint.save_top_k=1", "checkpoint.min_delta=100",
        "trainer.early_stopping.patience=5", "optim.lr=0.01"]), run_dir=out)
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    top_k = [entry for entry in manifest["files"].values() if entry["kind"] == "top_k"]
    losses = [json.loads(line)["val/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(losses[1:]) < losses[0], losses  # a later epoch was lower: the old top-k rule would have taken it
    assert manifest["files"][manifest["best"]]["epoch"] == 1 and [e["epoch"] for e in top_k] == [1]
    assert json.loads((out / "summary.json").read_text())["best"]["epoch"] == 1


def test_hooks_run_in_their_documented_slots():
    hooks = RunHooks(log="log", metrics="metrics", checkpoint="checkpoint", trial="trial", freeze="freeze")
    assert hooks.ordered() == ["log", "metrics", "checkpoint", "trial", "freeze"]
    assert RunHooks(log=None, metrics="m", checkpoint="c").ordered() == ["m", "c"]


def test_a_resume_plan_is_placed_once(tmp_path):
    plan = ResumePlan.locate(compose_config(tiny_overrides(tmp_path)), run_dir=tmp_path / "run")
    assert plan.fresh and plan.new_manifest and plan.lr_record is None and plan.tensorboard() == {}
    plan.place(loaders=None, world=None, accumulate=1)
    with pytest.raises(RuntimeError, match="placed once"):
        plan.place(loaders=None, world=None, accumulate=1)


@pytest.mark.slow
def test_under_ddp_every_process_stops_when_rank_0s_pruner_says(tmp_path):
    """Before, only rank 0 had a TrialReporter: its RunPruned stopped rank 0 alone, and the others
    waited in the next collective. Now every process has one, rank 0 alone talks to the study, and
    its verdict stops all of them at the same epoch (here each rank sees other values on purpose)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5,
                                      "n_warmup_steps": 1})
    study.ask()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(TESTS / "ddp_trial_worker.py"), storage, str(tmp_path / "rank")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen == [{"pruned_at": 2, "talks": True}, {"pruned_at": 2, "talks": False}]
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == {1: 0.9, 2: 0.2}
