"""Dynamic batching with Triton's semantics, on the event loop, inference off it.

One queue of images. A batch leaves when ``max_batch_size`` images wait, or when the oldest has
waited ``max_queue_delay``. While a batch runs (in one inference thread), new images queue up, so
under load the next batch leaves full at once: batches grow with the load, and a lone request
waits at most the delay. A request's images are separate items: they may span batches, and each
has its own future, so results come back in the request's order whatever the batching.

Before a batch runs, items whose client went away (future cancelled) or whose deadline passed
(``DeadlineExceeded``) are dropped. The queue is bounded in images: ``submit`` raises
``QueueFull`` at once rather than letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .artifact import Detections, Detector
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class _Item:
    pixels: np.ndarray  # uint8 [H, W, 3]
    future: asyncio.Future[Detections]
    enqueued: float  # time.monotonic()
    deadline: float


class Batcher:
    def __init__(
        self,
        detector: Callable[[], Detector | None],
        metrics: Metrics,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        max_queue_size: int = 64,
    ) -> None:
        self._detector = detector  # read at each batch: a reload swaps it between batches
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # ONNX Runtime parallelises inside a run; one run at a time keeps its threads busy
        # without oversubscribing the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def submit(self, images: Sequence[np.ndarray], deadline: float) -> list[asyncio.Future[Detections]]:
        """Queue one request's images; their futures, in order. Raises QueueFull or ShuttingDown."""
        if self._stopping:
            raise ShuttingDown("the service is shutting down")
        if len(self._queue) + len(images) > self.max_queue_size:
            raise QueueFull(f"{len(self._queue)} images queued, limit {self.max_queue_size}")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for pixels in images:
            future: asyncio.Future[Detections] = loop.create_future()
            self._queue.append(_Item(pixels, future, now, deadline))
            futures.append(future)
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.set()
        return futures

    async def stop(self, timeout_s: float) -> None:
        """Refuse new work, finish what is queued (up to ``timeout_s``), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning("shutdown: %d queued images not done after %.1f s", len(self._queue), timeout_s)
                self._task.cancel()
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the service stopped before this image ran"))
        self._queue.clear()
        self._executor.shutdown(wait=False)

    async def _wait_for_batch(self) -> None:
        """Return when a full batch waits, the oldest image has waited the delay, or on stop."""
        while len(self._queue) < self.max_batch_size and not self._stopping:
            remaining = self._queue[0].enqueued + self.max_delay - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled: the client went away
                self.metrics.rejected.labels("disconnected").inc()
            elif now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
                self.metrics.rejected.labels("deadline").inc()
            else:
                batch.append(item)
                self.metrics.queue_wait.observe(now - item.enqueued)
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._wait_for_batch()
            batch = self._take()
            if not batch:
                continue
            detector = self._detector()
            if detector is None:
                for item in batch:
                    item.future.set_exception(ShuttingDown("no model is loaded"))
                continue
            pixels = np.stack([item.pixels for item in batch])
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, detector.detect, pixels)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batches.inc()
            self.metrics.images.inc(len(batch))
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
