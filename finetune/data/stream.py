"""Exact, resumable epochs over WebDataset shards (``data=webdataset``).

The order of an epoch is a pure function of ``(seed, epoch)``, the shard counts (from the index,
`finetune.data.shards`), the number of processes and of loader workers, the batch size and
``data.shuffle_buffer``; it is computed from the counts alone, before a byte of a shard is read:

1. the shards are permuted (seeded with ``seed`` and the epoch, the same on every process);
2. they are cut into *streams*, one per (process, loader worker): the permuted shards, as one sequence
   of samples, are cut into ``S`` contiguous ranges (``S`` streams in all) whose sizes differ by at most
   one sample (`cut_sequence`), so no sample is in two streams and no stream ends long before the others
   (a loader whose other workers have finished runs on one core; under DDP, the surplus of a process
   with more samples would be left out). A shard on the cut between two streams is read by both: the
   second reads past the first's samples without keeping them;
3. each stream reads its pieces of shards in that order, and a seeded sample buffer of ``shuffle_buffer``
   samples shuffles them (WebDataset's ``shuffle(n)`` algorithm, on positions); each position also
   gets a seed for its augmentation (`finetune.data.dataset.seeded_rng`), as `EpochSampler` gives folders;
4. a stream's samples are cut into batches (a last batch of one image is left out, as for folders:
   BatchNorm cannot train on it); a process's loader yields its workers' batches in turn (what torch's
   loader does), and every process stops after the same number of batches: the fewest any process has.
   The remainder (under DDP, at most a last batch per stream: stream sizes differ by one sample at
   most) is left out of that epoch; it is logged. With one process, every sample is seen exactly once
   per epoch (less a last single image per stream).

The loader workers persist between passes, as for folders (no start-up per epoch): each pass's epoch
and start reach them through shared memory, and each batch carries its pass, stream and batch number,
checked against the plan, so that nothing a worker fetched for an earlier pass (left unfinished by a
stop, or by a learning-rate trial) is trained on in the next.

Because the order is known, a run resumed mid-epoch skips the batches already trained on exactly:
each worker knows which of its positions are still to come, does not open shards that hold none of
them, and reads past the others without decoding. The sample buffer holds raw bytes of at most
``shuffle_buffer`` samples per worker.

Evaluation reads the val shards in order and deals whole batches to processes round-robin, as
`finetune.data.sampling.EvalBatches` does for folders: every process computes exactly the batches of
a single-process evaluation.

The order depends on the number of loader workers (each is a stream): resume a run with the same
``data.num_workers``. Resuming with another number of processes is not exact for shards.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from finetune._torch_compat import keep_iterator, kept_iterator, shutdown_loader_workers
from finetune.data.dataset import load_transformed, seeded_rng
from finetune.data.sampling import MAX_SAMPLE_SEED, SEED_STRIDE, EvalBatches
from finetune.data.shards import RawSample, Shard, image_and_label, iter_shard
from finetune.data.transforms import Preprocess, normalize_batch
from finetune.errors import UserError, describe_error

log = logging.getLogger("finetune")
STREAM_STRIDE = 65537  # streams of one epoch get distinct buffer seeds


def buffer_order(n: int, buffer: int, rng: random.Random) -> list[int]:
    """The order WebDataset's ``shuffle(buffer)`` gives samples ``0..n-1`` read in order: fill the buffer,
    then each new sample swaps in for a random one that is yielded; the rest is shuffled at the end.

    >>> buffer_order(5, 1, random.Random(0))
    [0, 1, 2, 3, 4]
    >>> sorted(buffer_order(50, 8, random.Random(0))) == list(range(50))
    True
    """
    out, held = [], []
    for position in range(n):
        held.append(position)
        if len(held) >= buffer:
            k = rng.randrange(len(held))
            held[k], held[-1] = held[-1], held[k]
            out.append(held.pop())
    rng.shuffle(held)
    return out + held


def stream_batches(samples: int, batch_size: int) -> int:
    """Batches of a stream of ``samples``: a last batch of one image is left out (BatchNorm), as for folders."""
    full, rest = divmod(samples, batch_size)
    return full + (1 if rest >= 2 or (rest == 1 and batch_size == 1) else 0)


def round_robin(counts: list[int]) -> list[tuple[int, int]]:
    """``(stream, batch)`` in the order a loader yields its workers' batches: in turn, skipping finished ones.

    >>> round_robin([2, 1, 3])
    [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
    """
    return [(s, k) for k in range(max(counts, default=0)) for s in range(len(counts)) if k < counts[s]]


class Piece(NamedTuple):
    """Samples ``first`` to ``stop - 1`` of shard ``shard`` (its index in the shard list)."""

    shard: int
    first: int
    stop: int


def cut_sequence(sizes: list[int], parts: int) -> list[list[Piece]]:
    """Items of ``sizes``, in order, as one sequence of samples cut into ``parts`` contiguous ranges whose
    lengths differ by at most one; each range as the pieces of items it spans.

    >>> cut_sequence([5, 5, 3], 2)
    [[Piece(shard=0, first=0, stop=5), Piece(shard=1, first=0, stop=1)], [Piece(shard=1, first=1, stop=5), \
Piece(shard=2, first=0, stop=3)]]
    """
    total = sum(sizes)
    cuts = [total * j // parts for j in range(parts + 1)]
    ranges: list[list[Piece]] = [[] for _ in range(parts)]
    base, part = 0, 0
    for item, size in enumerate(sizes):
        first = 0
        while first < size:
            while cuts[part + 1] <= base + first:
                part += 1
            stop = min(size, cuts[part + 1] - base)
            ranges[part].append(Piece(item, first, stop))
            first = stop
        base += size
    return ranges


@dataclass
class StreamPlan:
    """One stream of one epoch: its pieces of shards in read order, and the output order of its positions."""

    pieces: list[Piece]
    order: list[int]
    seeds: list[int]


class ShardOrder:
    """The sampler of a shard stream: `set_epoch`, `set_start` as `EpochSampler` has them, for the trainer.

    Args:
        counts: Samples of each shard (from the index).
        seed: Base seed of every epoch.
        batch_size: Images per batch of one process.
        buffer: Depth of the sample buffer (``data.shuffle_buffer``); 1 keeps each shard's order.
        workers: Streams per process (loader workers; 1 with none).
        shuffle: Permute shards and samples; False reads them in order.
    """

    def __init__(self, counts: list[int], *, seed: int, batch_size: int, buffer: int, workers: int = 1,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if len(counts) < world_size * workers:
            raise ValueError(f"{len(counts)} shards for {world_size * workers} streams")
        self.counts, self.seed, self.batch_size, self.buffer = list(counts), int(seed), int(batch_size), int(buffer)
        self.workers, self.rank, self.world_size, self.shuffle = workers, rank, world_size, shuffle
        self.total_samples = sum(self.counts)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` positions of the epoch (all processes: batches seen x `global_batch`)."""
        self.start = int(index)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _rng(self, *parts: int) -> random.Random:
        value = self.seed * SEED_STRIDE + self.epoch
        for part in parts:
            value = value * STREAM_STRIDE + part
        return random.Random(value)

    def stream_pieces(self) -> list[list[Piece]]:
        """Each stream's pieces of shards (stream ``rank * workers + w``) in read order, this epoch: the
        permuted shards as one sequence of samples, cut into streams of equal size (within one sample)."""
        shards = list(range(len(self.counts)))
        if self.shuffle:
            self._rng().shuffle(shards)
        pieces = cut_sequence([self.counts[s] for s in shards], self.world_size * self.workers)
        return [[Piece(shards[p.shard], p.first, p.stop) for p in stream] for stream in pieces]

    def batch_counts(self) -> list[list[int]]:
        """Batches of each worker's stream, per process."""
        sizes = self.stream_sizes()
        return [[stream_batches(sizes[r * self.workers + w], self.batch_size) for w in range(self.workers)]
                for r in range(self.world_size)]

    def steps(self) -> int:
        """Batches every process trains on this epoch: the fewest any process has."""
        return min(sum(c) for c in self.batch_counts())

    @property
    def num_samples(self) -> int:
        """Positions of an epoch as the trainer counts them: batches x `global_batch`."""
        return self.steps() * self.global_batch

    def epoch_length(self) -> int:
        return self.num_samples

    def stream_sizes(self) -> list[int]:
        return [sum(p.stop - p.first for p in pieces) for pieces in self.stream_pieces()]

    def left_out(self) -> int:
        """Samples of an epoch no process trains on (uneven streams, last single images)."""
        sizes, steps, trained = self.stream_sizes(), self.steps(), 0
        for rank, counts in enumerate(self.batch_counts()):
            for w, k in round_robin(counts)[:steps]:
                trained += min(self.batch_size, sizes[rank * self.workers + w] - k * self.batch_size)
        return self.total_samples - trained

    def remaining(self) -> list[tuple[int, int]]:
        """This process's ``(worker stream, batch)`` sequence still to come this epoch (after `set_start`)."""
        sequence = round_robin(self.batch_counts()[self.rank])[:self.steps()]
        return sequence[self.start // self.global_batch:]

    def plan(self, worker: int) -> StreamPlan:
        """The order of one of this process's streams (its pieces read in order, its positions shuffled)."""
        pieces = self.stream_pieces()[self.rank * self.workers + worker]
        n = sum(p.stop - p.first for p in pieces)
        rng = self._rng(self.rank * self.workers + worker + 1)
        order = buffer_order(n, self.buffer, rng) if self.shuffle else list(range(n))
        return StreamPlan(pieces, order, [rng.getrandbits(62) % MAX_SAMPLE_SEED for _ in range(n)])

    def __len__(self) -> int:
        return len(self.remaining())


@dataclass
class WorkerJob:
    """What one loader worker yields: batches ``(stream, k)`` of one stream, positions in order."""

    stream: int
    batches: list[int]
    plan: StreamPlan


def worker_jobs(order: ShardOrder, *, worker: int | None = None) -> list[WorkerJob]:
    """The remaining batches dealt to loader workers so that torch's turn-taking yields them in order:
    the streams in the order of their next batch (worker 0 first); streams with nothing left get no worker.
    ``worker``: that worker's job alone (none when it gets no stream), planned without the others'."""
    remaining = order.remaining()
    streams = list(dict.fromkeys(stream for stream, _ in remaining))
    chosen = streams if worker is None else streams[worker:worker + 1]
    return [WorkerJob(stream, [k for s, k in remaining if s == stream], order.plan(stream)) for stream in chosen]


class PassState:
    """What a pass tells the loader workers: its number, epoch and start, in shared memory.

    The workers persist between passes, each with the copy of the data set it started with; torch
    calls ``iter(dataset)`` in each of them as a pass starts, which reads this (written before).
    """

    def __init__(self) -> None:
        self.values = torch.zeros(3, dtype=torch.int64).share_memory_()

    def write(self, number: int, epoch: int = 0, start: int = 0) -> None:
        self.values.copy_(torch.tensor([number, epoch, start]))

    def read(self) -> tuple[int, int, int]:
        number, epoch, start = self.values.tolist()
        return number, epoch, start


# ------------------------------------------------------------------ reading
class ShardReader:
    """Samples at given positions of a sequence of pieces of shards, in a given order, holding only those not
    yet yielded (raw bytes). Pieces holding none of the positions are not opened; a piece that starts inside
    its shard reads past the samples before it without keeping them.

    ``rows``: reads one shard's samples, ``rows(shard, keep)`` -> for each, None where ``keep(i)`` is false,
    else ``(image bytes, label, name)``; None: the shards are WebDataset tar files (`tar_rows`).
    """

    def __init__(self, shards: list[Shard], storage_options: dict[str, Any] | None, num_classes: int,
                 rows: Callable[[Shard, Callable[[int], bool]], Iterator[Any]] | None = None):
        self.shards, self.storage_options, self.num_classes = shards, storage_options, num_classes
        self.rows = rows

    def whole(self) -> list[Piece]:
        """Every shard from its first sample to its last, in order."""
        return [Piece(i, 0, shard.samples) for i, shard in enumerate(self.shards)]

    def read(self, pieces: list[Piece], emit: list[int]) -> Iterator[tuple[int, bytes, int, str]]:
        """``(position, image bytes, label, name)`` for each position of ``emit``, in that order."""
        wanted, held, next_out, base = set(emit), {}, 0, 0
        for piece in pieces:
            if any(base + i in wanted for i in range(piece.stop - piece.first)):
                for position, sample in self._samples(piece, base, wanted):
                    held[position] = sample
                    while next_out < len(emit) and emit[next_out] in held:
                        yield (emit[next_out], *held.pop(emit[next_out]))
                        next_out += 1
            base += piece.stop - piece.first
        if next_out != len(emit):
            raise UserError(f"the shards ended before position {emit[next_out]}: a shard holds fewer samples than "
                            "its index says; write the shards again")

    def _samples(self, piece: Piece, base: int, wanted: set[int]) -> Iterator[tuple[int, tuple[bytes, int, str]]]:
        """The wanted samples of ``piece`` by position (``base``: the position of its first sample). The
        stream reading a shard's last piece checks its count; the others stop at the end of their piece."""
        shard, first, stop, count = self.shards[piece.shard], piece.first, piece.stop, 0
        rows = (self.rows or self.tar_rows)(shard, lambda i: first <= i < stop and base + i - first in wanted)
        with contextlib.closing(rows):
            for count, sample in enumerate(rows, start=1):
                if count > shard.samples:
                    break
                if sample is not None:
                    yield base + count - 1 - first, sample
                if count == stop < shard.samples:
                    return
        if count != shard.samples:
            raise UserError(f"shard '{shard.url}' holds {'more' if count > shard.samples else count} samples, its "
                            f"index says {shard.samples}: write the shards and the index again")

    def tar_rows(self, shard: Shard, keep: Callable[[int], bool]) -> Iterator[tuple[bytes, int, str] | None]:
        with contextlib.closing(iter_shard(shard.url, self.storage_options, keep=keep)) as samples:
            for sample in samples:
                if sample is None:
                    yield None
                else:
                    yield (*image_and_label(sample, url=shard.url, num_classes=self.num_classes),
                           _name(shard, sample))


def _name(shard: Shard, sample: RawSample) -> str:
    return f"{shard.url}:{sample.key[:200]}"


def decode(image: bytes, name: str, transform: Callable, channels: int, seed: int | None) -> Any:
    """One sample's image through ``transform`` (seeded per position when ``seed`` is given)."""
    context = seeded_rng(seed) if seed is not None else _nothing()
    with context:
        try:
            return load_transformed(io.BytesIO(image), transform, channels)
        except UserError:
            raise
        except Exception as exc:  # PIL raises many types: name the sample either way
            raise UserError(f"cannot read image '{name}' ({describe_error(exc)}): fix or remove it") from None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def collate(items: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


# ------------------------------------------------------------------ data sets
class TrainStream(IterableDataset):
    """The training batches of this process, for the pass in `current` (its epoch and start). Each batch
    is tagged ``(pass, stream, batch)``."""

    def __init__(self, reader: ShardReader, order: ShardOrder, transform: Callable, channels: int):
        self.reader, self.order, self.transform, self.channels = reader, order, transform, channels
        self.current = PassState()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        number, epoch, start = self.current.read()
        order = copy.copy(self.order)
        order.epoch, order.start = epoch, start
        info = get_worker_info()
        jobs = worker_jobs(order, worker=None if info is None else info.id)
        return (batch for job in jobs for batch in self._job(job, number))

    def _job(self, job: WorkerJob, number: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        bs, plan = self.order.batch_size, job.plan
        emit = [p for k in job.batches for p in plan.order[k * bs:(k + 1) * bs]]
        seeds = {p: plan.seeds[i] for k in job.batches for i, p in enumerate(plan.order[k * bs:(k + 1) * bs], k * bs)}
        batch, k_index = [], 0
        for position, image, label, name in self.reader.read(plan.pieces, emit):
            batch.append((decode(image, name, self.transform, self.channels, seeds[position]), label))
            if len(batch) == min(bs, len(plan.order) - job.batches[k_index] * bs):
                yield (*collate(batch), (number, job.stream, job.batches[k_index]))
                batch, k_index = [], k_index + 1


class EvalStream(IterableDataset):
    """This process's evaluation batches (`EvalBatches` of the val shards read in order); each worker
    takes every ``num_workers``-th of them. Each batch is tagged ``(pass, 0, batch)``."""

    def __init__(self, reader: ShardReader, batches: EvalBatches, transform: Callable, channels: int):
        self.reader, self.batches, self.transform, self.channels = reader, batches, transform, channels
        self.current = PassState()

    def __len__(self) -> int:
        return self.batches.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._batches(self.current.read()[0], worker, workers)

    def _batches(self, number: int, worker: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple]]:
        mine = list(self.batches)[worker::workers]
        ids = self.batches.batch_ids[worker::workers]
        emit = [p for batch in mine for p in batch]
        sizes, batch, n = [len(b) for b in mine], [], 0
        for _, image, label, name in self.reader.read(self.reader.whole(), emit):
            batch.append((decode(image, name, self.transform, self.channels, None), label))
            if len(batch) == sizes[n]:
                yield (*collate(batch), (number, 0, ids[n]))
                batch, n = [], n + 1


# ------------------------------------------------------------------ loaders
class StreamLoader:
    """A loader of ``(inputs, target)`` batches from a shard stream, with the attributes the trainer and
    the run's teardown use (``sampler``, ``batch_size``, ``num_workers``, ``worker_init_fn``, ...).

    The workers send 8-bit images; batches are normalised here (`normalize_batch`), as
    `finetune.data.loaders.NormalizingLoader` does for folders. The workers persist between passes, as
    for folders: each pass's number, epoch and start reach them through shared memory (`PassState`);
    what they had fetched for a pass left unfinished (a stop, a learning-rate trial) torch discards as
    the next pass starts. Each batch carries which pass, stream and batch it is, checked against the
    plan: a loader that yields anything else stops the run instead of training on it. A pass that fails
    stops the workers; the run's teardown stops them too.
    """

    def __init__(self, dataset: TrainStream | EvalStream, *, batch_size: int, num_workers: int, normalize: Any,
                 generator: torch.Generator, context: Any = None, pin_memory: bool = False):
        self.dataset, self.batch_size, self.normalize = dataset, batch_size, normalize
        self.sampler = dataset.order if isinstance(dataset, TrainStream) else None
        self.batch_sampler = dataset.batches if isinstance(dataset, EvalStream) else None
        if self.sampler is not None and num_workers and num_workers != self.sampler.workers:
            raise ValueError(f"{self.sampler.workers} streams for {num_workers} workers")
        self.generator = generator
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 generator=generator, multiprocessing_context=context if num_workers else None,
                                 persistent_workers=num_workers > 0)
        self.pass_number = 0
        keep_iterator(self, None)  # the workers of the last pass, once there is one

    num_workers = property(lambda self: self.loader.num_workers)

    @property
    def worker_init_fn(self) -> Any:
        return self.loader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, value: Any) -> None:
        self.loader.worker_init_fn = value

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.batch_sampler)

    def expected(self) -> list[tuple[int, int]]:
        if self.sampler is None:
            return [(0, b) for b in self.batch_sampler.batch_ids]
        return self.sampler.remaining()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        expected = self.expected()
        self.pass_number += 1
        if self.sampler is not None:
            self.dataset.current.write(self.pass_number, self.sampler.epoch, self.sampler.start)
            self.sampler.start = 0  # the skip applies once, as for EpochSampler
        else:
            self.dataset.current.write(self.pass_number)
        if kept_iterator(self) is None:  # first pass, or the workers were stopped: none of theirs is reused
            shutdown_loader_workers(self.loader)
        iterator = iter(self.loader)
        keep_iterator(self, iterator)  # held here so that the run's teardown can stop its workers
        return self._pass(iterator, [(self.pass_number, *tag) for tag in expected])

    def _pass(self, batches: Iterator,
              expected: list[tuple[int, int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self._checked(batches, expected)
        except Exception:  # no worker outlives a failed pass (the error may keep this loader alive)
            shutdown_loader_workers(self)
            raise

    def _checked(self, batches: Iterator,
                 expected: list[tuple[int, int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = 0
        for inputs, target, tag in batches:
            if n >= len(expected) or tuple(tag) != expected[n]:
                raise RuntimeError(f"shard loader yielded (pass, stream, batch) {tuple(tag)} where {expected[n:n + 1]} "
                                   "was planned")
            n += 1
            yield self.normalize(inputs), target
            if n == len(expected):
                return  # the other processes stop here too: the surplus of longer streams is left out
        if n != len(expected):
            raise RuntimeError(f"shard loader ended after {n} of {len(expected)} batches")


@dataclass
class Normalizer:
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return inputs
        return normalize_batch(inputs.to(self.device, non_blocking=True), self.mean, self.std)


def split_transform(transform: Callable) -> tuple[Callable, Normalizer]:
    """What the workers apply (8-bit when possible) and what the loader applies to each batch."""
    split = transform.without_normalize() if isinstance(transform, Preprocess) else None
    if split is None:
        return transform, Normalizer()
    to_uint8, mean, std = split
    return to_uint8, Normalizer(mean, std)


# ------------------------------------------------------------------ the run's data
@dataclass
class ShardSplit:
    """Train and val shards of a run, with the class names (what `finetune.data.DataSplit` is for folders)."""

    train: list[Shard]
    val: list[Shard]
    class_names: list[str]
    root: str  # the train URLs as given, for the start of the run
    layout: str = "shards"
    val_split: float | None = None
    skipped: list[str] = field(default_factory=list)
    rows: Any = None  # how a shard's samples are read (`ShardReader`); None: WebDataset tar files

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class from the index (zeros where the index does not say)."""
        counts = [0] * self.num_classes
        for shard in self.train if split == "train" else self.val:
            for label, count in enumerate((shard.classes or ())[:self.num_classes]):
                counts[label] += count
        return counts

    def to_record(self) -> dict:
        """``split.json``: the shards of each split and their counts."""
        return {"layout": self.layout, "class_names": list(self.class_names),
                "shards": {split: [[s.url, s.samples] for s in shards] for split, shards in
                           (("train", self.train), ("val", self.val))}}


def build_stream_loaders(split: ShardSplit, *, train_transform: Callable, eval_transform: Callable, batch_size: int,
                         num_workers: int, buffer: int, seed: int, storage_options: dict[str, Any] | None,
                         channels: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                         device: torch.device | None = None, context: Any = None) -> Any:
    """The train and val loaders of shards: one stream per (process, loader worker), exact epochs."""
    from finetune.data.loaders import Loaders

    parquet = split.layout == "hf-stream"  # data=hf data.streaming=true: each Parquet file is a shard
    if len(split.train) < world_size:
        what, fix = (("train files in data.path", "write more, smaller Parquet files") if parquet else
                     ("shards in data.train_urls", "write smaller shards (python -m finetune.shard --shard-size)"))
        raise UserError(f"{len(split.train)} {what}, fewer than the {world_size} processes: {fix}")
    streams = max(1, min(num_workers, len(split.train) // world_size))
    order = ShardOrder([s.samples for s in split.train], seed=seed, batch_size=batch_size, buffer=buffer,
                       workers=streams, rank=rank, world_size=world_size)
    if order.steps() < 1:
        raise UserError(f"the {order.total_samples} training samples give no batch of data.batch_size={batch_size} "
                        f"per process: lower data.batch_size or write more samples")
    train_reader = ShardReader(split.train, storage_options, split.num_classes, split.rows)
    val_reader = ShardReader(split.val, storage_options, split.num_classes, split.rows)
    to_uint8, normalize = split_transform(train_transform)
    eval_uint8, eval_normalize = split_transform(eval_transform)
    if device is not None and device.type == "cuda" and pin_memory:
        normalize.device = eval_normalize.device = device
    generator = torch.Generator().manual_seed(seed)
    train = StreamLoader(TrainStream(train_reader, order, to_uint8, channels), batch_size=batch_size,
                         num_workers=streams if num_workers > 0 else 0, normalize=normalize, generator=generator,
                         context=context, pin_memory=pin_memory)
    batches = EvalBatches(sum(s.samples for s in split.val), batch_size, rank=rank, world_size=world_size)
    val = StreamLoader(EvalStream(val_reader, batches, eval_uint8, channels), batch_size=batch_size,
                       num_workers=min(num_workers, max(len(batches), 1)), normalize=eval_normalize,
                       generator=torch.Generator().manual_seed(seed), context=context, pin_memory=pin_memory)
    source = "data=hf data.streaming=true" if parquet else "data=webdataset"
    log.info(f"{source}: {order.total_samples} train samples in {len(split.train)} shards, {streams} "
             f"stream(s) per process, {order.steps()} batches per epoch and process; {order.left_out()} samples "
             "left out of the first epoch (a last single image, uneven streams)")
    return Loaders(train, val, order, None)
