"""Mixup and CutMix (issue 26, item 2): timm's Mixup on training batches, draws that are a pure function of
where the batch is (so a mid-epoch resume stays bit-identical), switched off after ``data.mix_off_epoch``."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune.config import check_config
from finetune.errors import UserError
from finetune.mixing import BatchMixer
from finetune.run import run
from finetune.signals import TrainingInterrupted
from test_checkpoint import assert_same_result
from test_resume import with_signals

MIX = ["data.mixup=0.8", "data.cutmix=1.0", "checkpoint.every_n_steps=2"]


def batch(n=4):
    torch.manual_seed(0)
    return torch.rand(n, 3, 16, 16), torch.arange(n) % 3


def test_the_draws_depend_on_the_batch_alone_and_leave_numpys_global_rng_alone():
    mixer = BatchMixer(mixup=0.8, cutmix=1.0, prob=1.0, label_smoothing=0.1, num_classes=3, seed=5)
    inputs, target = batch()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = [mixer(inputs.clone(), target, epoch=1, batch=b) for b in range(6)]
    assert np.array_equal(np.random.get_state()[1], before)
    again = [mixer(inputs.clone(), target, epoch=1, batch=b) for b in reversed(range(6))][::-1]
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert all(not torch.equal(x, inputs) for x, _ in first)  # every batch mixed (prob 1)
    assert len({round(float(y[1].max()), 6) for _, y in first}) > 1  # different draws per batch (1 pairs with 2)
    for _, y in first:
        torch.testing.assert_close(y.sum(1), torch.ones(4))
        assert float(y.min()) >= 0.1 / 3 - 1e-6  # label smoothing folded in


def test_off_epoch_and_an_odd_batch_give_smoothed_one_hot_targets_unmixed():
    mixer = BatchMixer(mixup=0.8, cutmix=0.0, prob=1.0, label_smoothing=0.0, num_classes=3, seed=0, off_epoch=2)
    inputs, target = batch()
    x, y = mixer(inputs.clone(), target, epoch=2, batch=0)
    assert torch.equal(x, inputs) and torch.equal(y, torch.nn.functional.one_hot(target, 3).float())
    x, _ = mixer(inputs[:3].clone(), target[:3], epoch=0, batch=0)
    assert torch.equal(x, inputs[:3])
    x, _ = mixer(inputs.clone(), target, epoch=1, batch=0)
    assert not torch.equal(x, inputs)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.mixup=-1"], "data.mixup must be 0 (off) or a positive Beta alpha, got '-1.0'"),
    (["data.mix_prob=2"], "data.mix_prob must be a probability between 0 and 1, got '2.0'"),
    (["data.cutmix=1", "data.balance=loss_weights"], "cannot weigh: use data.balance=sampler"),
    (["data.mixup=0.8", "task=multilabel", "data=table", "data.file=t.csv"],
     "data.mixup/data.cutmix (0.8/0.0) mix one-hot class targets and are not built for task=multilabel yet"),
])
def test_bad_mixing_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        check_config(compose_config(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_run_with_mixup_and_cutmix_resumed_mid_epoch_ends_bit_identical(tmp_path, monkeypatch):
    overrides = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=2) + MIX
    run(compose_config(overrides), run_dir=tmp_path / "straight")
    with_signals(monkeypatch, 7, signal.SIGTERM)  # mid-way through epoch 2 (5 updates an epoch)
    with pytest.raises(TrainingInterrupted):
        run(compose_config(overrides), run_dir=tmp_path / "stopped")
    monkeypatch.undo()
    run(compose_config(overrides + ["resume=auto"]), run_dir=tmp_path / "stopped")
    assert_same_result(tmp_path / "stopped", tmp_path / "straight")
    without = tiny_overrides(make_image_folder(tmp_path / "images"), epochs=2) + MIX[2:]
    run(compose_config(without), run_dir=tmp_path / "plain")  # the mixing changed the training: the test can fail
    losses = [[json.loads(line)["train/loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "plain")]
    assert losses[0] != losses[1]
