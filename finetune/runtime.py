"""Process-wide setup: seeds, device, numeric precision, library versions."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

from finetune.distributed import SINGLE, World
from finetune.errors import UserError

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the run computes (see `setup_runtime`)."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    use_grad_scaler: bool  # fp16 on CUDA
    world: World = SINGLE  # the data-parallel processes of this run (DDP), one by default


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels; warn (not fail) where none exists."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled


def resolve_device(name: str, *, job: int = 0, world: World = SINGLE, key: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA request is an error (naming ``key``).

    ``per_job``: one GPU per job of a sweep whose jobs run in parallel (``job`` modulo the GPUs
    this process sees), the CPU when there is none. Under DDP each process takes the GPU of its
    local rank (``auto``, ``cuda``, ``per_job``), or the CPU. The one place a device name is read:
    training, evaluate, predict and export alike.
    """
    if world.distributed:
        if name not in ("auto", "cuda", "cpu", "per_job"):
            raise UserError(f"{key} '{name}' names one device, but under DDP each process takes the GPU of "
                            f"its local rank: use {key}=auto, cuda or cpu")
        if name == "cpu" or not torch.cuda.is_available():
            if name == "cuda":
                raise UserError(f"{key} 'cuda' asked for CUDA but torch sees no GPU: use {key}=cpu")
            return torch.device("cpu")
        return torch.device(f"cuda:{world.local_rank % torch.cuda.device_count()}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "per_job":
        return torch.device(device_for_job(job, torch.cuda.device_count() if torch.cuda.is_available() else 0))
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{key} '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} '{name}' asked for CUDA but torch sees no GPU: use {key}=cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{key} '{name}' is not supported: use auto, cpu, cuda or cuda:N")
    return device


def device_for_job(job: int, gpus: int) -> str:
    """The device of job number ``job`` of a parallel sweep on a machine with ``gpus`` GPUs.

    >>> [device_for_job(j, 2) for j in range(3)], device_for_job(5, 0)
    (['cuda:0', 'cuda:1', 'cuda:0'], 'cpu')
    """
    return f"cuda:{job % gpus}" if gpus else "cpu"


def setup_runtime(*, seed: int, device: str, precision: str, deterministic: bool = True, job: int = 0,
                  world: World = SINGLE) -> Runtime:
    """Seed, pick the device and the autocast dtype for ``trainer.precision``.

    Every process of a DDP run is seeded alike, so that they build the same model; `seed_ranks`
    gives each its own stream before training.
    """
    seed_everything(seed)
    set_deterministic(deterministic)
    dev = resolve_device(device, job=job, world=world)
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is torch.float16 and dev.type != "cuda":
        raise UserError("trainer.precision '16' (fp16 with a GradScaler) needs CUDA; "
                        "on CPU use trainer.precision=bf16 or 32")
    return Runtime(device=dev, autocast_dtype=dtype, use_grad_scaler=dtype is torch.float16, world=world)


def seed_ranks(seed: int, world: World) -> None:
    """Under DDP, each process its own random stream for training (dropout, drop-path) from here on:
    seeded with ``seed + rank``. One process keeps its stream as it is."""
    if world.distributed:
        seed_everything(seed + world.rank)


def package_versions() -> dict[str, str]:
    """Versions worth recording next to weights and in training state."""
    names = ("torch", "torchvision", "timm", "safetensors", "hydra-core", "finetune")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
