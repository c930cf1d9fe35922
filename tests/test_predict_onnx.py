"""finetune.onnx_predict (``finetune-predict-onnx``): torch-free, and the same top-1 labels as the eager
model and finetune.predict.

Its preprocessing is compared with timm's eval transform pixel for pixel (in-process, fast); the
end-to-end tests train one tiny run, export it to ONNX, and run the script on images of every kind
finetune reads (grey, RGBA, palette with transparency, 16-bit, EXIF-rotated, larger, non-square).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_image_folder, run_cli, tiny_overrides
from finetune.data.dataset import load_image, load_transformed
from finetune.data.transforms import build_transforms
from finetune.inference import load_checkpoint

MODULE = "finetune.onnx_predict"
EXIF_ORIENTATION = 0x0112
# Runs a module (or a script file) with every import of torch (and of what needs it) refused and recorded,
# even one it would catch; exit status 3 if any was attempted, whatever it did. finetune's own torch-free
# modules may load: they are what the installed predictor is made of.
TORCH_FREE = """
import runpy, sys
REFUSED = {"torch", "torchvision", "timm"}
class Refuse:
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            self.attempts.append(name)
            raise ImportError(f"refused import of {name!r}")
        return None
sys.meta_path.insert(0, Refuse())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in REFUSED)
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as stop:
    code = stop.code
except ImportError as err:
    print(f"import failed: {err}", file=sys.stderr)
    code = 4
if loaded or Refuse.attempts:
    print(f"not torch-free: {loaded + Refuse.attempts}", file=sys.stderr)
    code = 3
