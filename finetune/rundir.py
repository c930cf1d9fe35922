"""The run dir and the sweep dir as directories someone else may have made: what the project and Hydra
write there, the check for planted links before anything is written, the run-dir lock.

A run dir is often handed over ("resume my run"), and so is a sweep dir. Files the project writes
whole are written atomically (`finetune.files`), which replaces a link planted at their name; what
is appended to, locked, or written by Hydra or TensorBoard by name would follow a link, and so would
anything written into a linked directory. `check_run_dir` and `check_sweep_dir` refuse those links
before the first write: in `run` (any entry point), and from the command line before Hydra writes
its ``.hydra/`` files (`GuardDirs`, a Hydra callback). Torch-free: Hydra instantiates the callback
on every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from finetune.errors import UserError, message_of
from finetune.files import check_no_links_out, open_lock

# Directories of a run dir the project (or TensorBoard) writes into, and files it appends to or locks.
RUN_DIRS = ("checkpoints", "tb", "export", "eval", "predict")
RUN_APPENDED = ("train.log", "metrics.jsonl", "checkpoints/.lock")
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # Hydra writes them by name: a link is followed
SWEEP_FILES = ("multirun.yaml", "sweep_summary.csv", "sweep_summary.jsonl", "optuna.db")
MAX_SWEEP_ENTRIES = 100_000  # entries of a sweep dir looked at: a bound on the work a planted dir can cause


def check_run_dir(run_dir: str | Path, *, output_subdir: str | None = ".hydra") -> None:
    """Refuse (`finetune.files.PlantedLink`) a run dir where a write would follow a link out of it.

    Nothing to do for a directory that does not exist yet. ``output_subdir``: where Hydra writes its
    config files (``.hydra``, ``.hydra/resume`` on a resume; None: nowhere).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    names = list(RUN_DIRS) + list(RUN_APPENDED)
    if output_subdir:
        parts = Path(output_subdir).parts
        names += [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]
        names += [str(Path(output_subdir) / name) for name in HYDRA_FILES]
    check_no_links_out(run_dir, names)
    if (run_dir / "tb").is_dir():  # TensorBoard opens its event files by name: no link among them either
        with os.scandir(run_dir / "tb") as entries:
            links = [e.name for _, e in zip(range(MAX_SWEEP_ENTRIES), entries) if e.is_symlink()]
        check_no_links_out(run_dir / "tb", links[:1])


def check_sweep_dir(sweep_dir: str | Path, *, output_subdir: str | None = ".hydra") -> None:
    """Refuse a sweep dir where a write would follow a link: its own files (`SWEEP_FILES`), and each
    job dir in it, linked or holding such links (`check_run_dir`)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return
    check_no_links_out(sweep_dir, list(SWEEP_FILES))
    with os.scandir(sweep_dir) as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_SWEEP_ENTRIES:
                raise UserError(f"sweep dir '{sweep_dir}' has more than {MAX_SWEEP_ENTRIES} entries: refused; "
                                "choose another hydra.sweep.dir")
            if entry.is_dir():  # a job dir (Hydra writes into it by name): no link out, none planted in it
                check_no_links_out(sweep_dir, [entry.name])
                check_run_dir(entry.path, output_subdir=output_subdir)


class GuardDirs(Callback):
    """Hydra callback: before Hydra writes ``.hydra/`` into a run dir or a sweep dir that already
    exists, refuse planted links there, in one ``error:`` line (exit status 2).

    The directory is resolved here once and pinned: ``${now:...}`` resolves again at every read.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _pin(config, "run")
        _exit_on_refusal(lambda: check_run_dir(run_dir, output_subdir=config.hydra.output_subdir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _pin(config, "sweep")
        _exit_on_refusal(lambda: check_sweep_dir(sweep_dir, output_subdir=config.hydra.output_subdir))


def _pin(config: DictConfig, mode: str) -> str:
    directory = str(OmegaConf.select(config, f"hydra.{mode}.dir"))
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra[mode].dir = directory
    return directory


def _exit_on_refusal(check: Any) -> None:
    try:
        check()
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message_of(err)}", file=sys.stderr)
        sys.exit(2)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """``run_dir``, or Hydra's output dir of this job; made when missing."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def occupied_run_dir(run_dir: Path) -> str | None:
    """Why a fresh run may not start in ``run_dir`` (it holds a run's checkpoints), else None."""
    if (run_dir / "checkpoints" / "manifest.json").exists():
        return (f"'{run_dir}' already holds the checkpoints of a run and a fresh run never replaces them: "
                f"continue it with resume=auto, or choose another hydra.run.dir")
    return None


# ------------------------------------------------------------------ the lock
class RunDirInUse(UserError):
    """Another process is running in this run dir."""


_HELD_LOCKS: set[int] = set()  # run-dir lock fds of this process, which a forked child must not keep


def _drop_held_locks() -> None:
    """In a forked child (a loader worker): close the inherited run-dir lock fds (the parent keeps its lock)."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_held_locks)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for a run's life; refuse when another process holds it.

    Two processes on one run dir (a second ``resume=auto`` while the first trains) would delete
    each other's temporary files and interleave manifest writes. The lock is ``flock`` on
    ``checkpoints/.lock``: the kernel releases it when the holder exits, however it exits, so a
    killed run leaves no stale lock (the pid written in the file is only for the message). Forked
    children (loader workers) close their copy of the fd at once: a worker outliving a killed run
    by the seconds it takes to notice would otherwise hold the lock and refuse the resume. The lock
    file is never opened through a link (`finetune.files.open_lock`).
    """
    lock_path = run_dir / "checkpoints" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock(lock_path, root=run_dir)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirInUse(f"run dir '{run_dir}' is in use by pid {holder}: wait for that run to end (or stop "
                              "it), or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # releases the lock
