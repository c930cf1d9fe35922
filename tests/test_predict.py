"""``python -m finetune.predict`` and ``finetune.predict.predict``: the labels and probabilities of the
eager model, the CSV's columns, EXIF orientation as in training, skipped files, globs, and flip TTA.

One tiny run is trained for the module; CLI runs that do not depend on each other start together.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_errors, make_image_folder, run_together, tiny_overrides
from finetune.errors import UserError
from finetune.inference import load_checkpoint, read_image
from finetune.predict import predict

EXIF_ORIENTATION = 0x0112


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A trained run, an input folder (images in sub-folders, a text file, a broken image), and the CLI's
    predictions for the folder (default topk) and for a glob (topk=2, tta=hflip)."""
    work = tmp_path_factory.mktemp("predict")
    images = make_image_folder(work / "images", train=4, val=3)
    trained = run_together({"train": [*tiny_overrides(images), f"hydra.run.dir={work / 'run'}"]}, cwd=work,
                           module="finetune")
    assert trained["train"].returncode == 0, trained["train"].stderr[-3000:]
    inputs = work / "inputs"
    for class_dir in sorted((images / "val").iterdir()):
        (inputs / class_dir.name).mkdir(parents=True)
        for image in class_dir.iterdir():
            (inputs / class_dir.name / image.name).write_bytes(image.read_bytes())
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (inputs / ".hidden.png").write_bytes((inputs / "class_0" / "0.png").read_bytes())
    common = [f"ckpt={work / 'run'}", "num_workers=0", "progress_bar=false", "device=cpu"]
    results = run_together({
        "folder": [*common, f"inputs={inputs}", f"hydra.run.dir={work / 'pred_folder'}"],
        "glob": [*common, f"inputs='{inputs}/**/[01].png'", "topk=2", "tta=hflip",  # quoted: [ ] for Hydra
                 f"hydra.run.dir={work / 'pred_glob'}"],
    }, module="finetune.predict", cwd=work)
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        (work / f"{name}.stdout").write_text(result.stdout)
    return work


def eager_probabilities(run: Path, paths: list[Path], *, hflip: bool = False) -> torch.Tensor:
    """Softmax of the eager model on images read and preprocessed as training evaluated them."""
    model, meta, _ = load_checkpoint(run)
    batch = torch.stack([meta.preprocess(p) for p in paths])
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
        return (probs + model(batch.flip(dims=[3])).softmax(dim=1)) / 2 if hflip else probs


@pytest.mark.slow
def test_labels_and_probabilities_are_the_eager_models(work):
    columns, rows = read_csv(work / "pred_folder/predictions.csv")
    assert columns == ["path", "label", "prob", "top2", "prob2", "top3", "prob3"]  # topk=5 capped at 3 classes
    expected = sorted(p for p in (work / "inputs").rglob("*.png") if not p.name.startswith("."))
    assert [Path(r["path"]) for r in rows] == expected  # recursive, sorted; hidden and non-image files left out
    probs = eager_probabilities(work / "run", expected)
    names = ["class_0", "class_1", "class_2"]
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(dim=1).tolist()]
    for row, p in zip(rows, probs):
        top = p.topk(3)
        assert [row["label"], row["top2"], row["top3"]] == [names[i] for i in top.indices.tolist()]
        assert [float(row[k]) for k in ("prob", "prob2", "prob3")] == pytest.approx(top.values.tolist(), abs=1e-6)


