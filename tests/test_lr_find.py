"""The LR range test's core: the rates, the choice and its fallbacks, the picture, and undoing the test."""

from __future__ import annotations

import copy
import doctest
import json
import math
import random

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import finetune.lr_find.curve
import finetune.lr_find.plot
import finetune.lr_find.snapshot
from conftest import make_image_folder
from finetune.data import build_loaders, build_transforms, scan_image_folder
from finetune.lr_find import (LRFind, Snapshot, draw_curve, num_updates_for, per_update_beta, range_test,
                              smooth_losses, suggest)
from finetune.lr_find.curve import MIN_POINTS

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center"}


def log_rates(n: int, start: float = 1e-7, end: float = 10.0) -> list[float]:
    return [start * (end / start) ** (i / (n - 1)) for i in range(n)]


def typical_loss(rate: float) -> float:
    """A real curve's shape: flat at 1.1, falls to 0.2 around 1e-3, blows up past 1e-2."""
    x = math.log10(rate)
    return 0.2 + 0.9 / (1 + math.exp(3 * (x + 3.2))) + (3 * (x + 2) ** 2 if x > -2 else 0.0)


def test_module_examples_hold():
    for module in (finetune.lr_find.curve, finetune.lr_find.plot, finetune.lr_find.snapshot):
        assert doctest.testmod(module).failed == 0


# --- suggest --------------------------------------------------------------------------------------


def test_a_u_shaped_curve_gets_a_rate_on_its_descent_before_the_minimum():
    rates = log_rates(100)
    noise = np.random.default_rng(0).normal(0, 0.01, 100)
    losses = [0.5 + 0.04 * (math.log10(r) + 2) ** 2 + e for r, e in zip(rates, noise)]  # minimum at 1e-2
    result = suggest(rates, losses)
    assert result.rule == "valley" and result.reason.startswith("valley:")
    assert 1e-6 <= result.chosen < 1e-2, result.reason
    assert result.chosen == rates[result.chosen_index]
    assert result.smoothed[result.chosen_index] > min(result.smoothed), "chosen on the way down, not at the bottom"


def test_a_typical_noisy_curve_gets_a_rate_where_the_loss_falls():
    rng = np.random.default_rng(1)
    rates, losses = range_test(lambda rate: typical_loss(rate) + rng.normal(0, 0.1), num_updates=100)
    result = suggest(rates, losses)
    assert 1e-5 < result.chosen < 1e-2, result.reason  # the fall spans ~1e-4.5..1e-2


def test_a_tiny_test_of_twenty_updates_still_gets_a_rate():
    rng = np.random.default_rng(2)
    rates, losses = range_test(lambda rate: typical_loss(rate) + rng.normal(0, 0.05), num_updates=20)
    result = suggest(rates, losses)
    assert result.chosen is not None and 1e-5 < result.chosen < 1e-2, result.reason


def test_a_flat_curve_falls_back_saying_flat():
    rng = np.random.default_rng(3)
    result = suggest(log_rates(60), list(1.0 + rng.normal(0, 1e-3, 60)))
    assert result.chosen is None and result.chosen_index is None
    assert result.reason.startswith("flat"), result.reason


@pytest.mark.parametrize("nan_at", [None, 3, 30])
def test_a_curve_that_rises_from_the_start_falls_back_saying_it_diverged(nan_at):
    losses = [1.0 * 1.08**i for i in range(40)]
    if nan_at is not None:
        losses = losses[:nan_at] + [math.nan]
    result = suggest(log_rates(40)[:len(losses)], losses)
    assert result.chosen is None
    assert result.reason.startswith("diverged at once"), result.reason


def test_a_very_noisy_short_curve_falls_back_saying_too_noisy():
    rng = np.random.default_rng(4)
    rates = log_rates(25)
    losses = [1.0 + 0.1 * (math.log10(r) + 3) ** 2 / 16 + rng.normal(0, 1.0) for r in rates]
    result = suggest(rates, losses)
    assert result.chosen is None
    assert result.reason.startswith("too noisy"), result.reason


def test_pure_noise_rarely_gets_a_rate():
    rng = np.random.default_rng(5)
    chosen = sum(suggest(log_rates(30), list(1.0 + rng.normal(0, 0.3, 30))).chosen is not None for _ in range(200))
    assert chosen <= 10  # documented: under 4%


def test_too_few_points_fall_back_saying_so():
    rates = log_rates(MIN_POINTS - 1)
    result = suggest(rates, [2.0 - 0.1 * i for i in range(len(rates))])
    assert result.chosen is None
    assert result.reason.startswith("too few points"), result.reason


def test_the_curve_ends_at_the_first_non_finite_loss():
    rates = log_rates(50)
    losses = [typical_loss(r) for r in rates[:40]] + [math.inf] + [0.0] * 9
    result = suggest(rates, losses)
    assert all(math.isfinite(s) for s in result.smoothed[:40])
    assert all(math.isnan(s) for s in result.smoothed[40:])
    assert result.chosen_index is not None and result.chosen_index < 40


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'steepest'"):
        suggest(log_rates(20), [1.0] * 20, rule="steepest")
    with pytest.raises(ValueError, match="20 rates but 19 losses"):
        suggest(log_rates(20), [1.0] * 19)


