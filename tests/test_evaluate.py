"""``python -m finetune.evaluate``: a run's best checkpoint re-evaluated gives the run's own numbers,
the report is consistent with itself, and bad input is one line.

Two tiny runs are trained once for the module (train/val folders, and a class-folder root split by
seed); CLI runs that do not depend on each other start together, since each spends most of its
time importing torch on one of the two cores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from conftest import CONFIG_DIR, assert_one_line_errors, make_image_folder, run_together, tiny_overrides
from finetune.evaluate import expected_calibration_error, per_class_metrics
from finetune.evaluate import run as evaluate_run

QUIET = ["data.num_workers=0", "progress_bar=false"]


def evaluate_args(ckpt: Path, root: Path, out: Path) -> list[str]:
    return [f"ckpt={ckpt}", "data=custom", f"data.root={root}", f"hydra.run.dir={out}", *QUIET]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two trained runs and their evaluations by the CLI (the checkpoint named as a run dir, and as a file)."""
    work = tmp_path_factory.mktemp("evaluate")
    folders = make_image_folder(work / "folders", train=6, val=6)
    for class_dir in (folders / "val").iterdir():  # photos large enough to be decoded at 1/2 (a 32 px model)
        for i in range(2):
            with Image.open(class_dir / f"{i}.png") as small:
                small.resize((160, 120), Image.Resampling.BICUBIC).save(class_dir / f"{i}.jpg", quality=90)
            (class_dir / f"{i}.png").unlink()
    flat = make_image_folder(work / "flat", train=10, val=6, split=False)  # 16 a class: 3 held out by seed
    trained = run_together({name: tiny_overrides(root) + [f"hydra.run.dir={work / name}"]
                            for name, root in (("run_folders", folders), ("run_flat", flat))}, module="finetune",
                           cwd=work)
    for result in trained.values():
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = run_together({
        "eval_folders": evaluate_args(work / "run_folders", folders, work / "eval_folders"),
        "eval_flat": evaluate_args(work / "run_flat/checkpoints/best.safetensors", flat, work / "eval_flat"),
    }, module="finetune.evaluate", cwd=work)
    for result in evaluated.values():
        assert result.returncode == 0, result.stderr[-3000:]
    (work / "eval_folders.stdout").write_text(evaluated["eval_folders"].stdout)
    return work


