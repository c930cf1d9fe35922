"""Mixup and CutMix on training batches (timm's ``Mixup``: soft targets, label smoothing folded in).

Resumable by construction: timm draws from numpy's global RNG, so each batch's draw runs under a numpy
state seeded from ``(seed, epoch, batch)`` and the global state is put back after it. The draws are then
a pure function of where the batch is in training, as the sampler's order is (`finetune.data.sampling`):
a run resumed mid-epoch mixes the rest of the epoch exactly as the run that never stopped, with no RNG
state to carry in the training state, and nothing else that draws from numpy is disturbed.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target


class BatchMixer:
    """``mixer(inputs, target, epoch=, batch=)``: the mixed batch and its soft targets.

    Args:
        mixup, cutmix: timm's Beta-distribution alphas (0 turns one off); with both, each batch picks one.
        prob: The chance that a batch is mixed at all.
        label_smoothing: Folded into the soft targets (the loss is then a plain soft-target cross-entropy).
        off_epoch: From this epoch on (0-based, timm's ``mixup_off_epoch``) batches are no longer mixed.

    An odd-sized batch (an epoch's last) is not mixed: timm pairs each image with its mirror in the batch.

    >>> mixer = BatchMixer(mixup=0.8, cutmix=0.0, prob=1.0, label_smoothing=0.0, num_classes=3, seed=0)
    >>> x, y = torch.zeros(2, 3, 4, 4), torch.tensor([0, 2])
    >>> x[1] += 1
    >>> mixed, soft = mixer(x.clone(), y, epoch=0, batch=1)
    >>> bool(torch.allclose(soft.sum(1), torch.ones(2))), torch.equal(mixer(x.clone(), y, epoch=0, batch=1)[0], mixed)
    (True, True)
    """

    def __init__(self, *, mixup: float, cutmix: float, prob: float, label_smoothing: float, num_classes: int,
                 seed: int, off_epoch: int | None = None):
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, label_smoothing=label_smoothing,
                         num_classes=num_classes)
        self.num_classes, self.smoothing, self.seed, self.off_epoch = num_classes, label_smoothing, seed, off_epoch

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor, *, epoch: int,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.off_epoch is not None and epoch >= self.off_epoch) or len(inputs) % 2:
            return inputs, mixup_target(target, self.num_classes, 1.0, self.smoothing)
        outside = np.random.get_state()
        np.random.seed([self.seed, epoch, batch])
        try:
            return self.mix(inputs, target)
        finally:
            np.random.set_state(outside)
