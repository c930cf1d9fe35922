"""The training losses of each task (``task.name``, ``task.loss``), built by `finetune.builders.build_loss`."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class SmoothedBCE(nn.Module):
    """BCE-with-logits on multi-hot targets, mean over images and classes; ``smoothing`` e moves each target
    towards 1/2 (``y (1 - e) + e / 2``: the binary form of label smoothing); ``pos_weight`` weighs positives.

    >>> loss = SmoothedBCE(smoothing=0.2)
    >>> logits, target = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    >>> round(loss(logits, target).item(), 4) == round(nn.functional.binary_cross_entropy_with_logits(
    ...     logits, torch.tensor([[0.9, 0.1]])).item(), 4)
    True
    """

    def __init__(self, *, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)


def asymmetric_loss(*, gamma_neg: float, gamma_pos: float, clip: float) -> nn.Module:
    """timm's ``AsymmetricLossMultiLabel`` as a mean over images and classes (timm before 1.0.20 sums: divided here)."""
    from timm.loss import AsymmetricLossMultiLabel

    if "reduction" in inspect.signature(AsymmetricLossMultiLabel).parameters:
        return AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="mean")
    return _Mean(AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip))


class _Mean(nn.Module):
    def __init__(self, summed: nn.Module):
        super().__init__()
        self.summed = summed

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.summed(logits, target) / target.numel()
