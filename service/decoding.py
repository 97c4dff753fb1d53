"""Decoding uploads off the event loop, within a process-wide memory budget.

An image is decoded in two steps (service/images.py): its header is read (format, size, the
estimated peak bytes of decoding it), then, once that many bytes of the budget are free, its
pixels. Four decode threads on 40-megapixel images would pass a gigabyte at once; with the
budget, large images wait their turn (first come, first served) while small ones go on, and the
memory decoding can take is the budget, whatever the clients send: an image whose decoding alone
would pass the budget (a WebP near the pixel limit takes 16 bytes per pixel) is refused, 413.

The budget is released when the decoding thread is done, not when the request stops waiting for
it: a request that gives up (deadline, disconnect) cannot free memory a thread still uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from .images import Decoded, ImageTooLarge, Opened, finish, open_image
from .memory import release_free_memory
from .metrics import Metrics

MB = 1024 * 1024


# A decoding this large leaves enough freed heap behind to be worth handing back at once.
TRIM_ABOVE = 64 * MB


def _finish(opened: Opened, input_size: tuple[int, int], max_pixels: int) -> Decoded:
    try:
        return finish(opened, input_size, max_pixels)
    finally:
        if opened.cost > TRIM_ABOVE:
            release_free_memory()


# How much lower a decode thread's priority is than the rest of the process (Linux nice steps).
DECODE_NICE = 5


def _yield_to_inference() -> None:
    """Run in each decode thread as it starts: lower its scheduling priority.

    At saturation inference is the bottleneck, and a batch is only as fast as ONNX Runtime's
    slowest intra-op thread. Four decode threads at equal priority took most of two cores from
    it; below it they fill the time inference leaves. Not too far below: a decode thread that is
    descheduled while it holds the GIL stalls the event loop until it runs again. Measured on 2
    cores (docs/benchmarks.md "Scheduling"): nice +10 gave +5-12% images/s at 16-64 clients
    over +0, and +5 did as well or better than +10 with a lower p99 (116.7 against 120.9 ms at 8
    clients, 379.8 against 391.6 at 32), and refusals under 2x overload answered in 23 ms at
    the p99 against 38.5 ms with +10.
    Linux only: there setpriority on a thread id applies to that thread alone.
    """
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: decoding still works
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + DECODE_NICE)


class DecodeBudget:
    """A first-come-first-served semaphore over bytes. A request for more than the whole budget
    is granted the whole budget (it decodes alone) rather than never."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, cost: int) -> int:
        """Wait for ``cost`` bytes (at most the whole budget); the amount granted, to release."""
        cost = max(0, min(cost, self.total))
        if not self._waiters and self.available >= cost:
            self.available -= cost
            return cost
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(cost)  # granted just as the wait was cancelled
            else:
                self._waiters.remove((cost, waiter))
                self._grant()  # the head may have been this waiter
            raise
        return cost

    def release(self, granted: int) -> None:
        self.available += granted
        self._grant()

    def _grant(self) -> None:
        # Strictly in order: a large image at the head is not overtaken for ever by small ones.
        while self._waiters and self._waiters[0][0] <= self.available:
            cost, waiter = self._waiters.popleft()
            self.available -= cost
            waiter.set_result(None)


class Decoder:
    """The decode threads and the budget they share, for every request of one app."""

    def __init__(self, threads: int, budget_bytes: int, max_pixels: int, metrics: Metrics) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=_yield_to_inference)
        self.budget = DecodeBudget(budget_bytes)
        self.max_pixels = max_pixels
        self.metrics = metrics
        # Recent seconds from an image's bytes to its pixels, waits included (a moving average):
        # admission counts it before a request's images can join the queue.
        self.typical_seconds = 0.0

    async def decode(self, data: bytes, input_size: tuple[int, int]) -> Decoded:
        """Encoded bytes -> pixels at ``input_size``. Raises images.ImageError (4xx)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        opened: Opened = await loop.run_in_executor(self.pool, open_image, data, input_size, self.max_pixels)
        if opened.cost > self.budget.total:
            opened.close()
            raise ImageTooLarge(
                f"decoding this {opened.width}x{opened.height} {opened.format} would take about "
                f"{opened.cost / MB:.0f} MB, more than the decode budget of {self.budget.total / MB:.0f} MB "
                "(SSD_DECODE_BUDGET_MB)"
            )
        try:
            granted = await self.budget.acquire(opened.cost)
        except BaseException:  # the request gave up (deadline, disconnect) before its turn
            opened.close()
            raise
        work: Future[Decoded] = self.pool.submit(_finish, opened, input_size, self.max_pixels)

        def release(_: Future[Decoded]) -> None:  # in the thread, when decoding really ends
            # A closed loop (shutdown) raises RuntimeError: nothing waits for the budget any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.budget.release, granted)

        work.add_done_callback(release)
        try:
            decoded = await asyncio.wrap_future(work, loop=loop)
        finally:
            self.metrics.preprocess.observe(time.perf_counter() - started)
        self.typical_seconds = 0.9 * self.typical_seconds + 0.1 * (time.perf_counter() - started)
        return decoded

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
