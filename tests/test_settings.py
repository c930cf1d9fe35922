"""Settings no other test exercised (issue 21): each one's effect, asserted.

``checkpoint.every_n_epochs``, ``save_best``, ``save_last`` (which files exist, which do not, with which
epochs in manifest.json), ``sched=step`` (the rate of every update against timm's formula),
``python -m finetune.evaluate split=train|all`` (how many images, from where) and the augmentation keys
``data.crop_scale``, ``data.hflip``, ``data.color_jitter``, ``data.auto_augment`` (the train transform
built from the composed config, applied with fixed seeds). Runs are in-process and tiny.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.data.auto_augment import RandAugment

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune import builders
from finetune.checkpoint import load_model, load_training_state
from finetune.evaluate import run as evaluate_run
from finetune.run import run
from test_evaluate import QUIET, compose_evaluate


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes, 6 training and 3 validation images each: 5 updates per epoch at batch 4."""
    return make_image_folder(tmp_path_factory.mktemp("settings") / "images")


def manifest_of(run_dir: Path) -> tuple[dict, dict[str, tuple[str, int, int]]]:
    """manifest.json, and its files as ``{name: (kind, epoch, step)}``; every file it names is on disk, and
    nothing else is (but the run-dir lock)."""
    folder = run_dir / "checkpoints"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {p.name for p in folder.iterdir()} - {"manifest.json", ".lock"} == set(manifest["files"])
    return manifest, {name: (e["kind"], e["epoch"], e["step"]) for name, e in manifest["files"].items()}


def best_epoch(run_dir: Path) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(records, key=lambda r: (r["val/acc1"], -r["epoch"]))["epoch"]


# ------------------------------------------------------------------ checkpoint.*
def test_every_n_epochs_saves_last_every_nth_epoch_and_after_the_final_one(images, tmp_path):
    """every_n_epochs=2 over 3 epochs: last.* at epoch 2 (kept as epoch002-step000010.ckpt once replaced)
    and at the end (epoch 3), never at epoch 1."""
    out = tmp_path / "run"
    every_2 = ["checkpoint.every_n_epochs=2", "checkpoint.keep_last_k=null"]
    run(compose_config(tiny_overrides(images, epochs=3) + every_2), run_dir=out)
    _, files = manifest_of(out)
    epoch = best_epoch(out)
    assert files == {"last.safetensors": ("last", 3, 15), "last.ckpt": ("state", 3, 15),
                     "epoch002-step000010.ckpt": ("periodic", 2, 10), "best.safetensors": ("best", epoch, 5 * epoch)}
    assert load_training_state(out / "checkpoints" / "epoch002-step000010.ckpt")["train_state"]["epoch"] == 2
    assert load_model(out / "checkpoints" / "last.safetensors")[1].num_classes == 3


def test_save_best_false_writes_no_best_weights(images, tmp_path):
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(images, epochs=2) + ["checkpoint.save_best=false"]), run_dir=out)
    manifest, files = manifest_of(out)
    assert manifest["best"] is None and not (out / "checkpoints" / "best.safetensors").exists()
    assert files == {"last.safetensors": ("last", 2, 10), "last.ckpt": ("state", 2, 10),
                     "epoch001-step000005.ckpt": ("periodic", 1, 5)}
    assert load_model(out / "checkpoints" / "last.safetensors")[1].num_classes == 3


def test_save_last_false_writes_no_last_weights_and_no_training_state(images, tmp_path):
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(images, epochs=2) + ["checkpoint.save_last=false"]), run_dir=out)
    manifest, files = manifest_of(out)
    epoch = best_epoch(out)
    assert files == {"best.safetensors": ("best", epoch, 5 * epoch)} and manifest["best"] == "best.safetensors"
    assert not list((out / "checkpoints").glob("*.ckpt")) and not (out / "checkpoints" / "last.safetensors").exists()
    assert load_model(out / "checkpoints" / "best.safetensors")[1].num_classes == 3


