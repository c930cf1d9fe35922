"""Dynamic batching: requests that arrive together run as one batch, off the event loop.

A request's images (a ``(n, C, H, W)`` tensor) wait in a bounded queue. One collector task takes the
oldest, then waits up to ``max_delay_s`` from its arrival for more, until ``max_batch_size`` images
are there, and runs the batch in the model's own thread; while the model runs, new requests queue up
and form the next batch (Triton's ``dynamic_batching`` with ``max_queue_delay_microseconds``). A
request's images stay together in one batch. Past ``max_queue`` images waiting, `submit` refuses at
once (`RequestError` 503 with ``Retry-After``): the backlog never grows without bound.

No library does this for an asyncio server in-process (Triton and TorchServe do it in their own
servers; Ray Serve's ``@serve.batch`` needs Ray), so it is written here, in one small class.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from finetune.serve.errors import RequestError

log = logging.getLogger("finetune")


@dataclass
class Job:
    inputs: torch.Tensor  # (n, C, H, W)
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


class Batcher:
    """Collects jobs into batches of at most ``max_batch_size`` images and runs ``run`` on each batch in
    one worker thread. ``on_batch(size, seconds)`` and ``on_queue(depth)`` report to the metrics."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int, max_delay_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] = lambda size, seconds: None,
                 on_queue: Callable[[int], None] = lambda depth: None) -> None:
        self.run, self.max_batch_size, self.max_delay_s, self.max_queue = run, max_batch_size, max_delay_s, max_queue
        self.on_batch, self.on_queue = on_batch, on_queue
        self.jobs: collections.deque[Job] = collections.deque()
        self.queued = 0  # images waiting (not yet in a running batch)
        self.seconds_per_image = 0.0  # a running estimate, for Retry-After
        self.arrival = asyncio.Event()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-model")
        self.task: asyncio.Task | None = None
        self.draining = False  # set by `flush`: batches run at once, without waiting for more requests

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.collect_forever(), name="finetune-batcher")

    async def stop(self) -> None:
        """Stop collecting; jobs still waiting get 503 (the server drained its requests before this)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        fail(list(self.jobs), RequestError(503, "the server is shutting down: retry", headers={"Retry-After": "1"}))
        self.jobs.clear()
        self.worker.shutdown(wait=True)

    def flush(self) -> None:
        """From now on run what is queued at once (the server is draining: no more requests will come)."""
        self.draining = True
        self.arrival.set()

    async def submit(self, inputs: torch.Tensor) -> torch.Tensor:
        """The outputs of ``run`` for these images, once their batch has run."""
        size = int(inputs.shape[0])
        if self.queued + size > self.max_queue:
            raise RequestError(503, f"the server is busy: {self.queued} images are queued (max_queue="
                                    f"{self.max_queue}); retry later", headers={"Retry-After": self.retry_after()})
        job = Job(inputs, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.queued += size
        self.on_queue(self.queued)
        self.arrival.set()
        return await job.future

    def retry_after(self) -> str:
        """Seconds until the queue has room, as the server has been running (at least 1)."""
        return str(max(1, math.ceil(self.queued * self.seconds_per_image)))

    async def collect_forever(self) -> None:
        while True:
            await self.wait_for_batch()
            jobs = self.take()
            await self.run_batch(jobs)

    async def wait_for_batch(self) -> None:
        """Until a job is waiting, then until the batch is full or the oldest job has waited ``max_delay_s``."""
        while not self.jobs:
            self.arrival.clear()
            await self.arrival.wait()
        deadline = self.jobs[0].arrived + self.max_delay_s
        while (not self.draining and self.queued < self.max_batch_size
               and (remaining := deadline - time.monotonic()) > 0):
            self.arrival.clear()
            try:
                await asyncio.wait_for(self.arrival.wait(), remaining)
            except TimeoutError:
                break

    def take(self) -> list[Job]:
        """The oldest jobs that fit in one batch (always at least one)."""
        jobs = [self.jobs.popleft()]
        size = jobs[0].size
        while self.jobs and size + self.jobs[0].size <= self.max_batch_size:
            size += self.jobs[0].size
            jobs.append(self.jobs.popleft())
        self.queued -= size
        self.on_queue(self.queued)
        return jobs

    async def run_batch(self, jobs: list[Job]) -> None:
        """Run the batch in the model's thread; each job gets its rows, or the error (the server goes on)."""
        batch = torch.cat([job.inputs for job in jobs]) if len(jobs) > 1 else jobs[0].inputs
        started = time.monotonic()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.worker, self.run, batch)
        except asyncio.CancelledError:  # stopped mid-batch (the drain timed out): nobody is left waiting
            fail(jobs, RequestError(503, "the server is shutting down: retry", headers={"Retry-After": "1"}))
            raise
        except Exception as err:  # noqa: BLE001 - a model failure fails this batch's requests, not the server
            log.exception(f"a batch of {len(batch)} images failed")
            fail(jobs, RequestError(500, f"the model failed on this batch ({type(err).__name__}); see the server log"))
            return
        seconds = time.monotonic() - started
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / len(batch)
        self.on_batch(len(batch), seconds)
        start = 0
        for job in jobs:
            if not job.future.done():  # a cancelled request (client gone) has nobody to answer
                job.future.set_result(outputs[start:start + job.size])
            start += job.size


def fail(jobs: list[Job], error: RequestError) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
