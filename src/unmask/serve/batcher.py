"""Dynamic batching with a bounded queue.

Requests wait in one FIFO queue. When the sampler is free, the oldest waiting request waits
up to ``wait_s`` for company, then it and every later request with the same batch key go
into one sampler call, up to ``max_rows`` rows. While a batch runs, new requests queue; once
``max_queue`` are waiting, ``submit`` refuses at once (the server answers 503) instead of
letting latency grow without limit. One worker thread runs the batches, one at a time.

Cancelling a job's future (its client left) takes a waiting job out of the queue at once and
calls ``job.cancel()`` on a running one, for ``run`` to stop it early.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Batchable(Protocol):
    """A job the batcher can group: jobs with equal ``key`` share one sampler call."""

    @property
    def key(self) -> Hashable:
        """Jobs with the same key (decoding settings) can run in one batch."""
        ...

    @property
    def rows(self) -> int:
        """Sampler rows the job takes."""
        ...

    def cancel(self) -> None:
        """Stop the job (its client went away)."""
        ...


J = TypeVar("J", bound=Batchable)


class Overloaded(Exception):
    """The queue is full."""


@dataclass(eq=False)
class _Waiting(Generic[J]):
    job: J
    future: asyncio.Future[Any]
    arrived: float


class Batcher(Generic[J]):
    """Collects jobs into batches and runs ``run(batch) -> one result per job`` in a thread."""

    def __init__(
        self,
        run: Callable[[list[J]], list[Any]],
        max_rows: int,
        wait_s: float,
        max_queue: int,
    ) -> None:
        self._run = run
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.max_queue = max_queue
        self._waiting: collections.deque[_Waiting[J]] = collections.deque()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmask-sampler")
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows -> batches
        self.rejected = 0
        self.cancelled = 0
        self.running = False

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the batching loop and cancel the jobs still waiting."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for waiting in self._waiting:
            waiting.future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet answered."""
        return sum(not w.future.done() for w in self._waiting)

    def submit(self, job: J) -> asyncio.Future[Any]:
        """Queue ``job``; its future gets the result. Raises ``Overloaded`` when full."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if self.queued >= self.max_queue:
            self.rejected += 1
            raise Overloaded(f"{self.queued} requests are already waiting")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        waiting = _Waiting(job, future, loop.time())
        future.add_done_callback(lambda _: self._on_done(waiting))
        self._waiting.append(waiting)
        self._wake.set()
        return future

    def _on_done(self, waiting: _Waiting[J]) -> None:
        """A cancelled job is told to stop (if running) and the loop to drop it (if queued)."""
        if waiting.future.cancelled():
            self.cancelled += 1
            waiting.job.cancel()
            self._wake.set()  # the loop may be waiting for company for this very job

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._waiting[0]
            delay = first.arrived + self.wait_s - loop.time()
            if delay > 0 and self._rows_like(first.job) < self.max_rows:
                self._wake.clear()  # wait for company, re-checking at each arrival
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            batch = self._take()
            self.batch_sizes[sum(w.job.rows for w in batch)] += 1
            self.running = True
            try:
                results = await loop.run_in_executor(self._pool, self._run, [w.job for w in batch])
            except Exception as err:  # the jobs fail, the server goes on
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(err)
            else:
                for w, result in zip(batch, results, strict=True):
                    if not w.future.done():
                        w.future.set_result(result)
            finally:
                self.running = False

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(w for w in self._waiting if not w.future.done())

    def _rows_like(self, job: J) -> int:
        return sum(w.job.rows for w in self._waiting if w.job.key == job.key)

    def _take(self) -> list[_Waiting[J]]:
        """The oldest job and the later ones with its key that fit, in arrival order."""
        first = self._waiting[0]
        batch: list[_Waiting[J]] = []
        rows = 0
        rest: collections.deque[_Waiting[J]] = collections.deque()
        for w in self._waiting:
            if w is first or (w.job.key == first.job.key and rows + w.job.rows <= self.max_rows):
                batch.append(w)
                rows += w.job.rows
            else:
                rest.append(w)
        self._waiting = rest
        return batch
