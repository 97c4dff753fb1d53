"""Request bodies read as they stream in (service/uploads.py): limits applied at the byte or part
that passes them, truncated and malformed bodies refused, disconnects surfaced; and the decode
budget (service/decoding.py) that bounds decoding memory."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable

import pytest
from starlette.requests import ClientDisconnect, Request

from service.budget import RequestBudget
from service.decoding import DecodeBudget
from service.errors import APIError
from service.uploads import MAX_FIELDS, Body, Limits, read_uploads

BOUNDARY = "xYzZy"
LIMITS = Limits(image_bytes=1000, images=3, request_bytes=1 << 20)


async def read_uploads_held(request, limits: Limits = LIMITS, budget: int = 1 << 20):
    """read_uploads with a budget of its own, checked to hold every byte it read."""
    held = RequestBudget(budget).reservation()
    uploads = await read_uploads(request, limits, Body(held, None))
    assert held.held >= sum(len(u.data) for u in uploads)
    return uploads


def part(name: str, data: bytes, filename: str | None = "a.jpg") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
    )


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


class Stream:
    """An ASGI receive() that hands out ``chunks`` and then, optionally, a disconnect."""

    def __init__(self, chunks: Iterable[bytes], disconnect: bool = False) -> None:
        self.chunks = list(chunks)
        self.disconnect = disconnect
        self.served = 0  # bytes handed out: how far the reader read

    async def __call__(self) -> dict:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.served += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.disconnect}
        if self.disconnect:
            return {"type": "http.disconnect"}
        raise AssertionError("read past the end of the body")


def request(stream: Stream, content_type: str, length: int | None = None) -> Request:
    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return Request({"type": "http", "method": "POST", "path": "/detect", "headers": headers}, stream)


def read(data: bytes | list[bytes], content_type: str = f"multipart/form-data; boundary={BOUNDARY}", **kw):
    chunks = [data[i : i + 64] for i in range(0, len(data), 64)] if isinstance(data, bytes) else data
    stream = Stream(chunks, kw.pop("disconnect", False))
    return stream, asyncio.run(read_uploads_held(request(stream, content_type, kw.pop("length", None))))


def refused(data: bytes, status: int, code: str, **kw) -> tuple[Stream, APIError]:
    stream = Stream([data[i : i + 64] for i in range(0, len(data), 64)], kw.pop("disconnect", False))
    content_type = kw.pop("content_type", f"multipart/form-data; boundary={BOUNDARY}")
    with pytest.raises(APIError) as caught:
        asyncio.run(read_uploads_held(request(stream, content_type, kw.pop("length", None))))
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return stream, caught.value


def test_file_parts_in_order_other_fields_dropped():
    _, uploads = read(body(part("file", b"one"), part("note", b"hi", None), part("file", b"two", "b.png")))
    assert [(u.filename, u.data) for u in uploads] == [("a.jpg", b"one"), ("b.png", b"two")]


def test_an_oversized_part_is_refused_as_it_grows_not_after():
    data = body(part("file", b"x" * 50_000))
    stream, error = refused(data, 413, "payload_too_large")
    assert "a.jpg" in error.message
    assert stream.served < 2000  # stopped a chunk or so past the 1000-byte limit, not at 50 kB


@pytest.mark.parametrize("count", [4, 5, 100])
def test_too_many_images_is_413_however_many_are_sent(count):
    data = body(*(part("file", b"img") for _ in range(count)))
    stream, _ = refused(data, 413, "too_many_images")
    assert stream.served < len(part("file", b"img")) * 4 + 128  # refused at the fourth part


def test_too_many_fields_and_field_bytes_are_bounded():
    refused(body(*(part(f"f{i}", b"v", None) for i in range(MAX_FIELDS + 1))), 400, "bad_request")
    refused(body(part("note", b"v" * 70_000, None)), 413, "payload_too_large")


def test_truncated_and_malformed_multipart_is_400():
    whole = body(part("file", b"abc"))
    _, error = refused(whole[:-10], 400, "bad_request")
    assert "truncated" in error.message
    refused(b"this is not multipart at all", 400, "bad_request")
    refused(whole, 400, "bad_request", content_type="multipart/form-data")  # no boundary


def test_missing_or_text_file_part_is_422():
    refused(body(part("other", b"abc")), 422, "invalid_parameters")
    refused(body(part("file", b"abc", None)), 422, "invalid_parameters")


def test_declared_length_over_the_limit_is_refused_before_reading():
    stream, _ = refused(b"x" * 10, 413, "payload_too_large", content_type="image/jpeg", length=5000)
    assert stream.served == 0
    stream, _ = refused(body(part("file", b"a")), 413, "payload_too_large", length=10**9)
    assert stream.served == 0


def test_raw_body_limit_and_type():
    _, uploads = read([b"ab", b"cd"], "image/jpeg")
    assert uploads[0].data == b"abcd" and uploads[0].filename is None
    stream, _ = refused(b"x" * 5000, 413, "payload_too_large", content_type="image/png")
    assert stream.served < 1100
    refused(b"hello", 415, "unsupported_media_type", content_type="text/plain")


def test_a_client_leaving_mid_body_is_a_disconnect_not_an_error():
    with pytest.raises(ClientDisconnect):
        read(body(part("file", b"abc"))[:40], disconnect=True)
    with pytest.raises(ClientDisconnect):
        read([b"\xff\xd8"], "image/jpeg", disconnect=True)


def test_decode_budget_is_first_come_first_served_and_cancellable():
    async def go():
        budget = DecodeBudget(100)
        order: list[str] = []
        big_first = await budget.acquire(80)
        assert budget.available == 20

        async def take(name: str, cost: int) -> int:
            granted = await budget.acquire(cost)
            order.append(name)
            return granted

        large = asyncio.ensure_future(take("large", 60))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 10))  # fits, but waits behind the large one
        gone = asyncio.ensure_future(take("gone", 10))
        await asyncio.sleep(0.01)
        assert order == []
        gone.cancel()
        await asyncio.sleep(0.01)
        budget.release(big_first)
        assert await large == 60 and await small == 10
        assert order == ["large", "small"] and budget.available == 30
        # More than the whole budget: granted all of it, alone.
        budget.release(60)
        budget.release(10)
        assert await budget.acquire(10**9) == 100 and budget.available == 0

    asyncio.run(go())


def test_decode_threads_take_the_budget_themselves_and_wake_waiters_on_the_loop():
    """A decode thread takes an image's bytes without the loop (``try_take``) only when they are
    free and nobody waits; a release from a thread grants the loop's waiters in order."""
    import threading

    async def go():
        budget = DecodeBudget(100)
        in_thread: list[int | None] = []
        worker = threading.Thread(target=lambda: in_thread.append(budget.try_take(70)))
        worker.start()
        worker.join()
        assert in_thread == [70] and budget.available == 30
        waiting = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert budget.try_take(10) is None  # free, but someone waits: no overtaking
        releaser = threading.Thread(target=budget.release, args=(70,))
        releaser.start()
        releaser.join()
        assert await asyncio.wait_for(waiting, 1) == 50 and budget.available == 50
        assert budget.try_take(10**9) is None  # more than is free
        assert budget.try_take(50) == 50 and budget.available == 0

    asyncio.run(go())