sys.exit(code)
"""


def run_torch_free(target: str | Path, *args: str) -> subprocess.CompletedProcess:
    """``target`` (a module name, or a script's path) run with torch refused (`TORCH_FREE`)."""
    return subprocess.run([sys.executable, "-c", TORCH_FREE, str(target), *args], capture_output=True, text=True,
                          timeout=120)


def read_csv(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(text.splitlines())
    return list(reader.fieldnames or []), list(reader)


def make_odd_images(folder: Path) -> None:
    """One image of each kind finetune converts, in a sub-folder, plus a file that is not an image."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    Image.fromarray(noise(30, 40, 4)).save(folder / "rgba.png")
    Image.fromarray(noise(36, 36, 1)[..., 0]).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 65536, (40, 33), dtype=np.uint16)).save(folder / "deep.png")
    palette = Image.fromarray(noise(33, 50, 3)).convert("P")
    palette.save(folder / "palette.png", transparency=5)
    rotated = Image.fromarray(noise(30, 50, 3))
    exif = rotated.getexif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape, shown portrait
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(noise(48, 64, 3)).save(folder / "large.jpg", quality=95)
    # over twice a 32 px model's resize target: decoded reduced (1/4), by finetune and by the script alike
    photo = np.linspace(0, 255, 260 * 180 * 3).reshape(180, 260, 3).astype(np.uint8) // 2 + noise(180, 260, 3) // 2
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    turned = Image.fromarray(photo[:167, :251])
    exif = turned.getexif()
    exif[EXIF_ORIENTATION] = 6  # odd sides, shown portrait: the reduced decode is rotated after decoding
    turned.save(folder / "photo_rotated.jpg", exif=exif, quality=90)
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A trained run, its ONNX export (``model.onnx``) and an input folder (``inputs/``)."""
    work = tmp_path_factory.mktemp("predict_onnx")
    images = make_image_folder(work / "images", train=4, val=3)
    trained = run_cli(tiny_overrides(images, epochs=1) + [f"hydra.run.dir={work / 'run'}"], cwd=work)
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = subprocess.run([sys.executable, "-m", "finetune.export", f"ckpt={work / 'run'}",
                               f"out={work / 'model.onnx'}"], cwd=work, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    for class_dir in (images / "val").iterdir():
        (work / "inputs" / class_dir.name).mkdir(parents=True)
        for image in class_dir.iterdir():
            (work / "inputs" / class_dir.name / image.name).write_bytes(image.read_bytes())
    make_odd_images(work / "inputs" / "odd")
    return work


@pytest.fixture(scope="module")
def predicted(work: Path) -> subprocess.CompletedProcess:
    return run_torch_free(MODULE, str(work / "model.onnx"), str(work / "inputs"), "--topk", "2")


@pytest.mark.slow
def test_the_predictor_never_imports_torch(work: Path, predicted, tmp_path: Path) -> None:
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "not torch-free" not in predicted.stderr
    # the check itself: a script that merely tries torch (and would carry on without it) fails it
    probe = tmp_path / "probe.py"
    probe.write_text("try:\n    import torch\nexcept ImportError:\n    pass\n")
    refused = run_torch_free(probe)
    assert refused.returncode == 3 and "not torch-free: ['torch']" in refused.stderr


@pytest.mark.slow
def test_the_installed_command_and_the_old_script_path_predict_the_same(work: Path, predicted) -> None:
    """``finetune-predict-onnx`` (the console script beside this interpreter) and scripts/predict_onnx.py
    (kept for older notes) run the same predictor, torch-free."""
    command = Path(sys.executable).with_name("finetune-predict-onnx")
    installed = subprocess.run([str(command), str(work / "model.onnx"), str(work / "inputs"), "--topk", "2"],
                               capture_output=True, text=True, timeout=120, cwd=work)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert installed.stdout == predicted.stdout
    script = run_torch_free(REPO / "scripts" / "predict_onnx.py", str(work / "model.onnx"), str(work / "inputs"),
                            "--topk", "2")
    assert script.returncode == 0 and script.stdout == predicted.stdout, script.stderr[-2000:]


@pytest.mark.slow
def test_top1_labels_and_probabilities_are_the_eager_models(work: Path, predicted) -> None:
    columns, rows = read_csv(predicted.stdout)
    assert columns == ["path", "label", "prob", "top2", "prob2"]
    expected = sorted(str(p) for p in (work / "inputs").rglob("*") if p.suffix != ".txt" and p.is_file())
    assert sorted(r["path"] for r in rows) == expected and len(expected) == 9 + 8
    assert "notes.txt" in predicted.stderr  # named, and left out
    model, meta, _ = load_checkpoint(work / "run")
    x = torch.stack([meta.preprocess(r["path"]) for r in rows])
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert [r["label"] for r in rows] == [meta.class_names[i] for i in probs.argmax(1).tolist()]
    assert np.allclose([float(r["prob"]) for r in rows], probs.max(1).values.numpy(), atol=2e-6)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("finetune.predict") is None, reason="finetune.predict is not there yet")
def test_labels_equal_finetune_predicts(work: Path, predicted) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.predict", f"ckpt={work / 'run'}", f"inputs={work / 'inputs'}", "topk=2",
         "device=cpu", "num_workers=0", "progress_bar=false", f"hydra.run.dir={work / 'predict'}"],
        cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    columns, theirs = read_csv((work / "predict" / "predictions.csv").read_text())
    ours = read_csv(predicted.stdout)[1]
    assert columns == ["path", "label", "prob", "top2", "prob2"]
    assert [(r["path"], r["label"]) for r in ours] == [(r["path"], r["label"]) for r in theirs]
    assert np.allclose([float(r["prob"]) for r in ours], [float(r["prob"]) for r in theirs], atol=2e-6)


@pytest.mark.slow
def test_a_model_not_exported_by_finetune_is_one_line(work: Path) -> None:
    result = run_torch_free(MODULE, str(work / "run/checkpoints/best.safetensors"), str(work / "inputs"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "cannot be read as an ONNX model" in lines[0]


def test_preprocessing_is_finetunes_evaluation_bit_for_bit(tmp_path: Path) -> None:
    """Every crop mode, interpolation and channel count, images smaller and larger than the crop, JPEGs
    decoded reduced as finetune's loader decodes them (`load_transformed`) and in full (timm's transform)."""
    script = vars(importlib.import_module(MODULE))
    make_odd_images(tmp_path / "odd")
    files = sorted(str(p) for p in (tmp_path / "odd").iterdir() if p.suffix != ".txt")
    settings = itertools.product(["bilinear", "bicubic"], [0.875, 1.0, 1.15], ["center", "squash", "border"],
                                 [(32, 32), (40, 28)], [1, 3, 4])
    reduced = 0
    for interpolation, crop_pct, crop_mode, (height, width), channels in settings:
        config = {"input_size": [channels, height, width], "mean": [0.485, 0.456, 0.406, 0.5][:channels],
                  "std": [0.229, 0.224, 0.225, 0.25][:channels], "interpolation": interpolation,
                  "crop_pct": crop_pct, "crop_mode": crop_mode}
        transform = build_transforms(config, img_size=None, train=False)
        for file in files:
            expected = load_transformed(file, transform, channels).numpy()
            got = script["read"](file, config)
            assert got.dtype == np.float32 and np.array_equal(got, expected), (file, config)
            full = script["preprocess"](script["load_image"](file, channels), config)
            assert np.array_equal(full, transform(load_image(file, channels=channels)).numpy()), (file, config)
            with Image.open(file) as image:
                reduced += transform.plan(image.size)[0] > 1 and file.endswith(".jpg")
    assert reduced >= 36  # the photos under every square-centre and squash setting: the reduction was compared


@pytest.mark.slow
def test_a_hostile_input_folder_is_walked_once_and_its_names_start_no_formula(work: Path, tmp_path: Path) -> None:
    """Loops (``x -> .``) under a glob, a FIFO named like an image, and a file name that starts a
    spreadsheet formula: each real folder walked once, the FIFO left out, the name's cell quoted."""
    from conftest import run_bounded

    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    source = next((work / "inputs").rglob("*.png"))
    for name in ("=HYPERLINK(1).png", "sub/+x.png", "sub/plain.png"):
        (inputs / name).write_bytes(source.read_bytes())
    (inputs / "x").symlink_to(".")
    (inputs / "sub" / "y").symlink_to("..")
    import os

    os.mkfifo(inputs / "fifo.png")
    result = run_bounded(["-m", MODULE, str(work / "model.onnx"), "**/*.png"], cwd=inputs, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    rows = list(csv.reader(result.stdout.splitlines()))
    assert sorted(r[0] for r in rows[1:]) == ["'=HYPERLINK(1).png", "sub/+x.png", "sub/plain.png"]
