"""The dynamic batcher alone, with a fake model whose speed and answers we control."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.artifact import Detections
from service.batcher import (
    Batcher,
    DeadlineExceeded,
    Overloaded,
    QueueFull,
    ShuttingDown,
    Stage,
)
from service.estimates import FORGET_AFTER_S, FORGET_HALF_LIFE_S, Pace
from service.metrics import Metrics


class FakeDetector:
    """Answers each image with one detection whose score is the image's first pixel / 255."""

    info = None

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def detect(self, images: np.ndarray) -> list[Detections]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(images))
        time.sleep(self.seconds)
        return [
            Detections(
                np.zeros((1, 4), np.float32),
                np.array([img[0, 0, 0] / 255], np.float32),
                np.zeros(1, np.int64),
                None,
            )
            for img in images
        ]


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


def far() -> float:
    return time.monotonic() + 60


def test_a_full_batch_leaves_at_once_and_results_keep_their_order():
    async def go():
        fake = FakeDetector()
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=10.0)
        batcher.start()
        started = time.monotonic()
        futures = batcher.submit([image(v) for v in (10, 20, 30, 40)], far())
        results = await asyncio.gather(*futures)
        assert time.monotonic() - started < 5  # did not wait for the 10 s delay
        assert [round(float(r.scores[0]) * 255) for r in results] == [10, 20, 30, 40]
        assert fake.batches == [4] and fake.threads == {"inference_0"}
        await batcher.stop(1)

    asyncio.run(go())


def test_an_idle_executor_runs_a_lone_image_at_once_and_a_request_may_span_batches():
    async def go():
        fake = FakeDetector()
        # A delay of 5 s: were the lone image to wait for company, the test would take 5 s.
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=3, max_queue_delay_s=5.0)
        batcher.start()
        started = time.monotonic()
        (alone,) = batcher.submit([image(1)], far())
        await alone
        assert time.monotonic() - started < 2
        futures = batcher.submit([image(v) for v in range(5)], far())
        results = await asyncio.gather(*futures)
        assert [round(float(r.scores[0]) * 255) for r in results] == list(range(5))
        assert fake.batches == [1, 3, 2]
        await batcher.stop(1)

    asyncio.run(go())


def test_a_batch_waits_only_for_company_known_to_be_coming():
    async def go():
        fake = FakeDetector()
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=5.0)
        batcher.start()
        async with batcher.admit(2, far()) as first, batcher.admit(1, far()) as second:
            futures = first.submit([image(1), image(2)])
            await asyncio.sleep(0.05)
            assert fake.batches == []  # one admitted image is still being decoded: wait for it
            futures += second.submit([image(3)])
        await asyncio.gather(*futures)
        assert fake.batches == [3]
        # An admitted request that gives up (its decoding failed) releases the wait at once.
        started = time.monotonic()
        async with batcher.admit(1, far()) as done, batcher.admit(1, far()):
            futures = done.submit([image(4)])
        await asyncio.gather(*futures)
        assert time.monotonic() - started < 2 and fake.batches == [3, 1]
        await batcher.stop(1)

    asyncio.run(go())


@pytest.mark.timing
def test_the_wait_for_decoding_company_is_as_long_as_decoding_or_a_batch_takes():
    async def go():
        fake = FakeDetector()
        # No configured delay, but decoding takes about 5 s: a batch waits for an image admitted
        # and still decoding rather than leave without it.
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=0.0)
        batcher.start()
        async with (
            batcher.admit(1, far(), lead_s=5.0) as first,
            batcher.admit(1, far(), lead_s=5.0) as second,
        ):
            futures = first.submit([image(1)])
            await asyncio.sleep(0.05)
            assert fake.batches == []
            futures += second.submit([image(2)])
        await asyncio.gather(*futures)
        assert fake.batches == [2]
        # Decoding that takes no time: no wait at all, the lone image leaves at once.
        async with batcher.admit(1, far(), lead_s=0.0) as first, batcher.admit(1, far(), lead_s=0.0):
            futures = first.submit([image(3)])
            await asyncio.sleep(0.05)
            assert fake.batches == [2, 1]
        await asyncio.gather(*futures)
        # Batches that take 5 s: an image left behind would wait that long for the next one, so
        # the batch waits for it, however quick its decoding was expected to be.
        batcher.calibrate(fake, {4: 5.0})  # type: ignore[arg-type]
        async with (
            batcher.admit(1, far(), lead_s=0.0) as first,
            batcher.admit(1, far(), lead_s=0.0) as second,
        ):
            futures = first.submit([image(4)])
            await asyncio.sleep(0.05)
            assert fake.batches == [2, 1]
            futures += second.submit([image(5)])
        await asyncio.gather(*futures)
        assert fake.batches == [2, 1, 2]
        await batcher.stop(1)

    asyncio.run(go())


