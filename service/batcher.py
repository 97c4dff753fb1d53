"""Dynamic batching with deadlines: on the event loop, inference off it (one thread).

**Continuous batching.** A request runs as soon as the executor is free: an idle service never
waits for company. While a batch runs, the images that arrive queue up and leave together as the
next batch the moment it ends, so batches grow with the load by themselves. The only wait is
for company known to be coming: when the executor is free, the queue holds less than a full batch
and other admitted images are still being decoded, the batch waits for them up to the longest
of ``max_queue_delay``, their decoding time and a full batch's time (what an image left behind
would wait for the next batch), after its oldest image was queued.

**Deadlines decide admission.** Every request carries its deadline (its arrival plus its timeout).
The batcher knows how long a batch of each size takes on the current model (measured at
warm-up by the runtime, then a moving average over the batches run: ``BatchTimes``) and how many
times that the batches take now on a slower or busier CPU (``Pace``, learnt from the first
batch that shows it), so it can tell when a newcomer would finish: after the batch running now,
then the images ahead of it (queued, being decoded, or for a body still being read, let in at the
door: ``Stage``) in full batches, then its own, after its decoding (the caller's ``lead_s``).
``admit`` refuses a request whose estimate is past its deadline, with about a batch to spare
(``Overloaded``, with the estimated drain time for ``Retry-After``) before any work is spent on
it, and counts its images in the queue from then on. ``max_queue_size`` is only a memory bound,
set high enough that deadlines decide in ordinary use.

**Every later step re-checks.** A request whose images would now finish past the deadline
is refused when it joins the queue (``Ticket.submit``), and an image whose deadline can no longer
be kept is dropped when a batch is formed (``DeadlineExceeded``, 504), as is one whose client
went away (its future cancelled). Under saturation a batch is cut short when a full one would
make the images at the head of the queue miss their deadlines while a smaller one would not.

A request's images are separate items: they may span batches, and each has its own future, so
results come back in the request's order whatever the batching.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from .artifact import Detections, Detector
from .estimates import BatchTimes, Lateness, Pace
from .metrics import ModelMetrics
from .threadnames import name_inference_thread

log = logging.getLogger(__name__)


class Stage(enum.IntEnum):
    """Where a request stands when admission estimates it: what is ahead of it (``Batcher._ahead``)."""

    QUEUED = 0  # its images join the queue now
    ADMITTED = 1  # admitted, its images to be decoded
    DOOR = 2  # let in at the door, its body still to be read


class Refused(Exception):
    """Refused at the door (503): ``retry_after`` is the estimated drain time, whole seconds >= 1."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Refused):
    """More images queued or being decoded than ``max_queue_size`` (a memory bound)."""


class Overloaded(Refused):
    """The request would finish past its deadline."""


