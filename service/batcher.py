"""Dynamic batching with Triton's semantics, on the event loop, inference off it.

One queue of images. A batch leaves when ``max_batch_size`` images wait, or when the oldest has
waited ``max_queue_delay``. While a batch runs (in one inference thread), new images queue up, so
under load the next batch leaves full at once: batches grow with the load, and a lone request
waits at most the delay. A request's images are separate items: they may span batches, and each
has its own future, so results come back in the request's order whatever the batching.

Before a batch runs, items whose client went away (future cancelled) or whose deadline passed
(``DeadlineExceeded``) are dropped.

Admission happens at the door, before decoding (``reserve``), so that an overloaded service does
not spend the CPU its queue needs on images it will refuse. ``QueueFull`` is raised at once when the
images queued or being decoded would pass ``max_queue_size``, or, with ``max_queue_wait``, when
they would wait longer than that: a bound in time holds on any hardware, where a bound in images
means 0.1 s on a GPU and a second on a small CPU. The wait is estimated from the seconds a batch
of each size takes (measured at warm-up, then a moving average over the batches run), as the
batches the queue ahead will make: full ones, then the rest. An estimate from the recent rate
alone would be that of batches of one at light load, and would refuse a burst the batches it
forms can absorb.
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
        max_queue_wait_s: float = 0.0,
    ) -> None:
        self._detector = detector  # read at each batch: a reload swaps it between batches
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_queue_wait = max_queue_wait_s  # 0: bounded in images only
        self._queue: deque[_Item] = deque()
        self._reserved = 0  # images admitted by reserve() and not yet submitted (being decoded)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # ONNX Runtime parallelises inside a run; one run at a time keeps its threads busy
        # without oversubscribing the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def __len__(self) -> int:
        return len(self._queue)

    def estimated_wait(self, images: int) -> float | None:
        """Seconds until ``images`` queued images would have run, so that one behind them could
        start: from the current model's batch times (None before any is known)."""
        detector = self._detector()
        times = getattr(detector, "batch_seconds", None)
        if not times:
            return None

        def seconds(size: int) -> float:
            if size in times:
                return times[size]
            # Unmeasured size: from the nearest measured one, linearly (batching is sublinear,
            # so this errs on the long side) or, for a smaller size, the same time.
            below = [k for k in times if k < size]
            if below:
                k = max(below)
                return times[k] * size / k
            return times[min(times)]

        if images <= 0:
            return 0.0
        full, rest = divmod(images, self.max_batch_size)
        return full * seconds(self.max_batch_size) + (seconds(rest) if rest else 0.0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def reserve(self, count: int) -> None:
        """Admit ``count`` images before they are decoded, or raise QueueFull or ShuttingDown.

        The caller then ``submit``s them with ``reserved=True``, or ``release``s them."""
        if self._stopping:
            raise ShuttingDown("the service is shutting down")
        ahead = len(self._queue) + self._reserved
        if ahead + count > self.max_queue_size:
            raise QueueFull(f"{ahead} images queued or decoding, limit {self.max_queue_size}")
        if self.max_queue_wait:
            # The request's last image waits for everything ahead of it, its own first images included.
            wait = self.estimated_wait(ahead + count - 1)
            if wait is not None and wait > self.max_queue_wait:
                raise QueueFull(
                    f"{ahead} images ahead: about {wait * 1000:.0f} ms of waiting, "
                    f"limit {self.max_queue_wait * 1000:.0f} ms"
                )
        self._reserved += count

    def release(self, count: int) -> None:
        """Give back a reservation whose images will not be submitted (they failed to decode)."""
        self._reserved -= count

    def submit(
        self, images: Sequence[np.ndarray], deadline: float, reserved: bool = False
    ) -> list[asyncio.Future[Detections]]:
        """Queue one request's images; their futures, in order. Without a reservation, admits them
        first (raises QueueFull or ShuttingDown)."""
        if reserved:
            self._reserved -= len(images)
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
        else:
            self.reserve(len(images))
            self._reserved -= len(images)
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
            # Dropped: cancelled (the client went away) or past its deadline. The request counts
            # itself in detector_rejected_requests_total, once, however many images it had.
            if item.future.done():
                continue
            if now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
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
            elapsed = time.perf_counter() - started
            self.metrics.inference.observe(elapsed)
            times = getattr(detector, "batch_seconds", None)
            if times is not None:
                size = len(batch)
                times[size] = elapsed if size not in times else 0.8 * times[size] + 0.2 * elapsed
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batches.inc()
            self.metrics.images.inc(len(batch))
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