def test_smoothing_forgets_at_the_same_rate_per_decade_whatever_the_number_of_updates():
    rates, losses = log_rates(20), [typical_loss(r) for r in log_rates(20)]
    assert per_update_beta(log_rates(100)) == 0.98 and per_update_beta(rates) == pytest.approx(0.98 ** (99 / 19))
    assert suggest(rates, losses).smoothed == smooth_losses(losses, per_update_beta(rates))
    assert per_update_beta(log_rates(50, 1e-6, 1e-2)) == pytest.approx(0.98 ** ((4 / 49) / (8 / 99)))


def test_smoothing_is_the_bias_corrected_average():
    assert smooth_losses([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards zero
    assert smooth_losses([1.0, 2.0], beta=0.5) == pytest.approx([1.0, (0.25 + 1.0) / 0.75])


# --- range_test -----------------------------------------------------------------------------------


def test_rates_grow_by_a_constant_ratio_from_start_to_end():
    calls = []
    rates, losses = range_test(lambda rate: calls.append(rate) or 1.0, num_updates=30, start_lr=1e-6, end_lr=1.0)
    assert rates == calls and len(rates) == 30 and losses == [1.0] * 30
    assert rates[0] == 1e-6 and rates[-1] == pytest.approx(1.0)
    ratios = np.array(rates[1:]) / np.array(rates[:-1])
    assert np.allclose(ratios, ratios[0], rtol=1e-9) and ratios[0] == pytest.approx(1e6 ** (1 / 29))


def test_a_non_finite_loss_stops_the_test_and_is_recorded():
    rng = np.random.default_rng(6)
    calls = []

    def step(rate: float) -> float:
        calls.append(rate)
        return math.nan if rate > 1e-1 else typical_loss(rate) + rng.normal(0, 0.01)

    rates, losses = range_test(step, num_updates=100)
    assert len(rates) == len(losses) == len(calls) < 100
    assert math.isnan(losses[-1]) and rates[-1] > 1e-1 >= rates[-2]


@pytest.mark.parametrize("num_updates", [20, 100])
def test_a_diverging_smoothed_loss_stops_the_test(num_updates):
    rates, losses = range_test(lambda rate: 1.0 if rate < 1e-3 else 50.0, num_updates=num_updates, diverge=12.0)
    assert len(rates) < num_updates and all(math.isfinite(v) for v in losses)
    smoothed = smooth_losses(losses, per_update_beta(rates))  # the smoothing `suggest` shows
    assert smoothed[-1] > 12.0 * min(smoothed) and smoothed[-2] <= 12.0 * min(smoothed)


@pytest.mark.parametrize("kwargs", [{"num_updates": 1}, {"num_updates": 10, "start_lr": 1.0, "end_lr": 0.1},
                                    {"num_updates": 10, "diverge": 1.0}])
def test_range_test_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        range_test(lambda rate: 1.0, **kwargs)


# --- num_updates_for ------------------------------------------------------------------------------


@pytest.mark.parametrize(("batches", "accumulate", "expected"),
                         [(1000, 1, 100), (100, 1, 100), (60, 1, 60), (61, 2, 31), (60, 4, 20), (3, 1, 20), (1, 8, 20)])
def test_num_updates_is_about_a_hundred_at_most_an_epoch_at_least_twenty(batches, accumulate, expected):
    assert num_updates_for(batches, accumulate=accumulate) == expected


def test_num_updates_follows_its_bounds_and_rejects_bad_ones():
    assert num_updates_for(500, default=50, minimum=10) == 50
    assert num_updates_for(5, default=50, minimum=10) == 10
    with pytest.raises(ValueError):
        num_updates_for(0)
    with pytest.raises(ValueError):
        num_updates_for(10, default=10, minimum=20)


# --- draw_curve and to_dict -----------------------------------------------------------------------


def typical_result() -> LRFind:
    rng = np.random.default_rng(7)
    rates, losses = range_test(lambda rate: typical_loss(rate) + rng.normal(0, 0.05), num_updates=60)
    return suggest(rates, losses)


@pytest.mark.parametrize("size", [(480, 320), (300, 200)])
def test_the_curve_is_an_rgb_image_of_the_requested_size_with_the_choice_marked(size):
    result = typical_result()
    image = draw_curve(result, size)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
    assert (image < 128).all(axis=2).sum() > 500  # text, axes and the smoothed curve
    red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red.sum() > 20  # the chosen point


def test_a_fallback_or_an_empty_curve_still_draws():
    fallback = suggest(log_rates(5), [1.0, 2.0, 4.0, 8.0, math.nan])
    assert (draw_curve(fallback) < 128).any()
    empty = LRFind([], [], [], "valley", None, "no updates")
    assert draw_curve(empty).shape == (320, 480, 3)


def test_to_dict_is_strict_json_with_every_part():
    result = suggest(log_rates(40), [typical_loss(r) for r in log_rates(40)[:35]] + [math.nan] * 5)
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(record) == {"rates", "losses", "smoothed", "rule", "chosen", "chosen_index", "reason"}
    assert record["losses"][-1] is None and record["smoothed"][-1] is None
    assert record["chosen"] == record["rates"][record["chosen_index"]]
    fallback = json.loads(json.dumps(suggest(log_rates(3), [1.0] * 3).to_dict(), allow_nan=False))
    assert fallback["chosen"] is None and fallback["chosen_index"] is None and "too few" in fallback["reason"]


# --- Snapshot -------------------------------------------------------------------------------------


def make_loaders(root, seed: int = 3):
    split = scan_image_folder(root)
    return build_loaders(split, train_transform=build_transforms(DATA_CONFIG, img_size=32, train=True),
                         eval_transform=build_transforms(DATA_CONFIG, img_size=32, train=False),
                         batch_size=4, seed=seed)


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def sgd_steps(model: nn.Module, loader, steps: int) -> list[torch.Tensor]:
    """A little real training: what must come out the same after a restored range test."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    seen = []
    for (inputs, target), _ in zip(loader, range(steps)):
        seen.append(target)
        nn.functional.cross_entropy(model(inputs), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seen


def a_range_test(model: nn.Module, loader, num_updates: int = 6) -> None:
    """What the run's step does, plus everything else that could leak: RNG draws, flags, a frozen part."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    batches = iter(())
    model.train()
    model.get_parameter("fc.weight").requires_grad_(False)
    loader.sampler.set_epoch(7)

    def step(rate: float) -> float:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # cycle the loader, as the run does
            batches = iter(loader)
            batch = next(batches)
        draws()
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()  # no zero_grad: leave gradients behind
        return loss.item()

    range_test(step, num_updates=num_updates, start_lr=1e-3, end_lr=1.0)


def test_after_restore_training_is_bit_identical_to_never_having_searched(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=3, train=5, val=1, size=32)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    twin, twin_loaders = copy.deepcopy(model), make_loaders(root)
    loaders = make_loaders(root)
    for sampler in (loaders.train_sampler, twin_loaders.train_sampler):
        sampler.set_epoch(2)
        sampler.set_start(4)
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected_draws = draws()

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    snapshot = Snapshot.take(model, loaders.train)
    a_range_test(model, loaders.train)
    assert not torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"])  # it did change
    assert int(model.state_dict()["bn1.num_batches_tracked"]) == 6
    snapshot.restore()

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(model.parameters()) == params and all(p is q for p, q in zip(model.parameters(), params))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert [str(v) for v in draws()] == [str(v) for v in expected_draws]
    assert (loaders.train_sampler.epoch, loaders.train_sampler.start) == (2, 4)
    assert torch.equal(loaders.train.generator.get_state(), twin_loaders.train.generator.get_state())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    seen = sgd_steps(model, loaders.train, steps=2)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    twin_seen = sgd_steps(twin, twin_loaders.train, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(seen, twin_seen)) and len(seen) == 2
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_restore_puts_back_gradients_and_flags_as_they_were():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[1].eval()
    snapshot = Snapshot.take(model)
    model.train()
    model[0].weight.grad.mul_(5)
    model[2].weight.requires_grad_(True)
    model(torch.randn(8, 3)).sum().backward()
    snapshot.restore()
    snapshot.restore()  # twice: the snapshot's own copies are not handed out
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[0].bias.grad is None
    assert not model[2].weight.requires_grad and model[2].bias.requires_grad
    assert model.training and model[0].training and not model[1].training


def test_extras_such_as_an_ema_model_are_put_back():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    snapshot = Snapshot.take(model, extras=[ema])
    with torch.no_grad():
        ema.weight.mul_(0.5)
    snapshot.restore()
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())


class RandomItems(Dataset):
    """Items drawn from the worker's own torch RNG: they depend on how the worker was seeded and used."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(())


def test_persistent_workers_started_by_the_test_are_replaced_by_fresh_ones():
    def loader() -> DataLoader:
        return DataLoader(RandomItems(), batch_size=2, num_workers=1, persistent_workers=True,
                          generator=torch.Generator().manual_seed(5))

    expected = torch.cat(list(loader()))
    searched = loader()
    snapshot = Snapshot.take(nn.Linear(1, 1), searched)
    next(iter(searched))  # the range test starts the workers and leaves them mid-pass
    snapshot.restore()
    assert torch.equal(torch.cat(list(searched)), expected)


def test_a_model_whose_parts_changed_cannot_be_restored():
    model = nn.Sequential(nn.Linear(2, 2))
    snapshot = Snapshot.take(model)
    model.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="changed during the range test"):
        snapshot.restore()
