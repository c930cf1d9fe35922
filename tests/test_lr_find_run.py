"""``optim.lr=auto`` end to end (issue 12): the search leaves no trace on the training that follows,
the choice is recorded and reused on resume, fallbacks warn, sweeps and the CLI show it; the trials
also choose the freezing (issue 26): a run that chose ``freeze=head_only`` trains as one given it by hand."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.lr_find.trials import MERGE_RATIO
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
    whole_rates = [rate for rate, freeze in trials["candidates"] if freeze == "none"]
    # the curve's rate is a candidate, or merged into one within MERGE_RATIO (trials could not tell them
    # apart; here 0.0043 merges into 3e-3)
    assert min(abs(math.log(rate / record["chosen"])) for rate in whole_rates) < math.log(MERGE_RATIO)
    assert 1e-3 in whole_rates and any(rate == pytest.approx(3 * record["chosen"]) for rate in whole_rates)
    assert [[1e-3, "head_only"], [3e-3, "head_only"], [1e-2, "head_only"]] == trials["candidates"][-3:]
    rungs, whole = trials["rungs"], len(trials["candidates"]) - 3
    assert [(r.get("family"), r["updates"], len(r["scores"])) for r in rungs[:-1]] == [  # each family halves alone
        ("none", 2, whole), *([("none", 6, 2)] if whole > 3 else []), ("head_only", 2, 3)]
    final, run_updates = rungs[-1], torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["global_step"]
    assert final["final"] is True and final["updates"] == run_updates  # the finalists train as long as the run
    finalists = [c for c, _ in final["scores"]]
    winners = [[r for r in rungs if r.get("family") == name][-1]["kept"][0] for name in ("none", "head_only")]
    assert [1e-3, "none"] in finalists and [1e-3, "head_only"] in finalists  # each freeze option's usual rate
    assert all(w in finalists for w in winners)  # and each family's best
    assert final["kept"] == [[record["lr"], record["freeze"]]] and record["freeze"] == "none"
    assert [c for c, _ in final["values"]] == finalists  # judged by val/acc1 (checkpoint.monitor), lower-is-better
    best = min(v for _, v in final["values"])
    assert "judged by the short ones by the loss, the finalists by val/acc1 on 3 held-out" in record["choice"]
    assert [[record["lr"], "none"], best] in final["values"] and -1.0 <= best <= 0.0
    assert trials["updates"] == sum(r["updates"] * len(r["scores"]) * r.get("folds", 1) for r in rungs)
    assert trials["holdout_images"] == 3  # 1 of 6 per class
    # 3 held-out images are too few to judge the finalists: they train on 5 slices (k-fold), 15 images judged
    assert final["folds"] == trials["final_folds"] == 5 and trials["final_images"] == 15
    assert "; the finalists on 5 disjoint held-out slices, 15 images in all" in record["choice"]
    assert [c for c, _ in final["slices"]] == finalists
    for (_, value), (_, slices) in zip(final["values"], final["slices"], strict=True):
        assert len(slices) == 5 and value == pytest.approx(sum(v for _, v in slices) / 5)  # the mean judges
        assert all(round(-3 * v, 6) == round(-3 * v) for _, v in slices)  # accuracy on 3 images each
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["lr_find"]["lr"] == chosen["lr"]  # a resume takes it from here
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert "lr_find/curve" in events.Tags()["images"]
    assert {"lr_find/choice/text_summary", "lr_find/trials/text_summary"} <= set(events.Tags()["tensors"])
    table = events.Tensors("lr_find/trials/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| final (5 slices, mean) | {run_updates} | 0.001 | none |" in table
    assert f"optim.lr=auto: chose {chosen['lr']:.4g} with freeze=none ({record['choice']})" in (
        out / "train.log").read_text()


def test_without_freeze_candidates_the_trials_compare_the_same_rates_as_before(auto_run, tmp_path):
    """``optim.lr_find.freeze_candidates=[]``: the rates alone, each trial scored exactly as with the candidates."""
    out, overrides, _ = auto_run
    run(compose_config(overrides + ["optim.lr_find.freeze_candidates=[]"]), run_dir=tmp_path / "rates")
    record = json.loads((tmp_path / "rates" / "lr_find.json").read_text())
    assert "freeze" not in record and all(isinstance(c, float) for c in record["trials"]["candidates"])
    both = json.loads((out / "lr_find.json").read_text())["trials"]
    assert [score for score in both["rungs"][0]["scores"] if score[0][1] == "none"] == [
        [[rate, "none"], loss] for rate, loss in record["trials"]["rungs"][0]["scores"]]
    assert record["trials"]["rungs"][-1]["kept"] == [record["lr"]]


def test_the_first_of_the_finalists_slices_judges_them_as_a_single_slice_does(auto_run, tmp_path):
    """``optim.lr_find.final_folds=1``: the final rung on the first held-out slice alone, as before the slices; it
    scores each finalist exactly as the first of the default's five slices did (the same trials)."""
    out, overrides, _ = auto_run
    run(compose_config(overrides + ["optim.lr_find.final_folds=1"]), run_dir=tmp_path / "one")
    one = json.loads((tmp_path / "one" / "lr_find.json").read_text())["trials"]
    five = json.loads((out / "lr_find.json").read_text())["trials"]
    assert one["rungs"][:-1] == five["rungs"][:-1]  # the short rungs are the same
    final = one["rungs"][-1]
    assert "slices" not in final and "folds" not in final and one["final_folds"] == 1 and one["final_images"] == 3
    assert final["values"] == [[c, slices[0][1]] for c, slices in five["rungs"][-1]["slices"]]
    assert final["scores"] == [[c, slices[0][0]] for c, slices in five["rungs"][-1]["slices"]]
    assert one["updates"] == five["updates"] - 4 * final["updates"] * len(final["scores"])


