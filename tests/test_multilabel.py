"""task=multilabel: metrics against scikit-learn, one real run on pasted-shape images (training, evaluate,
predict, ONNX export and the torch-free predictor, resume), and the settings it refuses.

Every number is compared with an independent computation: scikit-learn's AP and F1 on the saved scores,
the run's own metrics.jsonl, the weights file's metadata, the eager model's probabilities.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, make_multilabel_table, run_cli
from sklearn.metrics import average_precision_score, f1_score

from finetune.checkpoint.weights_file import load_model
from finetune.config import check_config
from finetune.errors import UserError
from finetune.predict import predict
from finetune.metrics import MultilabelAccumulator, average_precision, multilabel_result, tune_thresholds
from finetune.run import run
from test_checkpoint import assert_same_result

ML = ["model=resnet18", "model.name=test_resnet", "model.pretrained=false", "data=table", "task=multilabel",
      "data.img_size=32", "data.batch_size=8", "data.num_workers=0", "logger.progress_bar=false"]


# ------------------------------------------------------------ metrics against scikit-learn
def random_scores(seed: int, n: int = 200, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.random((n, c)) < np.array([0.5, 0.2, 0.05, 0.3, 0.0])[:c]  # the last class: no positive
    scores = np.clip(targets * 0.25 + rng.random((n, c)) * 0.75, 0, 1)
    scores = np.round(scores, 2)  # many ties, as low-precision scores have
    return scores, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_and_f1_equal_scikit_learn(seed):
    scores, targets = random_scores(seed)
    present = targets.any(axis=0)
    expected = average_precision_score(targets[:, present], scores[:, present], average="macro")
    thresholds = [0.3, 0.5, 0.6, 0.45, 0.5]
    result = multilabel_result(scores, targets, loss=0.0, thresholds=thresholds)
    assert result.mAP == pytest.approx(expected, abs=1e-12)
    assert result.per_class_ap[4] is None
    for c in range(4):
        assert result.per_class_ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
    predicted = scores >= np.array(thresholds)
    assert result.per_class_f1 == pytest.approx(list(f1_score(targets, predicted, average=None, zero_division=0)))
    assert result.f1 == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    assert result.exact_match == pytest.approx(float((predicted == targets).all(axis=1).mean()))


def test_tuned_thresholds_reach_the_best_f1_of_any_threshold():
    scores, targets = random_scores(3)
    tuned = tune_thresholds(scores, targets)
    for c in range(4):
        best = max(f1_score(targets[:, c], scores[:, c] >= t, zero_division=0) for t in np.unique(scores[:, c]))
        assert f1_score(targets[:, c], scores[:, c] >= tuned[c], zero_division=0) == pytest.approx(best)
    assert tuned[4] == 0.5  # no positive: the default


def test_batches_in_any_order_give_the_one_pass_result():
    import torch

    scores, targets = random_scores(4, n=37)
    logits = torch.logit(torch.tensor(scores).clamp(1e-4, 1 - 1e-4)).float()
    target = torch.tensor(targets, dtype=torch.float32)
    whole = MultilabelAccumulator(5)  # the batches in order, as one process evaluates them
    for b in range(4):
        whole.update(logits[b * 10:(b + 1) * 10], target[b * 10:(b + 1) * 10], 0.25)
    parts = MultilabelAccumulator(5)
    for b in (3, 0, 2, 1):  # as shards of several processes would arrive
        parts.update(logits[b * 10:(b + 1) * 10], target[b * 10:(b + 1) * 10], 0.25, batch=b)
    one, many = whole.result(), parts.result()
    assert np.array_equal(one.scores, many.scores) and np.array_equal(one.targets, many.targets)
    assert one.mAP == many.mAP and many.loss == one.loss == 1.0 / 37
    assert average_precision(np.array([0.5, 0.5]), np.array([False, False])) is None


# ------------------------------------------------------------ refused settings
@pytest.mark.parametrize("overrides, expected", [
    (["task=multilabel", "data=custom", "data.root=/x"], "task=multilabel needs several labels per image"),
    (["task=multilabel", "data=table", "data.file=t.csv", "head.subset=imagenet"], "head.subset 'imagenet'"),
    (["task=multilabel", "data=table", "data.file=t.csv", "model.num_classes=9"], "model.num_classes=9 adds spare"),
    (["task=multilabel", "data=table", "data.file=t.csv", "data.balance=sampler"], "data.balance=sampler draws"),
    (["task=multilabel", "data=table", "data.file=t.csv", "checkpoint.monitor=val/acc1"],
     "checkpoint.monitor 'val/acc1' is not a metric of task=multilabel"),
    (["data=table", "data.file=t.csv", "task.loss=bce"], "task.loss 'bce' is not a loss of task=multiclass"),
])
def test_settings_multilabel_cannot_use_are_refused_in_one_line(overrides, expected):
    with pytest.raises(UserError) as raised:
        check_config(compose_config(overrides))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_a_multilabel_table_reads_label_sets_and_empty_ones(tmp_path):
    from finetune.data import scan_table

    table = make_multilabel_table(tmp_path, images=30)
    split = scan_table(table, multilabel=True, check_images=False)
    written = {line.split(",")[0]: set(filter(None, line.split(",")[1].split(";")))
               for line in table.read_text().splitlines()[1:]}
    got = {str(Path(p).relative_to(tmp_path)): {split.class_names[c] for c in labels}
           for p, labels in split.train + split.val}
    assert got == written and any(not labels for labels in got.values())
    assert split.multilabel and split.to_record()["task"] == "multilabel"


# ------------------------------------------------------------ one real run, every command after it
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    base = tmp_path_factory.mktemp("multilabel")
    table = make_multilabel_table(base / "data", images=40)
    overrides = ML + [f"data.file={table}", "trainer.max_epochs=2", "checkpoint.every_n_steps=2",
                      "checkpoint.keep_last_k=null"]
    result = run_cli(overrides + [f"hydra.run.dir={base / 'run'}"], cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, base / "run", overrides


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_evaluate_reproduces_the_best_val_map_and_scikit_learn_agrees(trained):
    base, run_dir, _ = trained
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"val/mAP", "val/f1", "val/exact_match", "val/loss", "val/per_class_f1"} <= e.keys() for e in epochs)
    best = max(epochs, key=lambda e: e["val/mAP"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["metric"] == "val/mAP" and summary["best"]["value"] == best["val/mAP"]
    python("-m", "finetune.evaluate", f"ckpt={run_dir}", "progress_bar=false", f"out={base / 'eval'}", cwd=base)
    report = json.loads((base / "eval" / "metrics.json").read_text())
    assert report["mAP"] == best["val/mAP"]  # exactly: the same images, batches and scores
    assert report["loss"] == pytest.approx(best["val/loss"], abs=1e-7)
    meta = load_model(run_dir / "checkpoints" / "best.safetensors")[1]
    assert meta.task == "multilabel" and [m["threshold"] for m in report["per_class"].values()] == meta.thresholds
    with open(base / "eval" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = report["class_names"]
    assert len(rows) == report["num_images"] == len(json.loads((run_dir / "split.json").read_text())["files"]["val"])
    scores = np.array([[float(r[f"p:{n}"]) for n in names] for r in rows])
    targets = np.array([[n in r["true"].split(";") for n in names] for r in rows])
    present = targets.any(axis=0)
    assert report["mAP"] == pytest.approx(average_precision_score(targets[:, present], scores[:, present]), abs=1e-12)
    predicted = scores >= np.array(meta.thresholds)
    assert report["f1_macro"] == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    assert report["f1_micro"] == pytest.approx(f1_score(targets, predicted, average="micro", zero_division=0))
    assert report["hamming_loss"] == pytest.approx(float((predicted != targets).mean()))
    for c, name in enumerate(names):  # the tuned thresholds are the best F1 on these same val images
        best_f1 = max(f1_score(targets[:, c], scores[:, c] >= t, zero_division=0) for t in np.unique(scores[:, c]))
        assert report["per_class"][name]["f1"] == pytest.approx(best_f1) or not targets[:, c].any()


@pytest.mark.slow
def test_predict_export_and_the_onnx_predictor_agree(trained):
    base, run_dir, _ = trained
    images = base / "data" / "images"
    python("-m", "finetune.predict", f"ckpt={run_dir}", f"inputs={images}", "progress_bar=false", "num_workers=0",
           f"out={base / 'pred'}", cwd=base)
    python("-m", "finetune.export", f"ckpt={run_dir}", "format=onnx", f"out={base / 'model.onnx'}", cwd=base)
    python("-m", "finetune.onnx_predict", str(base / "model.onnx"), str(images), "--out", str(base / "onnx.csv"),
           cwd=base)
    meta = load_model(run_dir / "checkpoints" / "best.safetensors")[1]
    read = {name: list(csv.DictReader(open(base / name, newline=""))) for name in
            ("pred/predictions.csv", "onnx.csv")}
    eager, onnx = read.values()
    columns = ["path", "labels"] + [f"p:{n}" for n in meta.class_names]
    assert list(eager[0]) == columns and list(onnx[0]) == columns and len(eager) == 40
    decided = 0
    for row in eager:  # a probability within the CSV's rounding of its threshold may go either way
        for name, threshold in zip(meta.class_names, meta.thresholds):
            p = float(row[f"p:{name}"])
            if abs(p - threshold) > 1e-6:
                assert (name in row["labels"].split(";")) == (p >= threshold), (row, threshold)
                decided += 1
    assert decided > 100
    everything = predict(run_dir, images, thresholds=0.0)  # thresholds= overrides the tuned ones
    assert all(row["labels"] == ";".join(meta.class_names) for row in everything)
    assert [round(r[f"p:{n}"], 6) for r in everything for n in meta.class_names] == \
        [float(r[f"p:{n}"]) for r in eager for n in meta.class_names]
    for a, b in zip(eager, onnx):
        assert a["path"] == b["path"] and a["labels"] == b["labels"]
        for name in meta.class_names:
            assert float(a[f"p:{name}"]) == pytest.approx(float(b[f"p:{name}"]), abs=1e-5)


@pytest.mark.slow
def test_resume_mid_epoch_in_multilabel_ends_bit_identical(trained, tmp_path):
    _, run_dir, overrides = trained
    out = shutil.copytree(run_dir, tmp_path / "run")
    states = sorted((out / "checkpoints").glob("epoch001-step*.ckpt"))
    state = next(s for s in states if s.name != "epoch001-step000004.ckpt")  # epoch 2 has begun, mid-epoch
    run(compose_config(overrides + [f"resume={state}"]), run_dir=out)
    assert_same_result(out, run_dir)
    assert (out / "metrics.jsonl").read_text() .splitlines()[-1].split('"seconds"')[0] == \
        (run_dir / "metrics.jsonl").read_text().splitlines()[-1].split('"seconds"')[0]


def test_the_losses_of_task_multilabel():
    import torch
    from omegaconf import OmegaConf
    from timm.loss import AsymmetricLossMultiLabel

    from finetune.builders import build_loss

    logits, target = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), (torch.rand(6, 4) > 0.5).float()
    task = OmegaConf.create({"name": "multilabel", "loss": "bce", "asl_gamma_neg": 4.0, "asl_gamma_pos": 1.0,
                             "asl_clip": 0.05})
    weight = torch.tensor([1.0, 2.0, 3.0, 0.5])
    bce = build_loss(task, weight=weight, smoothing=0.0)(logits, target)
    assert torch.equal(bce, torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, target))
    smoothed = build_loss(task, weight=None, smoothing=0.1)(logits, target)
    assert torch.allclose(smoothed, torch.nn.BCEWithLogitsLoss()(logits, target * 0.9 + 0.05))
    asl = build_loss(OmegaConf.merge(task, {"loss": "asl"}), weight=None, smoothing=0.0)(logits, target)
    summed = AsymmetricLossMultiLabel(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="sum")(logits, target)
    assert torch.allclose(asl, summed / target.numel())  # a mean over images and classes, as BCE's


@pytest.mark.slow
def test_ddp_val_map_is_the_map_of_the_whole_set_not_an_average_of_ranks(trained, tmp_path):
    """Two gloo processes train one epoch; each epoch's val/mAP must be the AP of every rank's scores
    together: the single-process evaluate of the same weights gives it exactly (a mean of the two
    ranks' APs would not). 8 val images in batches of 4: each rank scores one batch."""
    from test_distributed import ok, torchrun

    base, _, overrides = trained
    run_dir = tmp_path / "ddp"
    common = [o.replace("data.batch_size=8", "data.batch_size=4") for o in overrides[:-3]]
    ok(torchrun([*common, "trainer.max_epochs=1", "trainer.device=cpu",
                 f"hydra.run.dir={run_dir}"], nproc=2, cwd=tmp_path))
    epoch = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    python("-m", "finetune.evaluate", f"ckpt={run_dir}", "progress_bar=false", f"out={tmp_path / 'eval'}",
           cwd=tmp_path)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["num_images"] == 8 and report["mAP"] == epoch["val/mAP"]


def test_optim_lr_auto_and_ema_work_with_multilabel(tmp_path):
    """The range test and its trial fine-tunes (held-out slice of label sets, judged by BCE) and EMA take
    task=multilabel as they take multiclass: the run ends with its trials recorded and EMA's val/mAP."""
    table = make_multilabel_table(tmp_path / "data", images=40)
    out = tmp_path / "run"
    run(compose_config(ML + [f"data.file={table}", "trainer.max_epochs=2", "optim.lr=auto",
                             "optim.lr_find.trial_updates=2", "trainer.ema=true"]), run_dir=out)
    record = json.loads((out / "lr_find.json").read_text())
    assert record["selected_by"] == "trials" and record["trials"]["holdout_images"] > 0
    assert [record["lr"], record["freeze"]] in record["trials"]["candidates"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["best"]["metric"] == "val/mAP"
    assert summary["lr_find"]["lr"] == record["lr"]
