"""The dynamic batcher alone, with a fake model whose speed and answers we control."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.artifact import Detections
from service.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
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
        batcher = Batcher(lambda: fake, Metrics(), max_batch_size=4, max_queue_delay_s=10.0)
        batcher.start()
        started = time.monotonic()
        futures = batcher.submit([image(v) for v in (10, 20, 30, 40)], far())
        results = await asyncio.gather(*futures)
        assert time.monotonic() - started < 5  # did not wait for the 10 s delay
        assert [round(float(r.scores[0]) * 255) for r in results] == [10, 20, 30, 40]
        assert fake.batches == [4] and fake.threads == {"inference_0"}
        await batcher.stop(1)

    asyncio.run(go())


def test_a_lone_image_waits_the_delay_and_a_request_may_span_batches():
    async def go():
        fake = FakeDetector()
        batcher = Batcher(lambda: fake, Metrics(), max_batch_size=3, max_queue_delay_s=0.05)
        batcher.start()
        started = time.monotonic()
        (alone,) = batcher.submit([image(1)], far())
        await alone
        assert 0.04 <= time.monotonic() - started < 2
        futures = batcher.submit([image(v) for v in range(5)], far())
        results = await asyncio.gather(*futures)
        assert [round(float(r.scores[0]) * 255) for r in results] == list(range(5))
        assert fake.batches == [1, 3, 2]
        await batcher.stop(1)

    asyncio.run(go())


def test_batches_grow_while_the_model_is_busy():
    async def go():
        fake = FakeDetector(seconds=0.1)
        batcher = Batcher(
            lambda: fake, Metrics(), max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=100
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
        metrics = Metrics()
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
            lambda: fake, Metrics(), max_batch_size=2, max_queue_delay_s=0.001, max_queue_size=4
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


def test_admission_counts_images_still_decoding_and_bounds_the_wait_in_time():
    async def go():
        fake = FakeDetector(seconds=0.05)
        # As measured at warm-up: batching is sublinear (4 images take 0.2 s one by one, 0.1 s together).
        fake.batch_seconds = {1: 0.05, 4: 0.1}
        batcher = Batcher(
            lambda: fake,
            Metrics(),
            max_batch_size=4,
            max_queue_delay_s=0.001,
            max_queue_size=100,
            max_queue_wait_s=0.22,
        )
        # The queue ahead runs as full batches, then the rest: 9 images = 2 x 0.1 + 0.05 s.
        assert batcher.estimated_wait(9) == pytest.approx(0.25)
        assert batcher.estimated_wait(2) == pytest.approx(0.1)  # unmeasured: from the size below
        assert batcher.estimated_wait(0) == 0.0
        batcher.reserve(5)  # five images being decoded; the fifth waits for four: 0.1 s
        with pytest.raises(QueueFull, match=r"5 images ahead: about 250 ms of waiting, limit 220 ms"):
            batcher.reserve(5)  # its last image would wait for nine: 0.25 s
        batcher.reserve(4)  # its last waits for eight, 0.2 s: within the limit
        batcher.release(4)  # their decoding failed
        batcher.start()
        futures = batcher.submit([image(v) for v in (3, 4, 5, 6, 7)], far(), reserved=True)
        assert [round(float(r.scores[0]) * 255) for r in await asyncio.gather(*futures)] == [3, 4, 5, 6, 7]
        # The batches run update the times: a batch of 4 took ~0.05 s here, not 0.1.
        assert fake.batch_seconds[4] < 0.1
        batcher.reserve(9)  # the queue drained: room again (eight ahead of the last)
        batcher.release(9)
        await batcher.stop(5)

    asyncio.run(go())
