"""The faster data pipeline (issue 15): reduced JPEG decoding, 8-bit batches, ``num_workers=auto``.

Reduced decoding is checked on photo-like JPEGs (gradients, texture, shapes, sensor noise: the
bench's own generator), where decoding costs and errors are what they are on photographs.
Tolerances are in normalised units (one grey level is ~0.017 after dividing by ImageNet's std);
measured on these images (docs/benchmarks.md): mean abs difference 0.007-0.025, 99th percentile
0.04-0.22, single pixels up to 0.86, about what choosing bilinear over bicubic changes (0.012).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, compose_config, make_image_folder, tiny_overrides
from finetune.checkpoint.weights_file import ModelMeta
from finetune.config import check_config
from finetune.data import (NormalizingLoader, auto_num_workers, build_loaders, build_transforms, load_image,
                           effective_data_config, load_transformed, scan_image_folder)
from finetune.data.dataset import seeded_rng
from finetune.errors import UserError

RESNET50 = {  # timm's resolve_data_config for resnet50: the bench's preprocessing
    "input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225), "crop_pct": 0.95, "crop_mode": "center",
}
MEAN_TOLERANCE = {224: 0.02, 128: 0.03}  # 1.2 and 1.7 grey levels on average
P99_TOLERANCE = 0.25
MAX_TOLERANCE = 1.0  # single pixels on sharp, noisy edges


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[tuple[str, tuple[int, int]]]:
    """Photo-like JPEGs (quality 90) of several sizes and aspect ratios, portrait included."""
    bench, root = bench_module(), tmp_path_factory.mktemp("photos")
    noise = np.random.default_rng(12345).normal(0, 6, (800, 800, 3)).astype(np.int16)
    found = []
    for seed, size in enumerate([(1600, 1200), (1200, 1600), (1000, 750), (1600, 900)]):
        path = root / f"photo_{seed}.jpg"
        bench.photo_like(*size, seed, noise).save(path, quality=90)
        found.append((str(path), size))
    return found


def assert_close(reduced: torch.Tensor, full: torch.Tensor, img_size: int) -> None:
    diff = (reduced - full).abs()
    assert reduced.shape == full.shape
    assert diff.mean() < MEAN_TOLERANCE[img_size], f"mean abs difference {diff.mean():.4f}"
    assert torch.quantile(diff.flatten(), 0.99) < P99_TOLERANCE and diff.max() < MAX_TOLERANCE


# --- reduced decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [224, 128])
def test_reduced_decode_for_eval_matches_the_full_decode(photos, img_size):
    transform = build_transforms(RESNET50, img_size=img_size, train=False)
    for path, size in photos:
        reduction, _ = transform.plan(size)
        assert reduction > 1  # every photo is over twice the resize target: the test compares something
        assert_close(load_transformed(path, transform), transform(load_image(path)), img_size)


@pytest.mark.parametrize("img_size", [224, 128])
def test_reduced_decode_for_a_random_crop_takes_the_same_crop(photos, img_size):
    """Same seed: the crop box, flip and jitter drawn before decoding are those of the full decode."""
    transform = build_transforms(RESNET50, img_size=img_size, train=True, scale=(0.08, 1.0))
    reductions = set()
    for path, size in photos:
        for seed in range(6):
            with seeded_rng(seed):
                reductions.add(transform.plan(size)[0])
            with seeded_rng(seed):
                full = transform(load_image(path))
            with seeded_rng(seed):
                reduced = load_transformed(path, transform)
            assert_close(reduced, full, img_size)
    assert reductions - {1}  # some crops were decoded reduced


def test_the_reduction_keeps_at_least_the_output_resolution():
    """Eval: the reduced image is still at least as large as the resize target; train: the crop box."""
    transform = build_transforms(RESNET50, img_size=224, train=False)
    assert transform.plan((1600, 1200))[0] == 4  # 400 x 300 >= 313 x 235 (shorter side 224 / 0.95)
    assert transform.plan((1000, 750))[0] == 2 and transform.plan((500, 375))[0] == 1
    crop = build_transforms(RESNET50, img_size=224, train=True)
    for seed in range(50):
        with seeded_rng(seed):
            reduction, _ = crop.plan((1600, 1200))
        with seeded_rng(seed):  # timm's own draw of the same box
            _, _, height, width = crop.first.get_params(torch.empty(0, 1200, 1600), crop.first.scale, crop.first.ratio)
        assert min(width, height) / reduction >= 224 or reduction == 1
        assert reduction == 8 or min(width, height) / (2 * reduction) < 224  # and it is the largest such


def test_no_reduction_is_bit_identical_to_timms_transform(tmp_path, photos):
    small = tmp_path / "small.jpg"
    bench_module().photo_like(500, 375, 7, np.zeros((375, 500, 3), np.int16)).save(small, quality=90)
    large_png = tmp_path / "large.png"
    Image.open(photos[0][0]).save(large_png)  # not a JPEG: decoded in full whatever the plan
    for path in (str(small), str(large_png)):
        for train in (True, False):
            transform = build_transforms(RESNET50, img_size=224, train=train)
            with seeded_rng(3):
                expected = transform(load_image(path))
            with seeded_rng(3):
                assert torch.equal(load_transformed(path, transform), expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_a_reduced_decode(tmp_path, orientation):
    """A phone photo stored sideways with an orientation tag reads as the upright photo."""
    upright = bench_module().photo_like(1200, 1600, 11, np.zeros((1600, 1200, 3), np.int16))
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "phone.jpg", quality=90, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=90)
    transform = build_transforms(RESNET50, img_size=224, train=False)
    with Image.open(tmp_path / "phone.jpg") as image:
        assert image.size == stored.size
    assert transform.plan((1200, 1600))[0] == 4
    reduced = load_transformed(str(tmp_path / "phone.jpg"), transform)
    assert_close(reduced, transform(load_image(str(tmp_path / "upright.jpg"))), 224)
    ignoring_exif = transform(stored.resize((stored.width // 4, stored.height // 4)))
    assert (reduced - ignoring_exif).abs().mean() > 0.2  # the tolerance does tell sideways from upright


def test_meta_preprocess_is_what_the_val_loader_gives_a_large_jpeg(tmp_path, photos):
    """The Python API (`ModelMeta.preprocess`) decodes a file as training's evaluation does, bit for bit;
    reading it in full first (``transform()(read_image(path))``) is only close."""
    for i, (path, _) in enumerate(photos):
        (tmp_path / "images" / "val" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "images" / "val" / f"c{i % 2}" / f"{i}.jpg")
        shutil.copy(path, tmp_path / "images" / "train" / f"c{i % 2}" / f"{i}.jpg")
    split = scan_image_folder(tmp_path / "images")
    config = effective_data_config(RESNET50, 128)
    transform = build_transforms(config, img_size=None, train=False)
    loaders = build_loaders(split, train_transform=transform, eval_transform=transform, batch_size=3)
    meta = ModelMeta(name="resnet50", source="test", num_classes=2, in_chans=3, class_names=["c0", "c1"], head={},
                     data_config=config)
    val = torch.cat([x for x, _ in loaders.val])
    assert torch.equal(val, torch.stack([meta.preprocess(path) for path, _ in split.val]))
    full = torch.stack([meta.transform()(meta.read_image(path)) for path, _ in split.val])
    assert not torch.equal(val, full)
    assert_close(val, full, 128)


# --- 8-bit batches ------------------------------------------------------------------------------


def test_eight_bit_batches_normalised_after_collation_are_bit_identical(tmp_path):
    """The loaders' batches equal timm's ToTensor + Normalize applied to each image, to the last bit."""
    split = scan_image_folder(make_image_folder(tmp_path / "images", size=40))
    config = {**RESNET50, "input_size": (3, 32, 32)}
    train_transform = build_transforms(config, img_size=32, train=True)
    eval_transform = build_transforms(config, img_size=32, train=False)
    loaders = build_loaders(split, train_transform=train_transform, eval_transform=eval_transform, batch_size=4,
                            seed=5)
    assert isinstance(loaders.train, NormalizingLoader) and isinstance(loaders.val, NormalizingLoader)
    assert loaders.train.dataset.transform.transforms[-1].__class__.__name__ == "MaybePILToTensor"
    val = torch.cat([x for x, _ in loaders.val])
    assert val.dtype == torch.float32
    assert torch.equal(val, torch.stack([eval_transform(load_image(path)) for path, _ in split.val]))
    loaders.train_sampler.set_epoch(1)
    train = torch.cat([x for x, _ in loaders.train])
    expected = []
    for index, seed in loaders.train_sampler:
        with seeded_rng(seed):
            expected.append(train_transform(load_image(split.train[index][0])))
    assert torch.equal(train, torch.stack(expected))


# --- num_workers=auto ---------------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "processes", "expected"), [(1, 1, 0), (2, 1, 1), (6, 1, 5), (64, 1, 8),
                                                              (16, 4, 3), (2, 4, 0)])
def test_auto_workers_follow_the_cpus_this_process_may_use(monkeypatch, cpus, processes, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert auto_num_workers() == expected


def test_auto_workers_of_processes_pinned_to_their_own_cpus_are_not_divided(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_num_workers() == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_auto_workers_read_the_real_affinity(tmp_path):
    """A process restricted to one CPU (taskset, a SLURM CPU set) loads in its main process."""
    code = ("import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from finetune.data import auto_num_workers; print(auto_num_workers())")
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"


def test_loaders_resolve_auto_and_log_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    split = scan_image_folder(make_image_folder(tmp_path / "images"))
    transform = build_transforms(RESNET50, img_size=32, train=False)
    with caplog.at_level("INFO", logger="finetune"):
        loaders = build_loaders(split, train_transform=transform, eval_transform=transform, batch_size=2,
                                num_workers="auto")
    assert loaders.train.num_workers == loaders.val.num_workers == 2
    assert "data.num_workers=auto: 2 loader workers (3 CPUs available to this process)" in caplog.text


def test_config_takes_auto_by_default_and_names_a_bad_value(tmp_path):
    root = make_image_folder(tmp_path / "images")
    overrides = [o for o in tiny_overrides(root) if not o.startswith("data.num_workers")]
    cfg = compose_config(overrides)
    assert cfg.data.num_workers == "auto"
    check_config(cfg)
    check_config(compose_config(overrides + ["data.num_workers=3"]))
    for bad in ("many", "-1", "true"):
        with pytest.raises(UserError, match="data.num_workers must be a non-negative integer or auto, got '"):
            check_config(compose_config(overrides + [f"data.num_workers={bad}"]))


# --- the benchmark script -----------------------------------------------------------------------


@pytest.mark.slow
def test_bench_script_runs_and_prints_the_two_ratios(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "bench_data.py"), "--quick", "--cache-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"data_train_vs_baseline: \d+\.\d\d \(target >= 1\.5\)", last[0]), last
    assert re.fullmatch(r"data_val_vs_baseline: \d+\.\d\d \(target >= 1\.5\)", last[1]), last
