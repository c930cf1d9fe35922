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

Under DDP (``world_size`` processes) the same order is cut into global batches of
``world_size * batch_size`` positions, and process ``rank`` takes the ``rank``-th block of
``batch_size`` of each: an update sees exactly the samples (and seeds) of one batch of a single
process with ``world_size * batch_size``, and the union over the processes is the single-process
epoch. An epoch's last, partial global batch is split as evenly as possible; it is dropped when
it would give a process fewer than 2 images (BatchNorm cannot train on one; one process: a last
batch of 1 is dropped). No position is padded or repeated.

`EvalBatches` shards an evaluation without padding: whole batches of the single-process order,
dealt round-robin, so every process computes exactly the single-process batches.
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
        batch_size: Images per batch of one process (for the sharding and the last batch's rule).
        rank, world_size: This process among the data-parallel processes.

    >>> sampler = EpochSampler(4, seed=0)
    >>> sampler.set_epoch(3); full = [i for i, _ in sampler]
    >>> sampler.set_start(1); [i for i, _ in sampler] == full[1:]
    True
    """

    def __init__(
        self, num_samples: int, *, seed: int, shuffle: bool = True, weights: Sequence[float] | None = None,
        batch_size: int = 1, rank: int = 0, world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and (len(self.weights) != num_samples or not (self.weights >= 0).all()):
            raise ValueError(f"weights must be {num_samples} non-negative numbers")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields; a new epoch clears `set_start`."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` positions of the current epoch's order (of every process), for one iteration."""
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {index}")
        self.start = int(index)

    @property
    def global_batch(self) -> int:
        """Positions per update over all processes."""
        return self.batch_size * self.world_size

    def epoch_length(self) -> int:
        """Positions of an epoch that are trained on (all processes): the last batch's rule applied.

        >>> EpochSampler(11, seed=0, batch_size=5).epoch_length(), EpochSampler(11, seed=0, batch_size=2,
        ...     world_size=2).epoch_length(), EpochSampler(23, seed=0, batch_size=3, world_size=2).epoch_length()
        (10, 8, 23)
        """
        rest = self.num_samples % self.global_batch
        return self.num_samples - rest if 0 < rest < 2 * self.world_size else self.num_samples

    def positions(self) -> list[int]:
        """This process's positions of the current epoch's order, from ``start`` on."""
        end, mine = self.epoch_length(), []
        for first in range(self.start, end, self.global_batch):
            size = min(self.global_batch, end - first)
            share, extra = divmod(size, self.world_size)  # the first ``extra`` processes take one more
            lo = first + self.rank * share + min(self.rank, extra)
            mine.extend(range(lo, lo + share + (self.rank < extra)))
        return mine

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
        order, positions = self.epoch_order(self.epoch), self.positions()
        self.start = 0  # the skip applies once: the next pass of this epoch is complete
        for position in positions:
            yield order[position]

    def __len__(self) -> int:
        return len(self.positions())


class EvalBatches(Sampler[list[int]]):
    """Batches of ``0..num_samples-1`` in order; under DDP process ``rank`` takes batches
    ``rank, rank + world_size, ...``: no index is padded or repeated, and each batch is exactly a
    batch of the single-process evaluation. ``batch_ids`` are the numbers of this process's batches.

    >>> [b for b in EvalBatches(7, batch_size=2, rank=1, world_size=2)], EvalBatches(7, 2, 1, 2).batch_ids
    ([[2, 3], [6]], [1, 3])
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.total_batches = -(-num_samples // batch_size)
        self.batch_ids = list(range(rank, self.total_batches, world_size))

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batch_ids:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)))

    def __len__(self) -> int:
        return len(self.batch_ids)