def test_batches_grow_while_the_model_is_busy():
    async def go():
        fake = FakeDetector(seconds=0.1)
        batcher = Batcher(
            lambda: fake, Metrics().of("m"), max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=100
        )
        batcher.start()
        futures = batcher.submit([image(0)], far())
        await asyncio.sleep(0.02)  # the first batch (of 1) is running
        for _ in range(10):
            futures += batcher.submit([image(0)], far())
        await asyncio.gather(*futures)
        assert fake.batches[0] == 1 and fake.batches[1] == 8
        await batcher.stop(1)

    asyncio.run(go())


def test_cancelled_and_expired_images_are_dropped_before_inference():
    async def go():
        fake = FakeDetector(seconds=0.1)
        metrics = Metrics().of("m")
        batcher = Batcher(lambda: fake, metrics, max_batch_size=8, max_queue_delay_s=0.001)
        batcher.start()
        busy = batcher.submit([image(0)], far())
        await asyncio.sleep(0.02)
        gone = batcher.submit([image(1), image(2)], far())
        for f in gone:
            f.cancel()  # the client went away
        (late,) = batcher.submit([image(3)], time.monotonic() + 0.01)
        (kept,) = batcher.submit([image(4)], far())
        await asyncio.gather(*busy, kept)
        with pytest.raises(DeadlineExceeded):
            await late
        assert fake.batches == [1, 1]  # only the kept image ran in the second batch
        # Requests count their own rejections, once each (service/detect.py), not the batcher per image.
        assert metrics.rejected.labels("disconnected")._value.get() == 0
        await batcher.stop(1)

    asyncio.run(go())


def test_the_queue_is_bounded_and_stop_drains_it():
    async def go():
        fake = FakeDetector(seconds=0.05)
        batcher = Batcher(
            lambda: fake, Metrics().of("m"), max_batch_size=2, max_queue_delay_s=0.001, max_queue_size=4
        )
        batcher.start()
        futures = batcher.submit([image(v) for v in range(4)], far())
        with pytest.raises(QueueFull):
            batcher.submit([image(9)], far())
        await batcher.stop(5)  # finishes the queued images
        assert all(f.done() and not f.exception() for f in futures)
        with pytest.raises(ShuttingDown):
            batcher.submit([image(0)], far())

    asyncio.run(go())