# ------------------------------------------------------------------ sched=step
def test_sched_step_sets_each_updates_rate_by_the_formula(images, tmp_path, monkeypatch):
    """One epoch (5 updates) of linear warmup from warmup_lr, then optim.lr, halved every epoch: the rate
    each update used (read at optimizer.step) and the rate TensorBoard logs after it."""
    lr, warmup_lr, per_epoch, rate = 0.01, 1e-4, 5, 0.5
    used: list[list[float]] = []
    original = builders.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.optimizer.register_step_pre_hook(lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
        return trainer

    monkeypatch.setattr(builders, "build_trainer", build_trainer)
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(images, epochs=3) + [
        "sched=step", "sched.warmup_epochs=1", f"sched.warmup_lr={warmup_lr}", "sched.decay_epochs=1",
        f"sched.decay_rate={rate}", f"optim.lr={lr}"]), run_dir=out)

    def expected(t: int) -> float:  # the rate after t updates: timm's StepLRScheduler, stepped per update
        if t < per_epoch:
            return warmup_lr + t * (lr - warmup_lr) / per_epoch
        return lr * rate ** ((t - per_epoch) // per_epoch)

    assert len(used) == 15 and all(len(set(groups)) == 1 for groups in used)  # every group at the same rate
    assert [groups[0] for groups in used] == pytest.approx([expected(g - 1) for g in range(1, 16)], rel=1e-9)
    assert [groups[0] for groups in used][4:11] == pytest.approx([0.00802, 0.01, 0.01, 0.01, 0.01, 0.01, 0.005])
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("lr/head")
    assert [e.step for e in logged] == list(range(1, 16))
    # lr/<group> at step g is the rate update g used (as timm's train script and Lightning's monitor log it)
    assert [e.value for e in logged] == pytest.approx([groups[0] for groups in used], rel=1e-6)


# ------------------------------------------------------------------ evaluate split=
def test_evaluate_split_train_and_all_of_a_split_folder(tmp_path):
    """A class-folder root that training split 70/30: split=train evaluates the run's split.json training
    files, split=all every image; each report says how many and from where."""
    root = make_image_folder(tmp_path / "flat", split=False, train=8, val=2)  # 10 images per class
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(root, epochs=1) + ["data.val_split=0.3"]), run_dir=out)
    record = json.loads((out / "split.json").read_text())
    reports = {split: evaluate_run(compose_evaluate([f"ckpt={out}", f"data.root={root}", f"split={split}", *QUIET]),
                                   out_dir=tmp_path / f"eval_{split}") for split in ("train", "all", "val")}
    train, every, val = reports["train"], reports["all"], reports["val"]
    assert (train["split"], train["split_source"], train["num_images"]) == ("train", "split.json", 21)
    assert {n: m["support"] for n, m in train["per_class"].items()} == record["counts"]["train"] == \
        {"class_0": 7, "class_1": 7, "class_2": 7}
    assert (every["split"], every["split_source"], every["num_images"]) == ("all", "all", 30)
    assert {n: m["support"] for n, m in every["per_class"].items()} == {f"class_{c}": 10 for c in range(3)}
    assert (val["split_source"], val["num_images"]) == ("split.json", 9)
    assert json.loads((tmp_path / "eval_train" / "metrics.json").read_text())["num_images"] == 21


def test_evaluate_split_train_of_train_val_folders(images, tmp_path):
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(images, epochs=1)), run_dir=out)
    train = evaluate_run(compose_evaluate([f"ckpt={out}", f"data.root={images}", "split=train", *QUIET]),
                         out_dir=tmp_path / "eval")
    assert (train["split_source"], train["num_images"], train["data_root"]) == ("folder", 18, str(images))
    every = evaluate_run(compose_evaluate([f"ckpt={out}", f"data.root={images}", "split=all", *QUIET]),
                         out_dir=tmp_path / "eval_all")
    assert (every["split_source"], every["num_images"]) == ("all", 27)


# ------------------------------------------------------------------ data augmentation
def train_dataset(root: Path, *overrides: str):
    """The training images of the composed config, transformed as the run's train loader transforms them
    (crop, flip, colour or auto-augment, to a uint8 tensor; normalising happens on the device)."""
    cfg = compose_config(tiny_overrides(root) + list(overrides))
    _, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=3)
    data_config = builders.build_data_config(cfg.data, spec)
    split = builders.build_split(cfg.data, run_dir=root, write=False)
    return builders.build_loaders(cfg.data, split, data_config, seed=0, device=torch.device("cpu")).train.dataset


def pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def transformed(dataset, path: Path, seed: int) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    return dataset.transform(Image.open(path).convert("RGB"))


def test_hflip_zero_never_flips_and_one_always_does(images):
    """With crop_scale=[1,1] a square image's crop is the whole image at its own size: hflip=0 gives it
    unchanged, hflip=1.0 mirrored, for every seed; with the default scale the crops match but mirrored."""
    plain = train_dataset(images, "data.hflip=0", "data.crop_scale=[1,1]", "data.color_jitter=0")
    flipped = train_dataset(images, "data.hflip=1.0", "data.crop_scale=[1,1]", "data.color_jitter=0")
    original = pixels(Path(plain.samples[0][0]))
    assert not torch.equal(original, original.flip(-1))  # the image is not symmetric: the test can fail
    for seed in range(4):
        assert torch.equal(plain[(0, seed)][0], original) and torch.equal(flipped[(0, seed)][0], original.flip(-1))
    cropped = [train_dataset(images, f"data.hflip={p}", "data.color_jitter=0") for p in (0, 1.0)]
    for seed in range(4):
        assert torch.equal(cropped[0][(0, seed)][0].flip(-1), cropped[1][(0, seed)][0])


def test_crop_scale_is_the_area_of_the_random_crop(images, tmp_path):
    """A 64 px image whose red and green values are its x and y coordinates: the span of each in the crop
    is the crop's width and height, so their product is the fraction of the area it took."""
    side = 64
    ramp = np.linspace(0, 255, side).round().astype(np.uint8)
    grid = np.zeros((side, side, 3), np.uint8)
    grid[..., 0], grid[..., 1] = ramp[None, :], ramp[:, None]
    Image.fromarray(grid).save(tmp_path / "grid.png")
    for scale, low, high in (("[0.25,0.25]", 0.2, 0.3), ("[1,1]", 0.9, 1.0)):
        dataset = train_dataset(images, f"data.crop_scale={scale}", "data.hflip=0", "data.color_jitter=0")
        for seed in range(6):
            crop = transformed(dataset, tmp_path / "grid.png", seed).float() / 255
            area = (crop[0].max() - crop[0].min()) * (crop[1].max() - crop[1].min())
            assert low <= area <= high, (scale, seed, float(area))


def test_color_jitter_zero_changes_no_colour_and_its_strength_does(images, tmp_path):
    Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / "orange.png")
    plain = train_dataset(images, "data.color_jitter=0")
    jittered = train_dataset(images, "data.color_jitter=0.4")
    colours = {name: [transformed(d, tmp_path / "orange.png", seed).flatten(1).unique(dim=1).T.tolist()
                      for seed in range(6)] for name, d in (("plain", plain), ("jittered", jittered))}
    assert colours["plain"] == [[[200, 100, 50]]] * 6  # every pixel of every crop, exactly the colour
    assert all(c != [[200, 100, 50]] for c in colours["jittered"]), colours["jittered"]


def test_auto_augment_puts_timms_randaugment_in_the_train_transform_and_a_run_trains_with_it(images, tmp_path):
    augmented = train_dataset(images, "data.auto_augment=rand-m9-mstd0.5", "data.hflip=0")
    steps = augmented.transform.transform.transforms
    rand = [s for s in steps if isinstance(s, RandAugment)]
    assert len(rand) == 1 and len(rand[0].ops) == 15 and {op.magnitude for op in rand[0].ops} == {9}
    plain = train_dataset(images, "data.color_jitter=0", "data.hflip=0")  # auto-augment replaces colour jitter
    assert not any(isinstance(s, RandAugment) for s in plain.transform.transform.transforms)
    outputs = [(augmented[(0, seed)][0], plain[(0, seed)][0]) for seed in range(6)]
    assert all(a.shape == (3, 32, 32) and a.dtype == torch.uint8 for a, _ in outputs)
    assert any(not torch.equal(a, p) for a, p in outputs)  # the same crops, changed by RandAugment
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(images, epochs=1) + ["data.auto_augment=rand-m9-mstd0.5",
                                                           "data.crop_scale=[0.5,1.0]"]), run_dir=out)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
