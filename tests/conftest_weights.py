"""Helpers shared by the weights tests (imported explicitly; not a pytest conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic random values, so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9 if tensor.ndim == 1 else torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def outputs(model: nn.Module, size: int = 64, channels: int = 3, seed: int = 1) -> torch.Tensor:
    """Eval-mode outputs on a fixed random batch."""
    images = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


class TinyNet(nn.Module):
    """A two-layer classifier: conv stem, BN, linear head (named like timm: classifier)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn1(self.conv_stem(x)).mean((2, 3)))


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models.

    On a busy 2-core machine, OpenMP threads spin-waiting on each other made a 32x32
    efficientnet_b0 forward take ~1 s instead of ~10 ms. Restored after the module.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