class Clock:
    """Controlled time for the batcher's decisions (its waits still run on the event loop)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked() -> tuple[Clock, Batcher]:
    """A batcher on controlled time, no model, batches of up to 4 measured at warm-up as 0.05 s
    for one image and 0.1 s for four (batching is sublinear)."""
    clock = Clock()
    batcher = Batcher(lambda: None, Metrics().of("m"), max_batch_size=4, clock=clock)
    batcher.calibrate(None, {1: 0.05, 4: 0.1})  # type: ignore[arg-type]
    return clock, batcher


def test_admission_estimates_completion_from_batch_times_and_refuses_past_the_deadline():
    async def go():
        clock = Clock()
        batcher = Batcher(lambda: None, Metrics().of("m"), max_batch_size=4, max_queue_size=100, clock=clock)
        # As measured at warm-up: batching is sublinear (4 images take 0.2 s one by one, 0.1 s together).
        batcher.calibrate(None, {1: 0.05, 4: 0.1})  # type: ignore[arg-type]
        assert batcher.times.drain(9, 4) == pytest.approx(0.25)  # full batches, then the rest
        assert batcher.times.of(2) == pytest.approx(0.1)  # unmeasured: from the size below
        assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.05)
        async with batcher.admit(5, clock.now + 1.0):  # five images being decoded
            # A sixth would finish after a full batch and a batch of two: 0.2 s from now.
            assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.2)
            # Admitted with a full batch's time (0.1 s) to spare, or a quarter of the time left
            # where that is less (a short deadline on an idle service is still taken):
            batcher.check(1, clock.now + 0.3)  # 0.2 + 0.075 <= 0.3
            batcher.check(1, clock.now + 0.27)  # 0.2 + 0.0675 <= 0.27
            with pytest.raises(Overloaded, match="past its deadline") as refused:
                batcher.check(1, clock.now + 0.26)  # 0.2 + 0.065 > 0.26
            assert refused.value.retry_after == 1  # whole seconds, at least one
            async with batcher.admit(90, clock.now + 10):
                with pytest.raises(QueueFull):  # the memory bound holds whatever the deadline
                    batcher.check(6, clock.now + 60)
                assert batcher.retry_after() == 3  # 95 images: 23 x 0.1 + 0.15 s -> 3 s
        # Given back when the block ends, however it ends.
        assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.05)
        with pytest.raises(ValueError, match="submitted on a ticket for 1"):
            async with batcher.admit(1, clock.now + 1) as ticket:
                ticket.submit([image(0), image(1)])
        assert batcher.estimated_completion(0) == pytest.approx(clock.now)

    asyncio.run(go())


def test_a_learnt_lateness_that_refuses_everything_wears_off():
    async def go():
        clock, batcher = clocked()
        for _ in range(30):  # requests answered a second later than the batch times promised
            async with batcher.admit(1, clock.now + 10) as ticket:
                clock.now += 1.0
                ticket.done()
        assert batcher.lateness() > 0.8
        with pytest.raises(Overloaded):  # 300 ms is out of reach while that is remembered
            batcher.check(1, clock.now + 0.3)
        # Nothing admitted, nothing learnt: after a while the lateness halves by itself.
        learnt = batcher.lateness()
        clock.now += FORGET_AFTER_S
        assert batcher.lateness() == learnt
        clock.now += 4 * FORGET_HALF_LIFE_S
        assert batcher.lateness() == pytest.approx(learnt / 16)
        batcher.check(1, clock.now + 0.3)

    asyncio.run(go())


def test_images_that_would_now_miss_their_deadline_are_dropped_not_queued():
    async def go():
        clock, batcher = clocked()
        async with batcher.admit(1, clock.now + 0.07) as ticket:  # 0.05 s + 0.0175 to spare
            clock.now += 0.03  # decoding took 30 ms: 0.05 s of inference no longer fits
            with pytest.raises(DeadlineExceeded, match="past its deadline"):
                ticket.submit([image(0)])
        assert len(batcher) == 0

    asyncio.run(go())


def test_under_saturation_a_batch_is_cut_so_that_the_head_keeps_its_deadline():
    async def go():
        clock = Clock()
        fake = FakeDetector()
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=0, clock=clock)
        batcher.calibrate(fake, {1: 0.05, 2: 0.07, 4: 0.1})  # type: ignore[arg-type]
        # The head must be done in 0.08 s: a batch of 4 (0.1 s) would miss it, one of 2 keeps it.
        futures = batcher._enqueue([image(1)], clock.now + 0.08)
        futures += batcher._enqueue([image(2), image(3), image(4)], clock.now + 60)
        # One that can no longer make it even alone is dropped when the batch is formed.
        (late,) = batcher._enqueue([image(5)], clock.now + 60)
        batcher._queue[-1].deadline = clock.now + 0.01
        batcher.start()
        await asyncio.gather(*futures)
        with pytest.raises(DeadlineExceeded):
            await late
        assert fake.batches == [2, 2]
        await batcher.stop(1)

    asyncio.run(go())


def test_the_estimate_learns_how_late_requests_finish_without_feeding_on_itself():
    async def go():
        clock, batcher = clocked()
        for _ in range(50):  # every request takes 0.05 s longer than its batch times say
            async with batcher.admit(1, clock.now + 10) as ticket:
                pass
            clock.now += 0.05 + 0.05
            ticket.done()
        assert batcher.estimated_completion(1) - clock.now == pytest.approx(0.05 + 0.05, abs=0.005)
        for _ in range(50):  # and now on time: the correction fades, it does not stick
            async with batcher.admit(1, clock.now + 10) as ticket:
                pass
            clock.now += 0.05
            ticket.done()
        assert batcher.estimated_completion(1) - clock.now == pytest.approx(0.05, abs=0.005)

    asyncio.run(go())


def test_the_door_holds_a_place_that_the_request_s_real_count_replaces():
    async def go():
        clock = Clock()
        batcher = Batcher(lambda: None, Metrics().of("m"), max_batch_size=4, max_queue_size=100, clock=clock)
        batcher.calibrate(None, {1: 0.05, 4: 0.1})  # type: ignore[arg-type]
        due = clock.now + 0.3
        async with batcher.hold(due) as first, batcher.hold(due), batcher.hold(due), batcher.hold(due):
            # Four bodies being read: a fifth arrival at the door is behind all four (0.1 + 0.05
            # s); two more make 300 ms, the next is refused, though nothing is queued yet. (A
            # check that reserved nothing let a whole burst in at once.)
            assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.15)
            async with batcher.hold(due), batcher.hold(due):
                with pytest.raises(Overloaded):
                    batcher.check(1, due)
                # A request whose body is in is ahead of those still reading theirs: its three
                # images replace its held place, and the other bodies do not count against it.
                assert batcher.estimated_completion(3, Stage.ADMITTED) == pytest.approx(clock.now + 0.15)
                async with batcher.admit(3, due, held=first) as ticket:
                    assert first.pending == 0 and ticket.pending == 3
                    # A newcomer at the door: 3 decoding and 5 unread ahead of it, then itself.
                    assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.2 + 0.05)
            # Every place given back when its block ends, replaced or not: three bodies unread.
            assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.1)
        assert batcher.estimated_completion(1) == pytest.approx(clock.now + 0.05)

    asyncio.run(go())


def test_requests_that_expire_teach_how_late_the_estimates_are():
    async def go():
        clock, batcher = clocked()
        async with batcher.admit(1, clock.now + 0.3) as early:
            clock.now += 0.01
            early.abandoned()  # its client left before the estimate: that says nothing
        assert batcher.lateness() == 0.0
        for _ in range(30):  # each gave up 0.25 s after the batch times said it would be done
            async with batcher.admit(1, clock.now + 10) as ticket:
                clock.now += 0.3
                ticket.abandoned()
        assert batcher.lateness() == pytest.approx(0.25, abs=0.02)
        with pytest.raises(Overloaded):  # while that is remembered, 300 ms is out of reach
            batcher.check(1, clock.now + 0.3)

    asyncio.run(go())


@pytest.mark.timing
def test_a_slower_cpu_is_learnt_from_the_batches_that_show_it():
    """On a CPU busier than the warm-up's, admission must not go on admitting on the warm-up's
    batch times: the first batch that runs slower (or the running one, while it overruns) sets
    the pace of every estimate, up to four times the pace at a time; a quicker pace afterwards
    is eased into."""

    async def go():
        # Ten times the warm-up's 0.05 s per batch. (Margins for a slow or busy machine: every
        # bound below holds whether or not the batch is still running when it is checked.)
        fake = FakeDetector(seconds=0.5)
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=0)
        batcher.calibrate(fake, {n: 0.05 for n in range(1, 5)})  # type: ignore[arg-type]
        assert batcher.pace() == 1.0
        batcher.start()
        (first,) = batcher.submit([image(0)], far())
        await asyncio.sleep(0.2)  # the batch has run at least 4 times its batch time
        pace = batcher.pace()
        assert pace > 3.0 and batcher.batch_seconds(4) >= 0.05 * pace
        await first
        assert batcher.pace() == pytest.approx(Pace.MAX_STEP)  # the most one batch teaches
        await asyncio.gather(*batcher.submit([image(0)], far()))
        # The second: 0.5 s against the time the first moved to (0.06 s).
        assert batcher.pace() >= 8
        # 12 images queued would drain in 3 batches of about 0.5 s, not 3 x 0.05.
        t0 = time.monotonic()
        async with batcher.admit(12, far()):
            assert batcher.estimated_completion(0, Stage.ADMITTED) - t0 >= 3 * 0.05 * 8
            with pytest.raises(Overloaded):
                batcher.check(1, time.monotonic() + 1.0)  # a second held on the warm-up's pace
        fake.seconds = 0.01  # the CPU is free again: the pace comes down, half way per batch
        paces = []
        for _ in range(5):
            await asyncio.gather(*batcher.submit([image(0)], far()))
            paces.append(batcher.pace())
        assert paces == sorted(paces, reverse=True) and paces[0] < 6 and paces[-1] < 1.5
        await batcher.stop(1)

    asyncio.run(go())


@pytest.mark.timing
def test_one_stalled_batch_does_not_refuse_a_lone_client():
    """A batch stalled by the process (in the suite, 0.73 s against 0.013 while a full garbage
    collection held the GIL as another model loaded) is no CPU fifty times slower: taken whole
    as the pace, with the batch times' average moved by it too, it refused every request of a
    lone client with a 10 s deadline ("0 images ahead: ... about 8813 ms") for seconds."""

    async def go():
        fake = FakeDetector(seconds=0.0)
        batcher = Batcher(lambda: fake, Metrics().of("m"), max_batch_size=4, max_queue_delay_s=0)
        batcher.calibrate(fake, {n: 0.01 * n for n in range(1, 5)})  # type: ignore[arg-type]
        batcher.start()
        fake.seconds = 0.5  # fifty times the batch time, once
        await asyncio.gather(*batcher.submit([image(0)], far()))
        fake.seconds = 0.0
        assert batcher.pace() == pytest.approx(Pace.MAX_STEP)
        assert batcher.times.of(1) <= 0.01 * 1.2 + 1e-9  # moved a fifth of twice its time at most
        batcher.check(1, time.monotonic() + 0.1)  # a lone request with a tenth of a second: admitted
        for _ in range(3):  # later batches as quick as the warm-up's
            await asyncio.gather(*batcher.submit([image(0)], far()))
        assert batcher.pace() < 1.5
        await batcher.stop(1)

    asyncio.run(go())


def test_images_in_hand_queue_ahead_of_those_still_being_decoded():
    """The drop before queueing counts the queue ahead, not images admitted and still decoding
    (they will queue behind): counted, a burst on one core dropped requests (504) that made
    their deadlines once queued."""

    async def go():
        clock, batcher = clocked()
        # Two requests admitted; the second's 40 images (ten batches) are still being decoded.
        async with batcher.admit(1, clock.now + 0.2) as quick, batcher.admit(40, clock.now + 60):
            quick.submit([image(0)])  # due in 0.2 s, queued: only itself ahead of it
            assert len(batcher) == 1
            # A newcomer to be decoded is behind both.
            assert batcher.estimated_completion(1, Stage.ADMITTED) == pytest.approx(clock.now + 1.1)

    asyncio.run(go())


def test_the_lateness_is_learnt_against_the_estimate_made_when_the_images_queued():
    async def go():
        clock, batcher = clocked()
        async with batcher.admit(1, clock.now + 10) as ticket:
            clock.now += 1.0  # decoding took a second: the admission's estimate is stale
            ticket.submit([image(0)])
        clock.now += 0.05  # answered when the estimate made at queueing said
        ticket.done()
        assert batcher.lateness() == 0.0

    asyncio.run(go())


def test_a_pace_that_refuses_everything_wears_off():
    """Beside a bigger model on the shared inference thread, or after a stall, a pace can be
    learnt that refuses every request; with nothing run, nothing would unlearn it."""

    async def go():
        clock, batcher = clocked()
        for _ in range(3):  # batches that took 50 times their batch time: a pace of 4, 16, 50
            batcher._pace.learn(50.0)
        with pytest.raises(Overloaded):
            batcher.check(1, clock.now + 1.0)  # 2.5 s at that pace
        clock.now += FORGET_AFTER_S
        assert batcher.pace() == 50.0
        clock.now += 6 * FORGET_HALF_LIFE_S
        assert batcher.pace() == pytest.approx(1 + 49 / 64)
        batcher.check(1, clock.now + 1.0)
        batcher._pace.learn(1.0)  # and learning goes on from where it has faded to
        assert batcher.pace() == pytest.approx(1 + 49 / 128)

    asyncio.run(go())


@pytest.mark.timing
def test_a_batch_waiting_for_the_shared_inference_thread_is_not_timed_as_slow():
    """Models of a repository share one inference thread: a batch queued behind another model's
    is timed from when it runs, so its pace stays the model's own."""

    async def go():
        executor = ThreadPoolExecutor(max_workers=1)
        big, small = FakeDetector(seconds=0.3), FakeDetector(seconds=0.0)
        slow = Batcher(lambda: big, Metrics().of("big"), max_batch_size=1, executor=executor)
        quick = Batcher(lambda: small, Metrics().of("small"), max_batch_size=1, executor=executor)
        slow.calibrate(big, {1: 0.3})  # type: ignore[arg-type]
        quick.calibrate(small, {1: 0.01})  # type: ignore[arg-type]
        slow.start()
        quick.start()
        first = slow.submit([image(0)], far())
        await asyncio.sleep(0.05)  # the big model's batch holds the thread
        await asyncio.gather(*quick.submit([image(0)], far()), *first)
        assert quick.pace() < 5  # waited 0.25 s for the thread: 25 times its batch time
        await slow.stop(1)
        await quick.stop(1)
        executor.shutdown()

    asyncio.run(go())
