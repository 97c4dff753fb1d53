"""``POST /detect``: read the images (service/uploads.py), decode them within the decode budget
(service/decoding.py), queue them for the batcher, answer with the contract's JSON.

A request's deadline is its arrival (its headers read) plus ``timeout_ms`` (default
``SSD_REQUEST_TIMEOUT_S``). It is checked at every step, so that work that cannot be answered in
time is never done:

- at the door, before the body is read: a request whose first image could not finish in time is
  refused (503 with ``Retry-After``; its body is dropped unread, see ``uploads.discard_body``).
  The image count of a multipart body is not known before it is read, so the door admits one
  image's worth and the batcher checks the whole count once the body is in, before any decoding;
- while decoding, and in the queue: the deadline passing, or the client leaving, stops the
  request's work where it is (decoding not started is not started, images queued are dropped
  before inference): 504, or 499 for a client that is gone.

Every request refused or dropped before its answer counts once in
``detector_rejected_requests_total{reason}``, whatever its number of images.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .artifact import Detections, ModelInfo
from .batcher import DeadlineExceeded, QueueFull, Refused, ShuttingDown
from .errors import APIError
from .images import Decoded, ImageError
from .state import State, StateDep
from .uploads import Limits, Upload, discard_body, read_uploads


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


async def _decode(state: State, uploads: list[Upload], input_size: tuple[int, int]) -> list[Decoded]:
    """Decode every upload (in the decode threads, within the budget); the first bad image, in
    the request's order, is the answer (4xx naming it)."""
    outcomes = await asyncio.gather(
        *(state.decoder.decode(u.data, input_size) for u in uploads), return_exceptions=True
    )
    for upload, outcome in zip(uploads, outcomes, strict=True):
        if isinstance(outcome, ImageError):
            name = f"{upload.filename}: " if upload.filename else ""
            raise APIError(outcome.status, name + str(outcome), outcome.code)
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]


async def _run(
    state: State, uploads: list[Upload], input_size: tuple[int, int], deadline: float
) -> tuple[list[Decoded], list[Detections]]:
    """Admission, decoding and inference of one request's images."""
    async with state.batcher.admit(len(uploads), deadline, state.decoder.typical_seconds) as ticket:
        images = await _decode(state, uploads, input_size)
        futures = ticket.submit([d.pixels for d in images])
    try:
        found = list(await asyncio.gather(*futures))
        ticket.done()
        return images, found
    except BaseException:
        for f in futures:
            f.cancel()  # the batcher drops cancelled images before inference
        raise


def _refusal(state: State, exc: Exception, body_read: bool) -> APIError:
    """The 503 or 504 for a request the batcher refused or dropped, counted once."""
    if isinstance(exc, Refused):
        code = "queue_full" if isinstance(exc, QueueFull) else "overloaded"
        state.metrics.rejected.labels(code).inc()
        headers = {"Retry-After": str(exc.retry_after)}
        if not body_read:
            headers["Connection"] = "close"  # answered without reading the body: do not read it
        return APIError(503, f"{exc}; retry in about {exc.retry_after} s", code, headers)
    if isinstance(exc, ShuttingDown):
        state.metrics.rejected.labels("shutting_down").inc()
        return APIError(503, str(exc), "shutting_down", {"Retry-After": "5"})
    state.metrics.rejected.labels("deadline").inc()
    return APIError(504, str(exc), "deadline_exceeded")


def _deadline(request: Request, state: State, timeout_ms: float | None) -> float:
    """The request's deadline: its arrival (set by the observability middleware as the headers are
    read) plus ``timeout_ms``, which may shorten ``SSD_REQUEST_TIMEOUT_S`` but not pass it."""
    limit = state.settings.request_timeout_s
    if timeout_ms is not None and timeout_ms > limit * 1000:
        raise APIError(
            422, f"timeout_ms: at most {limit * 1000:g} (SSD_REQUEST_TIMEOUT_S)", "invalid_parameters"
        )
    arrival = getattr(request.state, "arrival", None) or time.monotonic()
    return arrival + (timeout_ms / 1000 if timeout_ms is not None else limit)


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
    timeout_ms: Annotated[
        float | None,
        Query(gt=0, allow_inf_nan=False, description="the request's deadline from its arrival, ms"),
    ] = None,
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
    deadline = _deadline(request, state, timeout_ms)

    limits = Limits(state.settings.max_image_bytes, state.settings.max_images_per_request)
    try:  # at the door: one image's worth, before a byte of the body is read
        state.batcher.check(1, deadline, state.decoder.typical_seconds)
    except (Refused, ShuttingDown) as exc:
        raise _refusal(state, exc, body_read=await discard_body(request, limits.multipart_bytes)) from exc
    try:
        uploads = await read_uploads(request, limits)
    except ClientDisconnect:
        state.metrics.rejected.labels("disconnected").inc()
        raise  # answered 499 (service/errors.py)

    work = asyncio.ensure_future(_run(state, uploads, info.input_size, deadline))
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait(
            {work, watcher},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()  # decoding not started never starts; queued images are dropped
        with contextlib.suppress(BaseException):
            await work
        if watcher.done() and not watcher.cancelled():
            state.metrics.rejected.labels("disconnected").inc()
            raise ClientDisconnect()
        state.metrics.rejected.labels("deadline").inc()
        given = f"{timeout_ms:g} ms" if timeout_ms is not None else f"{state.settings.request_timeout_s:g} s"
        raise APIError(
            504,
            f"no answer within the request's deadline ({given})",
            "deadline_exceeded",
        )
    try:
        images, found = work.result()
    except (Refused, ShuttingDown, DeadlineExceeded) as exc:
        raise _refusal(state, exc, body_read=True) from exc
    limit = max_detections or info.max_detections
    body = [_result(u, d, f, threshold, limit, keep) for u, d, f in zip(uploads, images, found, strict=True)]
    for r in body:
        state.metrics.detections.observe(len(r["detections"]))
    served = found[-1].model
    model = {"name": served.name, "version": served.version, "sha256": served.sha256}
    return JSONResponse({"model": model, "results": body})
