"""Data-parallel runs on torch.distributed: which process this is, and the few collectives a run needs.

torchrun (or ``srun`` under SLURM) starts the processes; this module only joins them. A run
started by ``torchrun --nproc_per_node=N -m finetune`` is one run: every process runs the Hydra
app, rank 0 decides the run directory (`OneRunDir`), every process checks that it composed the
same config (`World.check_same_config`), and only rank 0 writes files. CPU tensors travel over
gloo, CUDA tensors over NCCL (one process group with both backends), one GPU per local rank.

What runs without a process group (one process) sees `SINGLE`, whose collectives return their
input: the code of a run is the same at any world size.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from finetune.errors import UserError

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (float64, on the CPU); one all-reduce.

        Integers below 2**53 and sums in which all but one process contribute 0 are exact.
        """
        tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank (picklable objects; every process gets the list)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, decision: Any) -> Any:
        """Rank 0's ``decision`` on every process: how a decision every rank must take alike (save, stop,
        prune) reaches them, whatever each computed itself.

        >>> SINGLE.agree(True)
        True
        """
        return self.broadcast(decision)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_same_config(self, config_yaml: str) -> None:
        """Every process composed the same config, or a one-line error with the first differences."""
        if not self.distributed:
            return
        configs = self.gather(config_yaml)
        for rank, other in enumerate(configs):
            if other != configs[0]:
                diff = [line for line in difflib.unified_diff(configs[0].splitlines(), other.splitlines(), lineterm="",
                                                              n=0) if line[:1] in "+-" and line[:3] not in ("---", "+++")]
                raise UserError(f"rank {rank} composed another config than rank 0 ({'; '.join(diff[:6])}): start "
                                "every process with the same overrides and environment")


SINGLE = World()


def launched_world(environ: dict[str, str] | None = None) -> World:
    """The world torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), SLURM (``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``) or submitit's local executor (``SUBMITIT_LOCAL_*``, the same
    path without a cluster) started this process in; `SINGLE` when none did.

    >>> launched_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    World(rank=1, local_rank=1, size=2)
    >>> launched_world({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})
    World(rank=3, local_rank=1, size=4)
    >>> launched_world({})
    World(rank=0, local_rank=0, size=1)
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), size=int(env["WORLD_SIZE"]))
    for prefix, rank, local in (("SLURM_", "PROCID", "LOCALID"), ("SUBMITIT_LOCAL_", "GLOBALID", "LOCALID")):
        if int(env.get(f"{prefix}NTASKS", "1")) > 1 and f"{prefix}{rank}" in env:  # srun, or submitit's local tasks
            return World(rank=int(env[f"{prefix}{rank}"]), local_rank=int(env.get(f"{prefix}{local}", "0")),
                         size=int(env[f"{prefix}NTASKS"]))
    return SINGLE


def current() -> World:
    """The world of the process group this process joined (`SINGLE` without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=dist.get_world_size())


def init() -> World:
    """Join the process group the launcher describes (once; later calls return the same world).

    Under ``srun`` without torchrun, the rendezvous address comes from submitit's
    ``TorchDistributedEnvironment`` (``finetune[slurm]``) unless ``MASTER_ADDR``/``MASTER_PORT`` are set.
    """
    world = launched_world()
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        return current()
    if "MASTER_ADDR" not in os.environ:
        _export_slurm_rendezvous()
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.size))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(minutes=30))
    return world


def _export_slurm_rendezvous() -> None:
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise UserError("several SLURM tasks but no MASTER_ADDR: set MASTER_ADDR and MASTER_PORT, launch with "
                        "torchrun, or pip install 'finetune[slurm]'") from None
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def close() -> None:
    """Leave the process group (the end of a run started by torchrun or srun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class OneRunDir(Callback):
    """Hydra callback: under torchrun, all processes run in the run directory rank 0 resolved.

    Every process runs the Hydra app, and ``${now:...}`` in ``hydra.run.dir`` resolves per process
    (hydra#2070). Before the job starts, rank 0's resolved directory is broadcast and used by every
    process; processes other than rank 0 write no ``.hydra/`` and no log file, and log errors to the
    console only (rank 0 logs everything else: the processes run the same code on the same config).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        world = init()
        if not world.distributed:
            return
        run_dir = world.broadcast(str(OmegaConf.select(config, "hydra.run.dir")))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            if not world.main:
                config.hydra.output_subdir = None
                config.hydra.job_logging = OmegaConf.create(rank_logging(world.rank))


def rank_logging(rank: int) -> dict[str, Any]:
    """The logging config of a process other than rank 0: errors on the console, with its rank."""
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"rank": {"format": f"[rank {rank}][%(levelname)s] %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "rank",
                                     "stream": "ext://sys.stderr"}},
            "root": {"level": "ERROR", "handlers": ["console"]}}
