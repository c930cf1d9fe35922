"""Reading images as RGB, transforms, the (seed, epoch)-pure sampler and the loaders."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from finetune.data import (
    DataSplit,
    EpochSampler,
    ImageDataset,
    build_loaders,
    build_transforms,
    effective_data_config,
    load_image,
    load_rgb,
)
from finetune.data.dataset import seeded_rng
from finetune.errors import UserError, message_of

DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def make_split(root: Path, counts: list[int], size: int = 24) -> DataSplit:
    """Noisy RGB images, ``counts[c]`` of class ``c``, all in train; two per class in val."""
    rng = np.random.default_rng(0)
    samples = {"train": [], "val": []}
    for label, count in enumerate(counts):
        for split, n in (("train", count), ("val", 2)):
            for i in range(n):
                path = root / split / f"c{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                samples[split].append((str(path), label))
    names = [f"c{label}" for label in range(len(counts))]
    return DataSplit(samples["train"], samples["val"], names, str(root), "train_val")


# --- reading images as RGB ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
     ("RGB", "WEBP"), ("P", "GIF"), ("RGB", "BMP"), ("RGBA", "TIFF")],
)
def test_every_mode_becomes_a_three_channel_tensor(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new(mode, (10, 6)).save(path, format=fmt)
    image, label = ImageDataset([(str(path), 4)], build_transforms(DATA_CONFIG, img_size=16, train=False))[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 4


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_grey_and_rgba_models_get_one_and_four_channel_tensors(tmp_path, mode, channels):
    path = tmp_path / "image.png"
    Image.new(mode, (10, 6)).save(path)
    grey_stats = {"mean": DATA_CONFIG["mean"][:1] * channels, "std": DATA_CONFIG["std"][:1] * channels}
    config = effective_data_config({**DATA_CONFIG, "input_size": (channels, 16, 16), **grey_stats}, img_size=None)
    for train in (True, False):
        image, _ = ImageDataset([(str(path), 0)], build_transforms(config, img_size=16, train=train), channels)[0]
        assert image.shape == (channels, 16, 16)


def test_grey_is_the_luminance_and_rgba_keeps_alpha(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert np.asarray(load_image(str(tmp_path / "a.png"), 1)).tolist() == [[76, 255]]  # red's luminance; clear: white
    assert np.asarray(load_image(str(tmp_path / "a.png"), 4)).tolist() == [[[255, 0, 0, 255], [0, 0, 0, 0]]]
    Image.new("L", (1, 1), 9).save(tmp_path / "g.png")
    assert np.asarray(load_image(str(tmp_path / "g.png"), 4)).tolist() == [[[9, 9, 9, 255]]]  # opaque: no alpha


def test_other_channel_counts_are_refused_naming_in_chans():
    with pytest.raises(UserError, match=r"model.in_chans=2: image files give 1 \(grey\), 3 \(RGB\) or 4"):
        ImageDataset([], None, channels=2)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert pil_to_tensor(load_rgb(str(tmp_path / "a.png")))[:, 0].tolist() == [[255, 255], [0, 255], [0, 255]]


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    assert load_rgb(str(tmp_path / "p.png")).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(str(tmp_path / "p.png")).getpixel((1, 0)) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    image = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))
    image.save(tmp_path / "deep.png")
    assert np.asarray(load_rgb(str(tmp_path / "deep.png")))[0, :, 0].tolist() == [0, 4, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "phone.jpg")).size == (2, 4)


def test_file_gone_bad_after_scanning_names_the_file(tmp_path):
    (tmp_path / "gone.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="gone.png"):
        ImageDataset([(str(tmp_path / "gone.png"), 0)], None)[0]


def test_an_error_in_a_loader_worker_is_told_in_one_line(tmp_path):
    (tmp_path / "gone.png").write_bytes(b"junk")
    loader = DataLoader(ImageDataset([(str(tmp_path / "gone.png"), 0)], None), num_workers=1,
                        collate_fn=lambda batch: batch)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # how torch re-raises it in the main process
    line = message_of(err.value)
    assert line.startswith(f"cannot read image '{tmp_path / 'gone.png'}'") and "\n" not in line


def test_seeded_sample_leaves_global_rng_untouched():
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with seeded_rng(123):
        torch.rand(10), random.random(), np.random.rand()
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


# --- transforms -----------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_transform_output_honours_img_size(train):
    image = Image.new("RGB", (300, 200))
    assert build_transforms(DATA_CONFIG, img_size=64, train=train)(image).shape == (3, 64, 64)
    assert build_transforms(DATA_CONFIG, img_size=None, train=train)(image).shape == (3, 224, 224)


def test_effective_config_from_a_real_timm_model():
    data_config = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet", pretrained=False))
    config = effective_data_config(data_config, 96)
    assert config == {
        "input_size": [3, 96, 96],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "interpolation": data_config["interpolation"],
        "crop_pct": data_config["crop_pct"],
        "crop_mode": data_config["crop_mode"],
    }
    assert effective_data_config(config, None) == config  # stored config round-trips
    assert effective_data_config(data_config, None)["input_size"] == list(data_config["input_size"])


def test_eval_transform_crops_by_crop_pct():
    transform = build_transforms({**DATA_CONFIG, "crop_pct": 0.5}, img_size=32, train=False)
    resize = transform.transforms[0]
    assert resize.size in (64, [64], (64, 64))


@pytest.mark.parametrize("img_size", [0, -3, 1.5, True])
def test_bad_img_size_is_named(img_size):
    with pytest.raises(UserError, match=f"data.img_size .*'{img_size}'"):
        build_transforms(DATA_CONFIG, img_size=img_size, train=True)


# --- sampling -------------------------------------------------------------------------


def take(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_depends_only_on_seed_and_epoch():
    used = EpochSampler(50, seed=3)
    take(used, 0), take(used, 1)
    torch.manual_seed(999)  # the global RNG plays no part
    assert take(used, 2) == take(EpochSampler(50, seed=3), 2)
    assert sorted(i for i, _ in take(used, 2)) == list(range(50))
    assert take(used, 2) != take(used, 3)
    assert take(used, 2) != take(EpochSampler(50, seed=4), 2)


def test_sampling_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    take(EpochSampler(20, seed=1), 0), take(EpochSampler(20, seed=1, weights=[1.0] * 20), 0)
    assert torch.equal(torch.rand(2), expected)


def test_set_start_skips_exactly_and_only_once():
    sampler = EpochSampler(10, seed=0)
    full = take(sampler, 4)
    sampler.set_start(7)
    assert len(sampler) == 3
    assert list(sampler) == full[7:]
    assert len(sampler) == 10 and list(sampler) == full


def test_new_epoch_clears_a_pending_start():
    sampler = EpochSampler(10, seed=0)
    sampler.set_epoch(1)
    sampler.set_start(4)
    assert take(sampler, 2) == EpochSampler(10, seed=0).epoch_order(2)


def test_unshuffled_order_is_sequential():
    assert [i for i, _ in take(EpochSampler(5, seed=0, shuffle=False), 3)] == [0, 1, 2, 3, 4]


# --- loaders ------------------------------------------------------------------------


def build(split: DataSplit, **kwargs):
    transforms = {
        "train_transform": build_transforms(DATA_CONFIG, img_size=16, train=True),
        "eval_transform": build_transforms(DATA_CONFIG, img_size=16, train=False),
    }
    return build_loaders(split, **transforms, **{"batch_size": 4, "seed": 11, **kwargs})


def epoch_batches(loaders, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loaders.train_sampler.set_epoch(epoch)
    loaders.train_sampler.set_start(start)
    return list(loaders.train)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sampler_balance_draws_classes_evenly(tmp_path):
    loaders = build(make_split(tmp_path, [40, 8, 4]), balance="sampler")
    labels = Counter()
    for epoch in range(10):
        loaders.train_sampler.set_epoch(epoch)
        labels.update(loaders.train.dataset.samples[i][1] for i, _ in loaders.train_sampler)
    assert loaders.class_weights is None
    assert all(abs(labels[c] / 520 - 1 / 3) < 0.06 for c in range(3)), labels


def test_loss_weights_are_inverse_frequency(tmp_path):
    loaders = build(make_split(tmp_path, [6, 2, 4]), balance="loss_weights")
    assert torch.allclose(loaders.class_weights, torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    assert [i for i, _ in loaders.train_sampler] != list(range(12))  # plain shuffle


def test_no_balance_by_default(tmp_path):
    loaders = build(make_split(tmp_path, [3, 1]))
    assert loaders.class_weights is None and loaders.train_sampler.weights is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"balance": "oversample"}, "data.balance must be one of none | sampler | loss_weights, got 'oversample'"),
    ({"batch_size": 0}, "data.batch_size must be a positive integer, got '0'"),
    ({"batch_size": -2}, "data.batch_size must be a positive integer, got '-2'"),
    ({"num_workers": -1}, "data.num_workers must be a non-negative integer, got '-1'"),
])
def test_bad_loader_settings_are_named(tmp_path, kwargs, message):
    with pytest.raises(UserError) as info:
        build(make_split(tmp_path, [2, 2]), **kwargs)
    assert str(info.value) == message


def test_val_loader_is_fixed_order_and_unaugmented(tmp_path):
    loaders = build(make_split(tmp_path, [2, 2]))
    first, second = list(loaders.val), list(loaders.val)
    assert_same_batches(first, second)
    assert torch.cat([y for _, y in first]).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_does_not_touch_global_rng(tmp_path, num_workers):
    loaders = build(make_split(tmp_path, [3, 3]), num_workers=num_workers)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    list(loaders.train), list(loaders.val)
    assert torch.equal(torch.rand(2), expected)


def test_augmentation_is_a_function_of_seed_epoch_and_position(tmp_path):
    split = make_split(tmp_path, [5, 5])
    torch.manual_seed(1)
    first = epoch_batches(build(split), epoch=2)
    torch.manual_seed(2)  # whatever the trainer did to the global RNG in between
    assert_same_batches(first, epoch_batches(build(split), epoch=2))
    other = epoch_batches(build(split), epoch=3)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_resumed_epoch_yields_the_tail_of_the_full_epoch(tmp_path):
    split = make_split(tmp_path, [5, 5])
    full = epoch_batches(build(split), epoch=1)
    assert_same_batches(epoch_batches(build(split), epoch=1, start=2 * 4), full[2:])


def test_workers_do_not_change_the_batches(tmp_path):
    split = make_split(tmp_path, [5, 5])
    in_process = epoch_batches(build(split, balance="sampler"), epoch=1, start=4)
    with_workers = build(split, balance="sampler", num_workers=2)
    assert_same_batches(epoch_batches(with_workers, epoch=1, start=4), in_process)
    assert_same_batches(epoch_batches(with_workers, epoch=1, start=4), in_process)  # persistent workers, again
