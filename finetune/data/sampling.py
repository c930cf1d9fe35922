"""Epoch orders that are a pure function of (seed, epoch), and resumable mid-epoch.

`EpochSampler` yields ``(index, sample_seed)`` pairs. Both the order and the per-position
sample seeds come from one ``torch.Generator`` seeded with ``seed * 1000003 + epoch`` —
never the global RNG — so:

- an epoch's order does not depend on what ran before it (other epochs, evaluation,
  model initialisation, the number of data-loader workers);
- `ImageDataset` seeds the augmentation of each sample with its ``sample_seed``, so the
  augmented batch at step ``k`` of epoch ``e`` is the same in a fresh run, in a run
  resumed from a checkpoint, and with any ``num_workers``;
- resuming mid-epoch is `set_epoch` then `set_start`: the first ``start`` positions of
  that epoch's order are skipped, the rest (indices *and* seeds) are what the
  uninterrupted run would have seen.

Seeds are drawn per *position*, not per sample index: with weighted sampling (with
replacement) a sample drawn twice in one epoch gets two different augmentations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

SEED_STRIDE = 1000003  # keeps (seed, epoch) pairs from colliding for epochs < 1e6
MAX_SAMPLE_SEED = 2**62


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled, optionally weighted, resumable sampling of ``num_samples`` indices.

    Args:
        num_samples: Size of the data set; also the number of draws per epoch.
        seed: Base seed of every epoch's order.
        shuffle: Permute the indices each epoch; False keeps ``0..n-1`` (seeds still vary).
        weights: Per-sample weights; given, each epoch draws ``num_samples`` indices with
            replacement in proportion to them (class balancing).

    >>> sampler = EpochSampler(4, seed=0)
    >>> sampler.set_epoch(3); full = [i for i, _ in sampler]
    >>> sampler.set_start(1); [i for i, _ in sampler] == full[1:]
    True
    """

    def __init__(
        self, num_samples: int, *, seed: int, shuffle: bool = True, weights: Sequence[float] | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and (len(self.weights) != num_samples or not (self.weights >= 0).all()):
            raise ValueError(f"weights must be {num_samples} non-negative numbers")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields; a new epoch clears `set_start`."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` positions of the current epoch's order, for one iteration."""
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {index}")
        self.start = int(index)

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """The full ``(index, sample_seed)`` sequence of ``epoch`` (no skipping)."""
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        if self.weights is not None:
            indices = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            indices = torch.randperm(self.num_samples, generator=generator)
        else:
            indices = torch.arange(self.num_samples)
        seeds = torch.randint(0, MAX_SAMPLE_SEED, (self.num_samples,), generator=generator)
        return list(zip(indices.tolist(), seeds.tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order(self.epoch)
        yield from order[self.start :]
        self.start = 0  # the skip applies once: the next pass of this epoch is complete

    def __len__(self) -> int:
        return self.num_samples - self.start
