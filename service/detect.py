"""``POST /detect``: read the images, decode them in a thread pool, queue them for the batcher,
answer with the contract's JSON."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from .artifact import Detections, ModelInfo
from .batcher import DeadlineExceeded, QueueFull, ShuttingDown
from .errors import APIError
from .images import Decoded, ImageError, decode
from .state import State, StateDep


@dataclass
class Upload:
    filename: str | None
    data: bytes


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body has {declared} bytes; the limit is {limit}", "payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body is over the limit of {limit} bytes", "payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, state: State) -> list[Upload]:
    s = state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        # Starlette parses the form from the stream; cap the whole body first.
        limit = s.max_image_bytes * s.max_images_per_request + 64 * 1024
        body = await _read_body(request, limit)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        parsed = Request(request.scope, replay)
        try:
            form = await parsed.form(max_files=s.max_images_per_request + 1, max_fields=100)
        except Exception as exc:
            raise APIError(400, f"the multipart body cannot be parsed: {exc}", "bad_request") from exc
        files = [v for k, v in form.multi_items() if k == "file"]
        if not files:
            raise APIError(422, "multipart body without a part named 'file'", "invalid_parameters")
        if len(files) > s.max_images_per_request:
            raise APIError(
                413, f"{len(files)} images; the limit is {s.max_images_per_request}", "too_many_images"
            )
        uploads = []
        for f in files:
            if not isinstance(f, UploadFile):
                raise APIError(
                    422, "the part 'file' must be a file upload, not a text field", "invalid_parameters"
                )
            data = await f.read()
            if len(data) > s.max_image_bytes:
                raise APIError(
                    413,
                    f"{f.filename}: {len(data)} bytes; the limit is {s.max_image_bytes}",
                    "payload_too_large",
                )
            uploads.append(Upload(f.filename, data))
        await form.close()
        return uploads
    if content_type.startswith("image/"):
        return [Upload(None, await _read_body(request, s.max_image_bytes))]
    raise APIError(
        415,
        f"Content-Type {content_type or '(none)'} is neither multipart/form-data nor an image type",
        "unsupported_media_type",
    )


def _class_filter(classes: str | None, info: ModelInfo) -> set[int] | None:
    if classes is None:
        return None
    names = [c.strip() for c in classes.split(",") if c.strip()]
    unknown = [n for n in names if n not in info.classes]
    if unknown or not names:
        raise APIError(
            422, f"classes: unknown names {unknown}; the model has {info.classes}", "invalid_parameters"
        )
    return {info.classes.index(n) for n in names}


def _result(upload: Upload, image: Decoded, found: Detections, threshold: float, limit: int,
            keep: set[int] | None) -> dict[str, Any]:  # fmt: skip
    detections = found.to_json(image.width, image.height, threshold, limit, keep)
    return {
        "filename": upload.filename,
        "width": image.width,
        "height": image.height,
        "detections": detections,
    }


async def _until_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def detect(
    request: Request,
    state: StateDep,
    score_threshold: Annotated[
        float | None,
        Query(ge=0.0, le=1.0, allow_inf_nan=False, description="from the model's floor to 1"),
    ] = None,
    max_detections: Annotated[int | None, Query(ge=1)] = None,
    classes: Annotated[str | None, Query(description="comma-separated class names to keep")] = None,
) -> JSONResponse:
    detector = state.runtime.detector
    if detector is None:
        raise APIError(503, "no model is loaded yet", "not_ready", {"Retry-After": "5"})
    info = detector.info
    if max_detections is not None and max_detections > info.max_detections:
        raise APIError(
            422, f"max_detections: at most {info.max_detections} for this model", "invalid_parameters"
        )
    keep = _class_filter(classes, info)
    try:  # a default below the artifact's floor is raised to it (and warned about at load)
        threshold = info.threshold(score_threshold, state.settings.score_threshold)
    except ValueError as exc:
        raise APIError(422, str(exc), "invalid_parameters") from None
    deadline = time.monotonic() + state.settings.request_timeout_s

    uploads = await _uploads(request, state)
    loop = asyncio.get_running_loop()

    def timed_decode(data: bytes) -> Decoded:
        started = time.perf_counter()
        try:
            return decode(data, info.input_size, state.settings.max_image_pixels)
        finally:
            state.metrics.preprocess.observe(time.perf_counter() - started)

    try:
        # At the door, before decoding: an image that cannot be queued is refused for free.
        state.batcher.reserve(len(uploads))
        try:
            decoding = [loop.run_in_executor(state.decode_pool, timed_decode, u.data) for u in uploads]
            decoded = await asyncio.gather(*decoding, return_exceptions=True)
            for upload, outcome in zip(uploads, decoded, strict=True):
                if isinstance(outcome, ImageError):
                    name = f"{upload.filename}: " if upload.filename else ""
                    raise APIError(outcome.status, name + str(outcome), outcome.code)
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            state.batcher.release(len(uploads))
            raise
        images: list[Decoded] = decoded  # type: ignore[assignment]
        futures = state.batcher.submit([d.pixels for d in images], deadline, reserved=True)
    except QueueFull as exc:
        state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            503, f"the queue is full ({exc}); retry shortly", "queue_full", {"Retry-After": "1"}
        ) from exc
    except ShuttingDown as exc:
        state.metrics.rejected.labels("shutting_down").inc()
        raise APIError(503, str(exc), "shutting_down", {"Retry-After": "5"}) from exc

    results = asyncio.gather(*futures)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if results not in done:
            for f in futures:
                f.cancel()  # the batcher drops cancelled images before inference
            results.cancel()
            if watcher in done:
                return JSONResponse({"error": {"code": "client_disconnected", "message": "gone"}}, 499)
            state.metrics.rejected.labels("deadline").inc()
            raise APIError(504, f"no answer within {state.settings.request_timeout_s} s", "deadline_exceeded")
        found = results.result()
    except DeadlineExceeded as exc:
        for f in futures:
            f.cancel()
        raise APIError(504, str(exc), "deadline_exceeded") from exc
    except ShuttingDown as exc:
        raise APIError(503, str(exc), "shutting_down", {"Retry-After": "5"}) from exc
    finally:
        watcher.cancel()

    limit = max_detections or info.max_detections
    body = [_result(u, d, f, threshold, limit, keep) for u, d, f in zip(uploads, images, found, strict=True)]
    for r in body:
        state.metrics.detections.observe(len(r["detections"]))
    served = found[-1].model
    model = {"name": served.name, "version": served.version, "sha256": served.sha256}
    return JSONResponse({"model": model, "results": body})
