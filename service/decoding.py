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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .images import Decoded, ImageTooLarge, Opened, Rect, finish, open_image, oriented_size, tile_cost
from .memory import release_free_memory
from .metrics import Metrics
from .threadnames import DECODE, name_this_thread

MB = 1024 * 1024


# A decoding this large leaves enough freed heap behind to be worth handing back at once.
TRIM_ABOVE = 64 * MB


# How much lower a decode thread's priority is than the rest of the process (Linux nice steps).
DECODE_NICE = 5


def _yield_to_inference() -> None:
    """Run in each decode thread as it starts: lower its scheduling priority.

    At saturation inference is the bottleneck, and a batch is only as fast as ONNX Runtime's
    slowest intra-op thread. Four decode threads at equal priority took most of two cores from
    it; below it they fill the time inference leaves. Not too far below: a decode thread that is
    descheduled while it holds the GIL stalls the event loop until it runs again. On 2 cores, +5
    kept the images/s of +10 (5-12% above +0 at 16-64 clients) with the refusals' p99 under 2x
    overload at 23 ms instead of 38.5 (docs/benchmarks-history.md, "Scheduling and deadlines").
    Linux only: there setpriority on a thread id applies to that thread alone.
    """
    name_this_thread(DECODE)
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox that forbids it: decoding still works
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + DECODE_NICE)


class DecodeBudget:
    """A first-come-first-served semaphore over bytes, taken on the event loop (``acquire``, a
    wait) or in a decode thread (``try_take``, never a wait) and released from either. A request
    for more than the whole budget is granted the whole budget (it decodes alone) rather than
    never.

    Thread-safe so that a decode thread takes an image's bytes itself: an image whose bytes are
    free goes from its header to its pixels in one trip to the thread, one wake-up of the event
    loop instead of three (open, finish, release), which cost 0.1-0.2 ms of its CPU per image."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._lock = threading.Lock()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the waiters' loop

    def try_take(self, cost: int) -> int | None:
        """``cost`` bytes (at most the whole budget) where they are free and nobody waits, from
        any thread; None otherwise (then ``acquire`` on the loop waits in turn)."""
        cost = max(0, min(cost, self.total))
        with self._lock:
            if self._waiters or self.available < cost:
                return None
            self.available -= cost
            return cost

    async def acquire(self, cost: int) -> int:
        """Wait for ``cost`` bytes (at most the whole budget); the amount granted, to release."""
        cost = max(0, min(cost, self.total))
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self.available >= cost:
                self.available -= cost
                return cost
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((cost, waiter))
            self._loop = loop
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(cost)  # granted just as the wait was cancelled
            else:
                with self._lock, contextlib.suppress(ValueError):  # _grant may have passed it over
                    self._waiters.remove((cost, waiter))
                self._grant()  # the head may have been this waiter
            raise
        return cost

    def release(self, granted: int) -> None:
        """Give ``granted`` bytes back, from any thread; waiters are granted on their loop."""
        with self._lock:
            self.available += granted
            loop = self._loop if self._waiters else None
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._grant()
        else:
            # A closed loop (shutdown) raises RuntimeError: nothing waits for the budget any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._grant)

    def _grant(self) -> None:
        # Strictly in order: a large image at the head is not overtaken for ever by small ones.
        granted = []
        with self._lock:
            while self._waiters and self._waiters[0][0] <= self.available:
                cost, waiter = self._waiters.popleft()
                if waiter.done():  # cancelled, not yet removed by its own task
                    continue
                self.available -= cost
                granted.append(waiter)
        for waiter in granted:
            waiter.set_result(None)


@dataclass
class _Trip:
    """What one trip to a decode thread brought back: the pixels, or the header alone where the
    budget had no room (or the image is over it), and the seconds it took in the thread."""

    seconds: float
    decoded: Decoded | None = None
    opened: Opened | None = None


class Decoder:
    """The decode threads and the budget they share, for every request of one app."""

    def __init__(self, threads: int, budget_bytes: int, max_pixels: int, metrics: Metrics) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=_yield_to_inference)
        self.threads = threads
        self.budget = DecodeBudget(budget_bytes)
        self.max_pixels = max_pixels
        self.metrics = metrics
        self._work_s = 0.0  # recent seconds of one image's decoding in its thread (moving average)
        self._in_flight = 0  # images being decoded or waiting for a thread or the budget

    @property
    def typical_seconds(self) -> float:
        """How long an image handed over now would take to decode: its own decoding after the
        images ahead of it, on ``threads`` threads. Admission counts it before a request's images
        can join the queue. From the images in flight now, not from how long recent ones waited:
        an average of waits is never unlearnt when nothing is decoded, and after a storm of
        refusals it refused every request, for good (64 clients retrying each 503 at once)."""
        return self._work_s * (1 + self._in_flight // self.threads)

    async def decode(self, data: bytes, input_size: tuple[int, int], rects: Sequence[Rect] = ()) -> Decoded:
        """Encoded bytes -> pixels at ``input_size``, and each tile of ``rects`` (cut from the
        image at full resolution) at it too. Raises images.ImageError (4xx)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._in_flight += 1
        try:
            return await self._decode(loop, data, input_size, tuple(rects))
        finally:
            self._in_flight -= 1
            self.metrics.preprocess.observe(time.perf_counter() - started)

    async def size(self, data: bytes) -> tuple[int, int]:
        """The image's size after EXIF orientation, from its header (in a decode thread). Raises
        images.ImageError (4xx), as decoding it would."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, oriented_size, data, self.max_pixels)

    async def _decode(
        self,
        loop: asyncio.AbstractEventLoop,
        data: bytes,
        input_size: tuple[int, int],
        rects: tuple[Rect, ...],
    ) -> Decoded:
        trip = await loop.run_in_executor(self.pool, self._whole, data, input_size, rects)
        if trip.decoded is not None:
            self._learn(trip.seconds)
            return trip.decoded
        opened = trip.opened
        assert opened is not None
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
        # Released in the thread when decoding really ends: a request that gives up cannot free
        # memory a thread still uses.
        rest = await loop.run_in_executor(self.pool, self._finish, opened, input_size, granted, rects)
        self._learn(trip.seconds + rest.seconds)
        assert rest.decoded is not None
        return rest.decoded

    def _learn(self, seconds: float) -> None:
        self._work_s = 0.9 * self._work_s + 0.1 * seconds

    def _whole(self, data: bytes, input_size: tuple[int, int], rects: tuple[Rect, ...]) -> _Trip:
        """In a decode thread: the header, then the pixels too where the budget has room now.
        A tiled image is read at full resolution (no JPEG draft), and costs its tiles too."""
        started = time.perf_counter()
        opened = open_image(data, input_size, self.max_pixels, draft=not rects)
        opened.cost += tile_cost(rects, input_size)
        granted = self.budget.try_take(opened.cost) if opened.cost <= self.budget.total else None
        if granted is None:
            return _Trip(time.perf_counter() - started, opened=opened)
        return self._finish(opened, input_size, granted, rects, started)

    def _finish(
        self,
        opened: Opened,
        input_size: tuple[int, int],
        granted: int,
        rects: tuple[Rect, ...] = (),
        started: float | None = None,
    ) -> _Trip:
        """In a decode thread: the pixels of ``opened``, its ``granted`` bytes released after."""
        started = time.perf_counter() if started is None else started
        try:
            decoded = finish(opened, input_size, self.max_pixels, rects)
        finally:
            if opened.cost > TRIM_ABOVE:
                release_free_memory()
            self.budget.release(granted)
        return _Trip(time.perf_counter() - started, decoded=decoded)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
