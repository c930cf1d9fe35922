"""``data.augment`` presets (issue 26, item 2): what each puts in the train transform, the keys that override
them, their composition with every other config option, and one line for a bad value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune.__main__ import config_groups
from finetune.config import check_config
from finetune.errors import UserError
from finetune.run import run
from test_settings import pixels, train_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("augment") / "images")


def steps(dataset) -> list:
    return list(dataset.transform.transform.transforms)


def only(kind, dataset):
    found = [s for s in steps(dataset) if isinstance(s, kind)]
    assert len(found) <= 1
    return found[0] if found else None


def test_none_leaves_every_training_image_as_it_is(images):
    dataset = train_dataset(images, "data.augment=none")
    original = pixels(Path(dataset.samples[0][0]))  # a square 32 px image: the whole of it, unflipped, uncoloured
    for seed in range(4):
        assert torch.equal(dataset[(0, seed)][0], original)


def test_light_is_the_transform_from_before_the_presets(images):
    light, before = (train_dataset(images, *extra) for extra in (["data.augment=light"],
                                                                   ["data.crop_scale=[0.08,1.0]", "data.hflip=0.5",
                                                                    "data.color_jitter=0.4"]))
    assert repr(steps(light)) == repr(steps(before))
    assert only(RandAugment, light) is None and only(RandomErasing, light) is None
    for seed in range(4):
        assert torch.equal(light[(0, seed)][0], before[(0, seed)][0])


def test_medium_is_trivial_augment_and_heavy_randaugment_each_with_random_erasing(images):
    medium, heavy = (train_dataset(images, f"data.augment={name}") for name in ("medium", "heavy"))
    trivial, rand = only(RandAugment, medium), only(RandAugment, heavy)
    assert trivial.num_layers == 1 and trivial.ops[0].magnitude_std == float("inf")  # one op, uniform magnitude
    assert rand.num_layers == 2 and {op.magnitude for op in rand.ops} == {9}
    assert (only(RandomErasing, medium).probability, only(RandomErasing, heavy).probability) == (0.25, 0.5)
    image = medium[(0, 0)][0]  # erasing works on the normalised tensor: the workers normalise
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)


def test_the_single_keys_override_a_preset(images):
    dataset = train_dataset(images, "data.augment=heavy", "data.auto_augment=none", "data.random_erase=0",
                            "data.crop_scale=[0.5,1.0]", "data.crop_ratio=[1.0,1.0]")
    assert only(RandAugment, dataset) is None and only(RandomErasing, dataset) is None
    crop = steps(dataset)[0]
    assert (tuple(crop.scale), tuple(crop.ratio)) == ((0.5, 1.0), (1.0, 1.0))


def test_the_extreme_presets_compose_with_every_option_of_every_group():
    """``light`` is the default, which test_misconfiguration composes with each option; ``medium`` lies between."""
    for preset in ("none", "heavy"):
        for group, options in config_groups().items():
            for option in options:
                prefix = "+" if group == "experiment" else ""
                needs = ["data=table", "data.file=t.csv"] if (group, option) == ("task", "multilabel") else []
                check_config(compose_config([f"data.augment={preset}", f"{prefix}{group}={option}", *needs]))


@pytest.mark.slow
def test_a_run_with_heavy_augmentation_and_other_settings_trains(images, tmp_path):
    overrides = tiny_overrides(images, epochs=2) + ["data.augment=heavy", "freeze=head_only", "trainer.ema=true",
                                                    "data.balance=sampler", "trainer.accumulate=2"]
    run(compose_config(overrides), run_dir=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "completed" and (tmp_path / "out" / "checkpoints" / "best.safetensors").is_file()


@pytest.mark.parametrize(("override", "message"), [
    ("data.augment=strong", "data.augment must be one of none, light, medium, heavy; got 'strong'"),
    ("data.random_erase=1.5", "data.random_erase must be a probability between 0 and 1"),
    ("data.crop_ratio=[2.0,1.0]", "data.crop_ratio must be [low, high] with 0 < low <= high"),
])
def test_a_bad_augmentation_setting_is_refused_in_one_line(override, message):
    with pytest.raises(UserError) as err:
        check_config(compose_config([override]))
    assert message in str(err.value) and "\n" not in str(err.value)