def test_a_trial_as_long_as_the_run_trains_as_the_run_does(auto_run, tmp_path, monkeypatch):
    """The final rung compares what runs deliver: a trial of the run's length, on the whole training pool and judged
    on the validation set, ends at the run's own final val/loss. Each pass over the data is a new epoch (order and
    augmentation): a trial that repeated its first pass trained on fixed crops and ended far above the run."""
    _, overrides, _ = auto_run
    overrides = [o for o in overrides if not o.startswith("optim.lr")] + ["data.hflip=0.5"]  # augmentation that varies
    given = tmp_path / "given"
    run(compose_config(overrides + ["optim.lr=0.001"]), run_dir=given)
    final_loss = json.loads((given / "metrics.jsonl").read_text().splitlines()[-1])["val/loss"]

    import finetune.lr_find
    from finetune import builders

    seen, choose = {}, builders.choose_by_trials

    def keep_split(*args, split, **kwargs):
        seen["val"] = list(split.val)
        return choose(*args, split=split, **kwargs)

    def one_trial(candidates, score, *, final_updates, usual, **_):
        seen["loss"] = score((0.001, "none"), final_updates)
        return [{"updates": final_updates, "scores": [[[0.001, "none"], seen["loss"]]], "kept": [[0.001, "none"]]}]

    monkeypatch.setattr(builders, "choose_by_trials", keep_split)
    monkeypatch.setattr(finetune.lr_find, "holdout_split", lambda samples, **_: (list(samples), seen["val"]))
    monkeypatch.setattr(finetune.lr_find, "select", one_trial)
    run(compose_config(overrides + AUTO), run_dir=tmp_path / "auto")
    assert seen["loss"] == pytest.approx(final_loss, rel=1e-5)


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


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """``optim.lr=auto`` where the backbone frozen wins: its weights come from a run on images like these (good
    features: a head alone learns fastest), and ``fallback_lr`` 0.03 gives the head 0.03, 0.09 and 0.3 to try."""
    base = tmp_path_factory.mktemp("lr_auto_frozen")
    run(compose_config(tiny_overrides(make_image_folder(base / "pre", classes=4), epochs=4) + ["optim.lr=3e-3"]),
        run_dir=base / "pre")
    overrides = tiny_overrides(make_image_folder(base / "images"), epochs=2) + AUTO + [
        f"model.weights={base / 'pre' / 'checkpoints' / 'best.safetensors'}", "optim.lr_find.fallback_lr=0.03"]
    run(compose_config(overrides), run_dir=base / "auto")
    return base / "auto", overrides, json.loads((base / "auto" / "lr_find.json").read_text())


def test_a_run_that_chose_the_frozen_backbone_trains_as_one_given_it_by_hand(frozen_run, tmp_path):
    out, overrides, record = frozen_run
    assert record["freeze"] == "head_only" and [record["lr"], "head_only"] in record["trials"]["candidates"]
    by_hand = [o for o in overrides if not o.startswith("optim.lr")] + ["freeze=head_only",
                                                                          f"optim.lr={record['lr']!r}"]
    run(compose_config(by_hand), run_dir=tmp_path / "by_hand")
    assert_same_result(out, tmp_path / "by_hand")
    auto, hand = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (out, tmp_path / "by_hand"))
    assert auto["optimizer"]["param_groups"] == hand["optimizer"]["param_groups"]
    assert auto["freeze"] == hand["freeze"] and auto["lr_find"]["freeze"] == "head_only"
    log = (out / "train.log").read_text()
    assert f"optim.lr=auto: chose {record['lr']:.4g} with freeze=head_only (" in log
    assert "(freeze=head_only (chosen by optim.lr=auto))" in log  # the start of the run says what is frozen
    assert json.loads((out / "summary.json").read_text())["lr_find"]["freeze"] == "head_only"
    events = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0}).Reload()
    choice = events.Tensors("lr_find/choice/text_summary")[0].tensor_proto.string_val[0].decode()
    assert choice.startswith(f"lr {record['lr']:.4g}, freeze=head_only: ")
    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams  # TensorBoard's HPARAMS tab
    assert (hparams["auto.lr"].number_value, hparams["auto.freeze"].string_value) == (record["lr"], "head_only")


def test_a_resume_applies_the_chosen_freezing_without_searching(frozen_run, tmp_path, monkeypatch):
    out, overrides, record = frozen_run
    stopped = tmp_path / "stopped"
    with_signals(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        run(compose_config(overrides), run_dir=stopped)
    monkeypatch.undo()
    searched = json.loads((stopped / "lr_find.json").read_text())
    assert (searched["lr"], searched["freeze"]) == (record["lr"], "head_only")
    import finetune.lr_find

    monkeypatch.setattr(finetune.lr_find, "search", lambda *a, **k: pytest.fail("searched again on resume"))
    monkeypatch.setattr(finetune.lr_find, "run_trials", lambda *a, **k: pytest.fail("ran trials again on resume"))
    run(compose_config(overrides + ["resume=auto"]), run_dir=stopped)
    assert json.loads((stopped / "lr_find.json").read_text()) == searched
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
def test_a_sweep_records_each_jobs_chosen_rate_and_freezing(tmp_path):
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
        assert row["chosen_freeze"] == summary["lr_find"]["freeze"] == record["freeze"] in ("none", "head_only")
    assert "lr chosen" in result.stdout and "freeze chosen" in result.stdout


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