def best_epoch_metrics(run_dir: Path) -> dict:
    """The run's own record of its best epoch: summary.json's best, and that epoch's line of metrics.jsonl."""
    best = json.loads((run_dir / "summary.json").read_text())["best"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch = next(line for line in lines if line["epoch"] == best["epoch"])
    assert best["metric"] == "val/acc1" and epoch["val/acc1"] == best["value"]
    return epoch


@pytest.mark.slow
@pytest.mark.parametrize("run, evaluation, source", [("run_folders", "eval_folders", "folder"),
                                                     ("run_flat", "eval_flat", "split.json")])
def test_best_checkpoint_reproduces_the_runs_val_acc1_and_loss_exactly(work, run, evaluation, source):
    metrics = json.loads((work / evaluation / "metrics.json").read_text())
    best = best_epoch_metrics(work / run)
    assert metrics["acc1"] == best["val/acc1"]  # exactly, not approximately
    assert metrics["loss"] == best["val/loss"]  # same batches, same summation order
    split = json.loads((work / run / "split.json").read_text())
    assert metrics["num_images"] == len(split["files"]["val"]) and metrics["split_source"] == source
    assert metrics["batch_size"] == 4  # the run's data.batch_size, read from its .hydra/config.yaml


@pytest.mark.slow
def test_split_json_is_the_file_list_even_when_the_folder_moved_and_grew(work, tmp_path):
    """A seeded re-split of the grown folder would hold out other images; split.json names the run's."""
    moved = shutil.copytree(work / "flat", tmp_path / "moved")
    for class_dir in moved.iterdir():  # new images change the seeded split of every class
        for i in range(4):
            shutil.copy(class_dir / "0.png", class_dir / f"new{i}.png")
    cfg = compose_evaluate([f"ckpt={work / 'run_flat'}", f"data.root={moved}", *QUIET])
    metrics = evaluate_run(cfg, out_dir=tmp_path / "out")
    assert metrics["split_source"] == "split.json"
    assert (metrics["acc1"], metrics["loss"]) == (json.loads((work / "eval_flat/metrics.json").read_text())["acc1"],
                                                  best_epoch_metrics(work / "run_flat")["val/loss"])
    wrong = [row["path"] for row in read_csv(tmp_path / "out/misclassified.csv")]
    assert all(path.startswith(str(moved)) and "new" not in Path(path).name for path in wrong)


@pytest.mark.slow
def test_without_data_root_the_runs_own_images_are_evaluated(work, tmp_path):
    metrics = evaluate_run(compose_evaluate([f"ckpt={work / 'run_flat'}", *QUIET]), out_dir=tmp_path)
    assert metrics["data_root"] == str(work / "flat") and metrics["split_source"] == "split.json"
    assert (metrics["acc1"], metrics["loss"]) == (best_epoch_metrics(work / "run_flat")["val/acc1"],
                                                  best_epoch_metrics(work / "run_flat")["val/loss"])


@pytest.mark.slow
def test_report_files_agree_with_each_other(work):
    out = work / "eval_folders"
    metrics = json.loads((out / "metrics.json").read_text())
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    matrix = torch.tensor(confusion["matrix"])
    names = ["class_0", "class_1", "class_2"]
    assert set(metrics) >= {"acc1", "acc5", "loss", "macro_f1", "balanced_acc", "ece", "per_class", "num_images",
                            "class_names", "checkpoint", "split"}
    assert metrics["class_names"] == confusion["class_names"] == names and metrics["split"] == "val"
    total, hits = int(matrix.sum()), int(matrix.trace())
    assert metrics["num_images"] == total == 18 and metrics["acc1"] == hits / total
    assert metrics["acc5"] is None  # 3 classes
    # macro F1 and balanced accuracy from the confusion matrix, computed here by hand
    f1s, recalls = [], []
    for i, name in enumerate(names):
        tp, support, predicted = int(matrix[i, i]), int(matrix[i].sum()), int(matrix[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
        recalls.append(recall)
        assert metrics["per_class"][name]["support"] == support
        assert metrics["per_class"][name]["precision"] == pytest.approx(precision, abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / 3, abs=1e-12)
    assert metrics["balanced_acc"] == pytest.approx(sum(recalls) / 3, abs=1e-12)
    assert 0.0 <= metrics["ece"] <= 1.0
    wrong = read_csv(out / "misclassified.csv")
    assert len(wrong) == total - hits and all(row["true"] != row["predicted"] for row in wrong)
    assert all(matrix[names.index(r["true"]), names.index(r["predicted"])] > 0 for r in wrong)
    best = work / "run_folders/checkpoints/best.safetensors"
    sha256 = hashlib.sha256(best.read_bytes()).hexdigest()
    assert metrics["checkpoint"] == {"path": str(best.resolve()), "sha256": sha256}
    assert Image.open(out / "confusion_matrix.png").size[0] > 3 * 28
    table = (work / "eval_folders.stdout").read_text()
    assert all(name in table for name in names) and "macro avg" in table and f"acc1 {metrics['acc1']:.4f}" in table


def test_metric_helpers_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 2], [0, 0, 4]])
    per_class = per_class_metrics(confusion, ["a", "b", "c"])
    assert per_class["a"] == {"precision": 1.0, "recall": 0.75, "f1": pytest.approx(6 / 7), "support": 4}
    assert per_class["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # ECE, 15 bins: 0.95 (bin 15) right once of twice, 0.5 (bin 8) right twice of twice
    confidence = torch.tensor([0.95, 0.95, 0.5, 0.5], dtype=torch.float64)
    ece = expected_calibration_error(confidence, torch.tensor([True, False, True, True]))
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.5)
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy (TorchScript) ONNX exporter
def test_onnx_export_gives_the_same_acc1(work, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from finetune.inference import INPUT_NAME, OUTPUT_NAME, export_metadata, load_checkpoint

    model, meta, source = load_checkpoint(work / "run_folders")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, torch.zeros(2, *meta.data_config["input_size"]), str(path), dynamo=False,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    exported = onnx.load(str(path))
    for key, value in export_metadata(meta, source=source).items():
        exported.metadata_props.add(key=key, value=value)
    onnx.save(exported, str(path))
    metrics = evaluate_run(compose_evaluate([f"ckpt={path}", f"data.root={work / 'folders'}", "batch_size=4", *QUIET]),
                           out_dir=tmp_path / "out")
    eager = json.loads((work / "eval_folders/metrics.json").read_text())
    assert metrics["acc1"] == eager["acc1"] and metrics["loss"] == pytest.approx(eager["loss"], abs=1e-5)
    assert metrics["checkpoint"]["path"] == str(path.resolve())


@pytest.mark.slow
def test_a_subset_of_the_classes_is_evaluated_with_a_warning(work, tmp_path, caplog):
    subset = tmp_path / "subset"
    for part in ("train", "val"):
        for name in ("class_0", "class_2"):
            shutil.copytree(work / "folders" / part / name, subset / part / name)
    metrics = evaluate_run(compose_evaluate([f"ckpt={work / 'run_folders'}", f"data.root={subset}", *QUIET]),
                           out_dir=tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.name == "finetune" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'class_1'" in warnings[0] and "2 of the checkpoint's 3 classes" in warnings[0]
    assert metrics["num_images"] == 12 and metrics["per_class"]["class_1"]["support"] == 0
    full = json.loads((work / "eval_folders/metrics.json").read_text())["per_class"]
    for name in ("class_0", "class_2"):  # labels mapped by name: the same images get the same recall
        assert metrics["per_class"][name]["recall"] == full[name]["recall"]
    matrix = torch.tensor(json.loads((tmp_path / "out/confusion_matrix.json").read_text())["matrix"])
    assert matrix[1].sum() == 0 and metrics["acc1"] == matrix.trace() / 12


@pytest.fixture
def bad_inputs(work, tmp_path) -> dict[str, Path]:
    """A weights file that is not finetune's, a truncated one, and a folder with a renamed class."""
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    best = (work / "run_folders/checkpoints/best.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(best[: len(best) // 2])
    renamed = shutil.copytree(work / "folders", tmp_path / "renamed")
    for part in ("train", "val"):
        (renamed / part / "class_1").rename(renamed / part / "dog")
    return {"foreign": tmp_path / "foreign.safetensors", "truncated": tmp_path / "truncated.safetensors",
            "renamed": renamed}


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(work, bad_inputs, tmp_path):
    cases = {
        "truncated": (evaluate_args(bad_inputs["truncated"], work / "folders", tmp_path / "out1"),
                      [f"'{bad_inputs['truncated']}' cannot be read", "truncated"]),
        "classes differ": (evaluate_args(work / "run_folders", bad_inputs["renamed"], tmp_path / "out2"),
                           ["not in the checkpoint: 'dog'", "not in the data: 'class_1'"]),
    }
    results = run_together({name: args for name, (args, _) in cases.items()}, module="finetune.evaluate", cwd=tmp_path)
    assert_one_line_errors(results, {name: expected for name, (_, expected) in cases.items()})
    assert not any(tmp_path.glob("out*/*")), "an evaluation that failed wrote files"


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("foreign", "is not a finetune weights file"),
    ("missing ckpt", "does not exist: pass ckpt=RUN_DIR"),
    ("no ckpt", "ckpt is required"),
    ("missing root", "data.root '{tmp}/nowhere' does not exist"),
    ("split", "split must be one of val | train | all, got 'test'"),
])
def test_bad_input_is_a_user_error_naming_it(work, bad_inputs, tmp_path, case, expected):
    from finetune.errors import UserError

    overrides = {
        "foreign": [f"ckpt={bad_inputs['foreign']}", f"data.root={work / 'folders'}"],
        "missing ckpt": [f"ckpt={tmp_path / 'nothing.safetensors'}", f"data.root={work / 'folders'}"],
        "no ckpt": [f"data.root={work / 'folders'}"],
        "missing root": [f"ckpt={work / 'run_folders'}", f"data.root={tmp_path / 'nowhere'}"],
        "split": [f"ckpt={work / 'run_folders'}", "split=test"],
    }[case]
    with pytest.raises(UserError, match=re.escape(expected.format(tmp=tmp_path))):
        evaluate_run(compose_evaluate(overrides + QUIET), out_dir=tmp_path / "out")
    assert not any((tmp_path / "out").glob("*"))


def compose_evaluate(overrides: list[str]):
    """conf/evaluate.yaml composed as the CLI composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