class DeadlineExceeded(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class _Item:
    pixels: np.ndarray  # uint8 [H, W, 3]
    future: asyncio.Future[Detections]
    enqueued: float
    deadline: float


class Ticket:
    """An admitted request: its images count in the queue until submitted or the ticket ends."""

    def __init__(self, batcher: Batcher, count: int, deadline: float, estimate: float) -> None:
        self._batcher = batcher
        self.count = count
        self.deadline = deadline
        # When it was expected done without the learnt lateness (the batcher's clock): at
        # admission, then again when its images join the queue (``submit``), so that the
        # lateness learnt from it is that of the latest estimate, not of one made before its
        # decoding on what the pace was then.
        self.estimate = estimate
        self.pending = count  # admitted images not yet submitted

    def done(self) -> None:
        """The request's images have all been answered: how late the estimate was, learnt."""
        self._batcher._lateness.learn(self._batcher.clock() - self.estimate)

    def abandoned(self) -> None:
        """The request stopped unanswered (its deadline, its client gone): if the estimate has
        passed, it was at least that late, and that is learnt. Learning from answered requests
        alone learns from the quickest: in a storm of refusals, 9 of 10 admitted requests
        expired while the lateness learnt from the tenth kept admitting more of them."""
        late = self._batcher.clock() - self.estimate
        if late > 0:
            self._batcher._lateness.learn(late)

    def submit(self, images: Sequence[np.ndarray]) -> list[asyncio.Future[Detections]]:
        """Queue the decoded images; their futures, in order. Raises DeadlineExceeded when they
        would now finish past the deadline, ShuttingDown when the service is stopping."""
        if len(images) > self.pending:
            raise ValueError(f"{len(images)} images submitted on a ticket for {self.pending}")
        self.pending -= len(images)
        self._batcher._reserved -= len(images)
        futures = self._batcher._enqueue(images, self.deadline)
        self.estimate = self._batcher.clock() + self._batcher._drain_seconds(stage=Stage.QUEUED)
        return futures


class Batcher:
    def __init__(
        self,
        detector: Callable[[], Detector | None],
        metrics: ModelMetrics,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        max_queue_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._detector = detector  # read at each batch: a reload swaps it between batches
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.clock = clock
        self.times = BatchTimes()
        self._timed: Detector | None = None  # the model the times are of
        self._queue: deque[_Item] = deque()
        self._reserved = 0  # images admitted and not yet submitted (being decoded)
        self._unread = 0  # requests let in at the door whose bodies are being read (``hold``)
        self._pace = Pace(clock)
        self._lateness = Lateness(clock)
        # The batch running on the inference thread: (when it started there, its batch time).
        self._running: tuple[float, float] | None = None
        self._decode_s = 0.0  # the latest admitted request's expected decoding time (its lead_s)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # ONNX Runtime parallelises inside a run; one run at a time keeps its threads busy
        # without oversubscribing the cores. A repository's models share one such thread.
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference", initializer=name_inference_thread
        )

    def __len__(self) -> int:
        return len(self._queue)

    def calibrate(self, detector: Detector, seconds: dict[int, float]) -> None:
        """A newly loaded model and its warm-up's seconds per batch size (the runtime's hook)."""
        self._timed = detector
        self.times.reset(seconds)
        self._pace.reset()  # the warm-up ran on the CPU as it is now

    # --- Estimates and admission ------------------------------------------------------------

    def _ahead(self, stage: Stage) -> int:
        """Images ahead of a newcomer at ``stage``: queued; for one still to be decoded, also
        the images admitted before it and being decoded; for one whose body is still to be
        read, also one for each request let in at the door before it. Images in hand join the
        queue ahead of everything still being decoded or read."""
        ahead = len(self._queue)
        if stage >= Stage.ADMITTED:
            ahead += self._reserved
        if stage >= Stage.DOOR:
            ahead += self._unread
        return ahead

    def pace(self) -> float:
        """How many times their batch times batches take now: the learnt pace, or the running
        batch's, if it has already overrun by more (``Pace.showing``)."""
        return self._pace_and_running()[0]

    def _pace_and_running(self) -> tuple[float, float]:
        """The pace now, and the seconds the running batch has left at that pace (0 for none),
        from one read of it (the inference thread sets and clears it)."""
        factor = self._pace.factor()
        running = self._running
        if running is None:
            return factor, 0.0
        started, expected = running
        now = self.clock()
        if expected > 0:
            factor = self._pace.showing((now - started) / expected)
        return factor, max(0.0, started + expected * factor - now)

    def batch_seconds(self, size: int) -> float:
        """One batch of ``size`` now: its batch time at the current pace."""
        return self.times.of(size) * self.pace()

    def _drain_seconds(self, extra: int = 0, stage: Stage = Stage.DOOR) -> float:
        """Seconds from now until the running batch, the images ahead (``_ahead``) and ``extra``
        more images have run, at the current pace."""
        pace, running = self._pace_and_running()
        return running + self.times.drain(self._ahead(stage) + extra, self.max_batch_size) * pace

    def estimated_completion(self, count: int, stage: Stage = Stage.DOOR) -> float:
        """When ``count`` images admitted now at ``stage`` would be done (the clock's time): from
        the batch times at the current pace, plus how late such estimates have recently been
        (the event loop's own delays are in no batch time)."""
        return self.clock() + self._drain_seconds(count, stage) + self.lateness()

    def lateness(self) -> float:
        """How late estimates at the current pace have recently been all the same."""
        return self._lateness.seconds()

    def retry_after(self) -> int:
        """Whole seconds until the work ahead has drained: at least 1."""
        return max(1, math.ceil(self._drain_seconds()))

    def check(self, count: int, deadline: float, lead_s: float = 0.0, stage: Stage = Stage.DOOR) -> None:
        """Would ``count`` images admitted now at ``stage``, queued after ``lead_s`` (their
        decoding), make ``deadline``? Raises Overloaded, QueueFull or ShuttingDown; reserves
        nothing."""
        if self._stopping:
            raise ShuttingDown("the service is shutting down")
        ahead = self._ahead(stage)
        if ahead + count > self.max_queue_size:
            raise QueueFull(
                f"{ahead} images queued or decoding, limit {self.max_queue_size}", self.retry_after()
            )
        finish = self.estimated_completion(count, stage) + lead_s
        # The estimate is good to about a batch (which batch the images join, the running one's
        # end, their decoding): admit with that much to spare, but never more than a quarter of
        # the time left, so that a short deadline on an idle service is still taken. Without
        # it, under overload every admitted request was due just at its deadline and a third of
        # them missed it (504s).
        now = self.clock()
        slack = min(self.batch_seconds(self.max_batch_size), 0.25 * max(0.0, deadline - now))
        if finish + slack > deadline:
            raise Overloaded(
                f"{ahead} images ahead: the request would finish in about "
                f"{(finish - now) * 1000:.0f} ms, too close to or past its deadline in "
                f"{max(0.0, deadline - now) * 1000:.0f} ms",
                self.retry_after(),
            )

    @asynccontextmanager
    async def admit(
        self, count: int, deadline: float, lead_s: float = 0.0, held: Ticket | None = None
    ) -> AsyncIterator[Ticket]:
        """Admit ``count`` images due by ``deadline`` (``check``'s refusals), counted as queued
        from now until submitted; those never submitted (decoding failed, the client left) are
        given back when the block ends. ``held``: the same request's admission at the door (one
        image, held while its body was read), replaced by this one: it is given back before the
        check, so that the request does not count itself ahead of itself."""
        if held is not None:
            self._unread -= held.pending
            held.pending = 0
        self.check(count, deadline, lead_s, Stage.ADMITTED)
        self._decode_s = lead_s
        raw = self.clock() + self._drain_seconds(count, Stage.ADMITTED) + lead_s  # without the lateness
        ticket = Ticket(self, count, deadline, raw)
        self._reserved += count
        try:
            yield ticket
        finally:
            self._reserved -= ticket.pending
            ticket.pending = 0
            self._wake.set()  # a batch waiting for these images need not wait any more

    @asynccontextmanager
    async def hold(self, deadline: float, lead_s: float = 0.0) -> AsyncIterator[Ticket]:
        """The door's admission, before a request's body is read: one image's worth (``check``'s
        refusals), counted ahead of every later arrival at the door until ``admit(...,
        held=ticket)`` replaces it with the request's real count, or the block ends. Without it,
        every request of a burst saw the same empty queue at the door and was let in."""
        self.check(1, deadline, lead_s)
        ticket = Ticket(self, 1, deadline, 0.0)
        self._unread += 1
        try:
            yield ticket
        finally:
            self._unread -= ticket.pending
            ticket.pending = 0

    def _enqueue(self, images: Sequence[np.ndarray], deadline: float) -> list[asyncio.Future[Detections]]:
        if self._stopping:
            raise ShuttingDown("the service is shutting down")
        # The queue plus these, from now: past the deadline, no point in queueing them. (Images
        # still being decoded are not ahead of these: counted, they dropped requests that would
        # have made their deadlines, on one core 16-54 of 600 in a 10x overload: "A slower
        # machine" in docs/benchmarks-history.md.)
        if self.times and self.estimated_completion(len(images), Stage.QUEUED) > deadline:
            raise DeadlineExceeded("the request would finish past its deadline: dropped before inference")
        loop = asyncio.get_running_loop()
        now = self.clock()
        futures = []
        for pixels in images:
            future: asyncio.Future[Detections] = loop.create_future()
            self._queue.append(_Item(pixels, future, now, deadline))
            futures.append(future)
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.set()
        return futures

    def submit(self, images: Sequence[np.ndarray], deadline: float) -> list[asyncio.Future[Detections]]:
        """Admit and queue in one step (for callers with decoded images in hand)."""
        self.check(len(images), deadline, stage=Stage.QUEUED)
        return self._enqueue(images, deadline)

    # --- The loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

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
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def _wait_for_company(self) -> None:
        """The executor is free: wait only while admitted images are still on their way and the
        batch is not full, at most until the oldest queued image has waited the longest of the
        delay, the decoding time and a full batch's time."""
        while (
            self._queue
            and self._reserved > 0
            and len(self._queue) < self.max_batch_size
            and not self._stopping
        ):
            # The company is coming once decoded, and an image left behind would wait a whole
            # batch for the next one: wait up to a full batch's time or the decoding time, at
            # least the configured delay. Decode threads run below inference, so decoding ends
            # late while a batch runs; bounded by the decoding time alone, batches of 4 left at
            # 8 clients and the p99 was 122-132 ms against 95-104 with a full batch's time
            # (docs/benchmarks-history.md, "Scheduling and deadlines").
            wait = max(self.max_delay, self._decode_s, self.batch_seconds(self.max_batch_size))
            remaining = self._queue[0].enqueued + wait - self.clock()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        """The next batch: live images from the head of the queue, as many as fit the batch size
        and the deadlines of those taken."""
        now = self.clock()
        pace = self.pace()
        batch: list[_Item] = []
        due = math.inf  # the earliest deadline in the batch
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue[0]
            if item.future.done():  # cancelled: the client went away (the request counts it)
                self._queue.popleft()
                continue
            if now + self.times.of(1) * pace > item.deadline:  # cannot make it even alone
                self._queue.popleft()
                item.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
                continue
            # One more image must not make the batch miss a deadline it would keep without it.
            if batch and now + self.times.of(len(batch) + 1) * pace > min(due, item.deadline):
                break
            self._queue.popleft()
            batch.append(item)
            due = min(due, item.deadline)
            self.metrics.queue_wait.observe(now - item.enqueued)
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _inference(
        self, detector: Detector, images: list[np.ndarray], expected: float
    ) -> tuple[list[Detections], float]:
        """One batch, on the inference thread: its detections and how long it ran, timed from
        when it started there. (Timed from the event loop, a batch waiting for another model's
        on the shared thread counted that wait as its own: beside an SSD300, a model's pace went
        to 50 and refused all of its requests.)"""
        started = time.perf_counter()
        self._running = (self.clock(), expected)
        try:
            # Stacked here, not on the event loop: a batch of 8 images of 320x320 is 2.4 MB to
            # copy, 0.7 ms of the loop's CPU per batch on two cores.
            return detector.detect(np.stack(images)), time.perf_counter() - started
        finally:
            self._running = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._wait_for_company()
            batch = self._take()
            if not batch:
                continue
            detector = self._detector()
            if detector is None:
                for item in batch:
                    item.future.set_exception(ShuttingDown("no model is loaded"))
                continue
            expected = self.times.of(len(batch))
            try:
                results, elapsed = await loop.run_in_executor(
                    self._executor, self._inference, detector, [item.pixels for item in batch], expected
                )
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.metrics.inference.observe(elapsed)
            if detector is self._timed:  # not a batch of the model a reload just replaced
                if expected > 0:
                    self._pace.learn(elapsed / expected)
                self.times.record(len(batch), elapsed)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batches.inc()
            self.metrics.images.inc(len(batch))
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
