"""Graceful stops: SIGTERM, SIGINT or SIGUSR2 finish the current step, save, and stop the run.

The first signal only sets a flag (`StopRequest`); the trainer polls it at each
optimizer-update boundary, lets its hooks save ``last.ckpt`` (mid-epoch), and raises
`TrainingInterrupted`. A second SIGINT or SIGTERM raises ``KeyboardInterrupt`` at once
(abort without saving; the files on disk stay consistent because every write is
atomic). Cluster preemption goes through the same path: SLURM sends SIGTERM, submitit sends SIGUSR2
before a job's time limit (after the save, ``finetune.__main__`` hands SIGUSR2 to submitit's own
handler, which requeues the job). Under DDP a signal to any process stops them all at one step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("finetune")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its state; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving last.ckpt")


class StopRequest:
    """Set by the first SIGTERM/SIGINT/SIGUSR2; ``signum`` is None until then."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {name}: aborted without saving")
        self.signum = signum
        log.warning(f"{name} received: finishing the current step, then saving last.ckpt "
                    "(send it again to abort at once)")


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Route SIGINT, SIGTERM and SIGUSR2 to a `StopRequest` for the duration; restore the old handlers after.

    Outside the main thread (where Python cannot install handlers) the request is never set.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shield_workers(loader: Any) -> None:
    """Make ``loader``'s worker processes ignore SIGINT and SIGTERM (before they start).

    A signal sent to the whole process group (Ctrl-C, ``timeout``, cluster schedulers)
    would otherwise kill the workers at once and fail the run before the main process
    could save; the main process stops them itself when it is done.
    """
    if getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=loader.worker_init_fn)


def _ignore_stop_signals(worker_id: int, then: Callable[[int], None] | None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def stop_workers(loader: Any) -> None:
    """Shut ``loader``'s worker processes down now, persistent ones included.

    Needed on every way out of a run: the workers ignore SIGTERM (``shield_workers``), and a
    failed run's traceback (which Hydra keeps) keeps the loader and its persistent iterator
    alive, so at exit Python's ``multiprocessing`` would terminate them in vain and wait forever.
    """
    from finetune._torch_compat import shutdown_loader_workers  # here: this module imports no torch (__main__)

    shutdown_loader_workers(loader)


def ignore_stop_signals() -> None:
    """From here on this process ignores SIGINT and SIGTERM: a DDP process that has stopped with the
    others and is on its way out. torchrun sends SIGTERM to every process once one exits with an error
    status (143 after a stop); ignoring it lets each process end with its own exit status. SIGUSR2
    keeps the handler it had before the run: submitit's, which requeues the job after a SIGUSR2 stop."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
