"""``optim.lr=auto`` end to end (issue 12): the search leaves no trace on the training that follows,
the choice is recorded and reused on resume, fallbacks warn, sweeps and the CLI show it."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.run import run
from finetune.signals import TrainingInterrupted
from test_checkpoint import assert_same_result
from test_resume import with_signals

AUTO = ["optim.lr=auto", "optim.lr_find.trial_updates=2", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> tuple[Path, list[str], dict]:
    base = tmp_path_factory.mktemp("lr_auto")
    overrides = tiny_overrides(make_image_folder(base / "images"), epochs=2) + AUTO
    run(compose_config(overrides), run_dir=base / "auto")
    return base / "auto", overrides, json.loads((base / "auto" / "summary.json").read_text())["lr_find"]


def test_training_after_the_search_is_bit_identical_to_the_chosen_rate_given_by_hand(auto_run, tmp_path):
    out, overrides, chosen = auto_run
    assert chosen["chosen"] is not None and chosen["selected_by"] == "trials", chosen
    by_hand = [o for o in overrides if not o.startswith("optim.lr")] + [f"optim.lr={chosen['lr']!r}"]
    run(compose_config(by_hand), run_dir=tmp_path / "by_hand")
    assert_same_result(out, tmp_path / "by_hand")
    metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    again = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / "by_hand" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == again


def test_the_search_shows_its_work(auto_run):
    out, _, chosen = auto_run
    record = json.loads((out / "lr_find.json").read_text())
    assert {"lr", "rates", "losses", "smoothed", "rule", "chosen", "reason"} <= set(record)
    assert record["lr"] == chosen["lr"] and len(record["rates"]) == len(record["losses"]) > 10
    assert min(record["rates"]) <= record["chosen"] <= max(record["rates"])
    trials = record["trials"]  # the candidates from the curve (and the usual rate), and who won each rung
    assert record["chosen"] in trials["candidates"] and 1e-3 in trials["candidates"]
    assert [len(r["scores"]) for r in trials["rungs"]] == [len(trials["candidates"]), 2]
    assert [r["updates"] for r in trials["rungs"]] == [2, 6] and trials["rungs"][-1]["kept"] == [record["lr"]]
    assert trials["updates"] == 2 * len(trials["candidates"]) + 12 and trials["holdout_images"] == 3  # 1 of 6 per class
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["lr_find"]["lr"] == chosen["lr"]  # a resume takes it from here
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert "lr_find/curve" in events.Tags()["images"]
    assert {"lr_find/choice/text_summary", "lr_find/trials/text_summary"} <= set(events.Tags()["tensors"])
    assert f"optim.lr=auto: chose {chosen['lr']:.4g} ({record['choice']})" in (out / "train.log").read_text()


def test_a_resume_takes_the_chosen_rate_and_never_searches_again(auto_run, tmp_path, monkeypatch, caplog):
    out, overrides, chosen = auto_run
    stopped = tmp_path / "stopped"
    with_signals(monkeypatch, 5, signal.SIGTERM)  # mid-way through epoch 2
    with pytest.raises(TrainingInterrupted):
        run(compose_config(overrides), run_dir=stopped)
    monkeypatch.undo()
    searched = (stopped / "lr_find.json").read_text()

    import finetune.lr_find

    monkeypatch.setattr(finetune.lr_find, "search", lambda *a, **k: pytest.fail("searched again on resume"))
    monkeypatch.setattr(finetune.lr_find, "run_trials", lambda *a, **k: pytest.fail("ran trials again on resume"))
    run(compose_config(overrides + ["resume=auto"]), run_dir=stopped)
    assert "(no new search)" in caplog.text
    assert (stopped / "lr_find.json").read_text() == searched
    assert_same_result(stopped, out)


def test_no_trustworthy_rate_falls_back_with_a_warning(tmp_path, caplog):
    """Rates far too small to move the loss: a flat curve, so the configured fallback is used (without trials:
    what they do without a curve, `test_lr_find_trials.py` checks)."""
    overrides = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=1) + [
        "optim.lr=auto", "optim.lr_find.start_lr=1e-12", "optim.lr_find.end_lr=1e-11", "optim.lr_find.fallback_lr=3e-4",
        "optim.lr_find.select=curve"]
    run(compose_config(overrides), run_dir=tmp_path / "out")
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["lr_find"]
    assert record["chosen"] is None and record["lr"] == 3e-4 and "flat" in record["reason"]
    assert record["selected_by"] == "fallback"
    assert "training with optim.lr_find.fallback_lr=0.0003" in caplog.text


@pytest.mark.parametrize("extra", [["freeze=gradual"], ["optim.layer_decay=0.75"]])
def test_it_composes_with_gradual_unfreezing_and_layer_decay(tmp_path, extra):
    overrides = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=4) + AUTO[:2] + extra
    run(compose_config(overrides), run_dir=tmp_path / "out")
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["status"] == "completed" and record["lr_find"]["lr"] > 0


@pytest.mark.slow
def test_a_sweep_records_each_jobs_chosen_rate(tmp_path):
    root = make_image_folder(tmp_path / "images")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", *tiny_overrides(root, epochs=1), *AUTO[:2], "seed=0,1",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweep_dir / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["job"], r["seed"], r["status"]) for r in rows) == [("0", "0", "completed"),
                                                                        ("1", "1", "completed")]
    for row in rows:
        record = json.loads((Path(row["run_dir"]) / "lr_find.json").read_text())
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["chosen_lr"]) == summary["lr_find"]["lr"] == record["lr"] > 0
    assert "lr chosen" in result.stdout


@pytest.mark.slow
def test_the_search_alone_from_the_command_line(tmp_path):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "search"
    result = run_cli_module("finetune.lr_find", tiny_overrides(root) + [f"hydra.run.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "lr_find.json").read_text())
    assert f"{record['lr']:.4g}" in result.stdout and (out / "lr_find.png").is_file()
    assert not (out / "checkpoints").exists()  # it only searches


def run_cli_module(module: str, args: list[str], *, cwd: Path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
