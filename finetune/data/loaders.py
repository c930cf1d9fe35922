"""Train and val data loaders, with class balancing and reproducible augmentation.

Reproducibility: the train loader's sampler is an `EpochSampler`, whose
``(index, sample_seed)`` pairs make each sample's augmentation a function of
``(seed, epoch, position)`` alone (see `finetune.data.sampling`). Worker processes are
seeded from a generator seeded with ``seed`` too, so nothing a worker does depends on
the trainer's global RNG, and results are the same for any ``num_workers``.

Speed: the workers send 8-bit images, and each batch is normalised after collation, on the
training device when batches are pinned for CUDA (`NormalizingLoader`): a quarter of the bytes
through shared memory and no float work per image in the workers, with the same result to the
last bit. JPEGs are decoded at a reduced size where the transform allows it
(`finetune.data.transforms.Preprocess`). ``num_workers="auto"`` (the default of
``conf/data/*.yaml``) is resolved here, from the CPUs this process may run on
(`auto_num_workers`), and logged.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from finetune.data.dataset import ImageDataset
from finetune.data.folder import DataSplit
from finetune.data.sampling import EpochSampler, EvalBatches
from finetune.data.transforms import Preprocess, normalize_batch
from finetune.errors import UserError

BALANCE_CHOICES = ("none", "sampler", "loss_weights")
MAX_AUTO_WORKERS = 8  # beyond this, more workers rarely feed one model faster, and each holds memory

log = logging.getLogger("finetune")


@dataclass
class Loaders:
    """What `build_loaders` returns.

    Attributes:
        train: The training loader; call ``train_sampler.set_epoch(e)`` before each epoch.
        val: The validation loader (fixed order, eval transform).
        train_sampler: The train loader's sampler (``set_epoch``, ``set_start``).
        class_weights: Per-class weights for ``CrossEntropyLoss(weight=...)`` (multi-label: BCE's
            ``pos_weight``, `positive_weights`) when ``balance="loss_weights"``, else None.
    """

    train: DataLoader
    val: DataLoader
    train_sampler: EpochSampler
    class_weights: torch.Tensor | None


def build_loaders(
    split: DataSplit,
    *,
    train_transform: Callable[[Any], Any],
    eval_transform: Callable[[Any], Any],
    batch_size: int,
    num_workers: int | str = 0,
    balance: str = "none",
    seed: int = 0,
    pin_memory: bool = False,
    channels: int = 3,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> Loaders:
    """Build the train and val loaders of a split.

    Args:
        split: Samples and class names (`scan_image_folder`).
        train_transform: Augmentation of training images.
        eval_transform: Preprocessing of validation images.
        batch_size: Images per batch, both loaders.
        num_workers: Loader worker processes (0: load in the main process), or ``"auto"``
            (`auto_num_workers`).
        balance: ``"none"``; ``"sampler"`` draws classes evenly (weighted, with
            replacement); ``"loss_weights"`` returns ``N / (C * count)`` class weights.
        seed: Seed of the sampling order, the augmentation and the workers.
        pin_memory: Pin batches for faster host-to-GPU copies.
        channels: Channels read from each image: 3 RGB, 1 grey, 4 RGBA (the model's ``in_chans``).
        rank, world_size: This process among the data-parallel processes: ``batch_size`` is per
            process, each loader yields this process's shard (`EpochSampler`, `EvalBatches`).
        device: The training device: a CUDA device gets each pinned batch copied to it and
            normalised there (`NormalizingLoader`); otherwise batches are normalised on the CPU.

    Returns:
        The loaders, the train sampler and the class weights.

    Raises:
        UserError: ``batch_size``, ``num_workers`` or ``balance`` is invalid.
    """
    num_workers = resolve_num_workers(num_workers)
    _check_loader_args(batch_size, num_workers, balance)
    counts = split.class_counts("train")
    sampler = _train_sampler(split, counts, balance=balance, seed=seed, batch_size=batch_size, rank=rank,
                             world_size=world_size)
    # Own generators: without one, every pass would draw worker seeds from the global RNG.
    common = _loader_options(num_workers, pin_memory) | {"channels": channels, "device": device,
                                                          "images": split.images}
    train_samples, val_samples = (multi_hot(split.train, split.num_classes), multi_hot(split.val, split.num_classes)) \
        if split.multilabel else (split.train, split.val)
    train = image_loader(train_samples, train_transform, sampler=sampler, batch_size=batch_size,
                         generator=torch.Generator().manual_seed(seed), **common)
    val = image_loader(val_samples, eval_transform,
                       batch_sampler=EvalBatches(len(split.val), batch_size, rank=rank, world_size=world_size),
                       generator=torch.Generator().manual_seed(seed), **common)
    weights = None
    if balance == "loss_weights":
        weights = positive_weights(counts, len(split.train)) if split.multilabel else compute_class_weights(counts)
    return Loaders(train, val, sampler, weights)


def image_loader(samples: list[tuple[str, int]], transform: Callable[[Any], Any], *, channels: int,
                 device: torch.device | None = None, images: Any = None, **options: Any) -> DataLoader:
    """A loader of ``(image, label)`` batches; a `NormalizingLoader` when ``transform`` can end in 8 bits.
    ``images``: what reads the samples' keys (`ImageDataset`); None: they are file paths."""
    split = transform.without_normalize() if isinstance(transform, Preprocess) else None
    if split is None:
        return DataLoader(ImageDataset(samples, transform, channels, images), **options)
    to_uint8, mean, std = split
    return NormalizingLoader(ImageDataset(samples, to_uint8, channels, images), mean=mean, std=std, device=device,
                             **options)


class NormalizingLoader(DataLoader):
    """A ``DataLoader`` whose workers send 8-bit images; each batch is normalised as it arrives.

    The workers skip the float conversion and normalisation of every image, and a batch crosses
    from the workers through shared memory in a quarter of the bytes. With ``pin_memory`` and a CUDA
    ``device`` (the training device; without one, the current CUDA device) the batch is copied
    there and normalised there, so the trainer's own ``.to(device)`` finds it in place; otherwise it
    is normalised in this process. The result is
    that of timm's ``ToTensor`` + ``Normalize`` in the worker, to the last bit (`normalize_batch`).
    Iterating yields ``(inputs, target)`` with float ``inputs``, like any other loader here.

    Args:
        mean, std: Per-channel ``(C, 1, 1)`` tensors (`Preprocess.without_normalize`).
        device: Where batches go when they are pinned: a CUDA device (None: the current one).
        **kwargs: ``DataLoader``'s.
    """

    def __init__(self, dataset: ImageDataset, *, mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        if not (self.pin_memory and torch.cuda.is_available()):
            self.device = torch.device("cpu")
        elif device is not None and device.type == "cuda":
            self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mean, self.std = mean.to(self.device), std.to(self.device)

    def __iter__(self) -> Any:
        return (self._normalized(inputs, target) for inputs, target in super().__iter__())

    def _normalized(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.to(self.device, non_blocking=True)
        return normalize_batch(inputs, self.mean, self.std), target


def resolve_num_workers(num_workers: int | str) -> int:
    """``data.num_workers`` as a count: ``"auto"`` becomes `auto_num_workers` (logged); a number stays."""
    if num_workers != "auto":
        return num_workers
    workers, cpus = auto_num_workers(), available_cpus()
    log.info(f"data.num_workers=auto: {workers} loader worker{'s' if workers != 1 else ''} "
             f"({cpus} CPU{'s' if cpus != 1 else ''} available to this process"
             f"{f', shared by {local_processes()} processes' if local_processes() > 1 else ''})")
    return workers


def auto_num_workers() -> int:
    """Loader workers for one training process: its CPUs less one for itself, at most `MAX_AUTO_WORKERS`.

    The CPUs are those this process may run on (``os.sched_getaffinity``: a SLURM or container
    CPU set, ``taskset``), shared evenly by the processes torchrun started on this machine unless
    they were each given their own set. One CPU: 0, the main process loads the data itself.
    """
    cpus = available_cpus()
    if local_processes() > 1 and cpus == (os.cpu_count() or cpus):  # the whole machine, for all of them
        cpus //= local_processes()
    return max(0, min(cpus - 1, MAX_AUTO_WORKERS))


def available_cpus() -> int:
    """The CPUs this process may run on (all of the machine's where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_loader_args(batch_size: int, num_workers: int, balance: str) -> None:
    """Fail on a batch size, worker count or balance mode that a loader cannot use."""
    _check_positive_int("data.batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"data.num_workers must be a non-negative integer, got '{num_workers}'")
    if balance not in BALANCE_CHOICES:
        choices = " | ".join(BALANCE_CHOICES)
        raise UserError(f"data.balance must be one of {choices}, got '{balance}'")


def _check_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass: reject True/False explicitly so data.batch_size=true is an error.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got '{value}'")


def _train_sampler(split: DataSplit, counts: list[int], *, balance: str, seed: int, batch_size: int, rank: int,
                   world_size: int) -> EpochSampler:
    """A seeded shuffle; with ``balance="sampler"``, draws weighted by 1 / class size (classes evenly)."""
    sample_weights = [1.0 / counts[label] for _, label in split.train] if balance == "sampler" else None
    return EpochSampler(len(split.train), seed=seed, weights=sample_weights, batch_size=batch_size, rank=rank,
                        world_size=world_size)


def _loader_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """``DataLoader`` keyword arguments shared by the train and val loaders."""
    options = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        # seed_worker seeds python and numpy in each worker; persistent workers start once,
        # not at every epoch.
        options |= {"worker_init_fn": seed_worker, "persistent_workers": True,
                    "multiprocessing_context": worker_context()}
    return options


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The start method for loader workers: the platform's own, also inside a parallel sweep's job.

    joblib's loky launcher makes its own start method the default in the processes it runs, and
    torch's workers cannot start through it ("'Process' object has no attribute 'env'"); there,
    the standard one is asked for by name. None (torch's default) everywhere else.
    """
    method = multiprocessing.get_start_method(allow_none=True)
    if method in (None, *multiprocessing.get_all_start_methods()):
        return None
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def compute_class_weights(counts: list[int]) -> torch.Tensor:
    """``N / (C * count)`` per class: 1 for every class when balanced.

    >>> compute_class_weights([30, 10]).tolist()
    [0.6666666865348816, 2.0]
    """
    total, num_classes = sum(counts), len(counts)
    return torch.tensor([total / (num_classes * max(count, 1)) for count in counts], dtype=torch.float32)


def positive_weights(positives: list[int], images: int) -> torch.Tensor:
    """BCE's ``pos_weight`` per class: negatives / positives (a class without a positive: 1).

    >>> positive_weights([10, 25, 0], 50).tolist()
    [4.0, 1.0, 1.0]
    """
    return torch.tensor([(images - p) / p if p else 1.0 for p in positives], dtype=torch.float32)


def multi_hot(samples: list[tuple[str, Any]], num_classes: int) -> list[tuple[str, torch.Tensor]]:
    """``(path, classes)`` samples as ``(path, float32 multi-hot row)``: what BCE takes as its target.

    >>> multi_hot([("a.png", (0, 2)), ("b.png", ())], 3)[0][1].tolist()
    [1.0, 0.0, 1.0]
    """
    out = []
    for path, classes in samples:
        row = torch.zeros(num_classes, dtype=torch.float32)
        row[list(classes)] = 1.0
        out.append((path, row))
    return out


def seed_worker(worker_id: int) -> None:
    """Seed python and numpy in a loader worker from torch's per-worker seed.

    torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` from the
    loader's generator); python's and numpy's RNGs would otherwise be copies of the
    parent's. Augmentation is re-seeded per sample anyway (`ImageDataset`); this
    covers anything else a transform might draw.
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