def test_an_image_whose_decoding_alone_would_pass_the_budget_is_413():
    import io

    from PIL import Image

    from service.decoding import Decoder
    from service.images import ImageTooLarge
    from service.metrics import Metrics

    out = io.BytesIO()
    Image.new("RGB", (1000, 1000), (200, 30, 30)).save(out, "PNG")

    async def go():
        decoder = Decoder(1, 1024 * 1024, 40_000_000, Metrics())
        try:
            with pytest.raises(ImageTooLarge, match="decode budget of 1 MB"):
                await decoder.decode(out.getvalue(), (32, 32))
            assert decoder.budget.available == decoder.budget.total
            roomy = Decoder(1, 64 * 1024 * 1024, 40_000_000, Metrics())
            decoded = await roomy.decode(out.getvalue(), (32, 32))
            assert decoded.pixels.shape == (32, 32, 3) and (decoded.width, decoded.height) == (1000, 1000)
            await asyncio.sleep(0.01)  # the budget comes back from the thread's side
            assert roomy.budget.available == roomy.budget.total
            roomy.shutdown()
        finally:
            decoder.shutdown()

    asyncio.run(go())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_decode_threads_run_below_the_rest_of_the_process():
    # Inference is the bottleneck at saturation: decoding must fill the time it leaves, not take
    # its cores (service/decoding.py, _yield_to_inference).
    import os
    import threading

    from service.decoding import DECODE_NICE, Decoder
    from service.metrics import Metrics

    decoder = Decoder(2, 1024 * 1024, 40_000_000, Metrics())
    try:
        here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        there = decoder.pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        assert there.result(timeout=10) == min(here + DECODE_NICE, 19)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # the caller's is unchanged
    finally:
        decoder.shutdown()


@pytest.mark.timing
def test_the_decoding_estimate_comes_from_the_images_in_flight_not_from_past_waits():
    # Admission counts an image's decoding time before it can queue (Decoder.typical_seconds).
    # An average of past waits was never unlearnt once nothing was decoded, and after a storm of
    # refusals it refused every request, for good.
    import io
    import threading

    from PIL import Image

    from service.decoding import Decoder
    from service.metrics import Metrics

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 120, 30)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()

    async def go() -> None:
        decoder = Decoder(2, 64 * 1024 * 1024, 40_000_000, Metrics())
        try:
            assert decoder.typical_seconds == 0.0  # nothing measured yet
            await decoder.decode(jpeg, (320, 320))
            alone = decoder.typical_seconds
            assert 0 < alone < 1
            # Both threads held up: images waiting behind them make a newcomer's estimate
            # longer, and it falls back once they are through.
            gate = threading.Event()
            blockers = [decoder.pool.submit(gate.wait) for _ in range(2)]
            waiting = [asyncio.ensure_future(decoder.decode(jpeg, (320, 320))) for _ in range(4)]
            await asyncio.sleep(0.05)
            assert decoder.typical_seconds == pytest.approx(3 * alone)  # 4 in flight on 2 threads
            gate.set()
            await asyncio.gather(*waiting)
            assert all(b.done() for b in blockers)
            # The waits were not learnt as decoding time.
            assert decoder.typical_seconds < 1.5 * alone + 0.01
        finally:
            decoder.shutdown()

    asyncio.run(go())