@pytest.mark.slow
def test_non_images_are_skipped_with_one_warning_naming_them(work):
    stdout = (work / "folder.stdout").read_text()
    warnings = [line for line in stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, stdout
    assert "notes.txt" in warnings[0] and "broken.jpg" in warnings[0] and "skipped 2 of" in warnings[0]


@pytest.mark.slow
def test_glob_topk_and_flip_tta(work):
    columns, rows = read_csv(work / "pred_glob/predictions.csv")
    assert columns == ["path", "label", "prob", "top2", "prob2"]
    expected = sorted((work / "inputs").glob("*/[01].png"))
    assert [Path(r["path"]) for r in rows] == expected and len(expected) == 6
    probs = eager_probabilities(work / "run", expected, hflip=True)
    plain = eager_probabilities(work / "run", expected)
    assert not torch.allclose(probs, plain, atol=1e-4)  # the flip changes the answer: the test can fail
    for row, p in zip(rows, probs):
        assert [float(row["prob"]), float(row["prob2"])] == pytest.approx(p.topk(2).values.tolist(), abs=1e-6)


@pytest.mark.slow
def test_python_function_flip_tta_is_the_mean_of_the_two_softmaxes(work):
    paths = sorted((work / "inputs").glob("*/2.png"))
    rows = predict(work / "run", [str(p) for p in paths], topk=3, tta="hflip", device="cpu")
    assert [Path(r["path"]) for r in rows] == paths and len(paths) == 3  # a row per image, in order
    expected = eager_probabilities(work / "run", paths, hflip=True)
    assert not torch.allclose(expected, eager_probabilities(work / "run", paths), atol=1e-4)  # the flip matters
    names = ["class_0", "class_1", "class_2"]
    for row, p in zip(rows, expected):
        got = {row["label"]: row["prob"], row["top2"]: row["prob2"], row["top3"]: row["prob3"]}
        assert [got[n] for n in names] == pytest.approx(p.tolist(), abs=1e-7)


@pytest.mark.slow
def test_exif_orientation_is_applied_as_in_training(work, tmp_path):
    """A JPEG stored sideways with orientation 6 predicts exactly as the upright image; without the
    tag (the same pixels) it does not."""
    rng = np.random.default_rng(3)
    upright = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    upright[4:16, 2:20] = (220, 40, 40)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 clockwise to display": stored turned 90 counter-clockwise
    Image.fromarray(np.rot90(upright).copy()).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "tagged.jpg").convert("RGB"))  # the decoded pixels, untouched
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / "upright.png")  # turned back by hand
    Image.fromarray(stored).save(tmp_path / "sideways.png")
    rows = {Path(r["path"]).name: r for r in predict(work / "run", tmp_path, topk=3, device="cpu")}
    probs = {name: sorted((r[f"top{k}" if k > 1 else "label"], r[f"prob{k}" if k > 1 else "prob"])
                          for k in (1, 2, 3)) for name, r in rows.items()}
    assert probs["tagged.jpg"] == probs["upright.png"]
    assert probs["sideways.png"] != probs["upright.png"]
    _, meta, _ = load_checkpoint(work / "run")
    assert np.array_equal(np.asarray(read_image(tmp_path / "tagged.jpg", meta)), np.rot90(stored, k=-1))


@pytest.mark.slow
def test_topk_is_capped_and_checked(work):
    image = min((work / "inputs").glob("*/0.png"))
    assert list(predict(work / "run", image, topk=1, device="cpu")[0]) == ["path", "label", "prob"]
    assert len(predict(work / "run", image, topk=50, device="cpu")[0]) == 1 + 2 * 3
    with pytest.raises(UserError, match="topk must be a positive integer, got '0'"):
        predict(work / "run", image, topk=0)
    with pytest.raises(UserError, match=re.escape("tta must be one of none | hflip, got 'vflip'")):
        predict(work / "run", image, tta="vflip")


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(work, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    best = (work / "run/checkpoints/best.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(best[: len(best) // 3])
    cases = {
        "no images": ([f"ckpt={work / 'run'}", f"inputs={empty}"], [f"inputs '{empty}' has no images", "readme.md"]),
        "truncated ckpt": ([f"ckpt={tmp_path / 'truncated.safetensors'}", f"inputs={work / 'inputs'}"],
                           [f"'{tmp_path / 'truncated.safetensors'}' cannot be read", "truncated"]),
    }
    results = run_together({name: [*args, f"hydra.run.dir={tmp_path / name.replace(' ', '_')}", "num_workers=0"]
                            for name, (args, _) in cases.items()}, module="finetune.predict", cwd=tmp_path)
    assert_one_line_errors(results, {name: expected for name, (_, expected) in cases.items()})
    assert not list(tmp_path.glob("*/predictions.csv"))


@pytest.mark.slow
def test_bad_input_is_a_user_error_naming_it(work, tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    image = min((work / "inputs").glob("*/0.png"))
    with pytest.raises(UserError, match="is not a finetune weights file"):
        predict(tmp_path / "foreign.safetensors", image)
    with pytest.raises(UserError, match="checkpoint '.*nothing.safetensors' does not exist"):
        predict(tmp_path / "nothing.safetensors", image)
    with pytest.raises(UserError, match=f"inputs '{re.escape(str(tmp_path / 'nowhere'))}' does not exist"):
        predict(work / "run", tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"inputs '.*/\*\.webp' matches no file"):
        predict(work / "run", f"{work / 'inputs'}/*.webp")
    with pytest.raises(UserError, match="inputs is required"):
        predict(work / "run", [])
