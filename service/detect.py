"""``POST /detect``: read the images (service/uploads.py), decode them within the decode budget
(service/decoding.py), queue them for the batcher, answer with the contract's JSON.

Every request refused or dropped before its answer counts once in
``detector_rejected_requests_total{reason}``, whatever its number of images.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .artifact import Detections, ModelInfo
from .batcher import DeadlineExceeded, QueueFull, ShuttingDown
from .errors import APIError
from .images import Decoded, ImageError
from .state import State, StateDep
from .uploads import Limits, Upload, read_uploads


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


async def _decode(
    state: State, uploads: list[Upload], input_size: tuple[int, int], deadline: float
) -> list[Decoded]:
    """Decode every upload (in the decode threads, within the budget) by the deadline; the first
    bad image, in the request's order, is the answer (4xx naming it)."""
    decoding = asyncio.gather(
        *(state.decoder.decode(u.data, input_size) for u in uploads), return_exceptions=True
    )
    try:
        outcomes = await asyncio.wait_for(decoding, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        state.metrics.rejected.labels("deadline").inc()
        raise APIError(
            504, "the deadline passed before the images were decoded", "deadline_exceeded"
        ) from None
    for upload, outcome in zip(uploads, outcomes, strict=True):
        if isinstance(outcome, ImageError):
            name = f"{upload.filename}: " if upload.filename else ""
            raise APIError(outcome.status, name + str(outcome), outcome.code)
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]


async def _results(
    request: Request, state: State, futures: list[asyncio.Future[Detections]], deadline: float
) -> list[Detections]:
    """Wait for the batcher's answers, the deadline or the client's leaving, whichever is first."""
    results = asyncio.gather(*futures)
    # Retrieved here whatever happens, so that a late failure is never "never retrieved".
    results.add_done_callback(lambda f: f.cancelled() or f.exception())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {results, watcher},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if results not in done:
            for f in futures:
                f.cancel()  # the batcher drops cancelled images before inference
            results.cancel()
            if watcher in done:
                state.metrics.rejected.labels("disconnected").inc()
                raise ClientDisconnect()
            state.metrics.rejected.labels("deadline").inc()
            raise APIError(504, f"no answer within {state.settings.request_timeout_s} s", "deadline_exceeded")
        return results.result()
    except DeadlineExceeded as exc:
        for f in futures:
            f.cancel()
        state.metrics.rejected.labels("deadline").inc()
        raise APIError(504, str(exc), "deadline_exceeded") from exc
    except ShuttingDown as exc:
        raise APIError(503, str(exc), "shutting_down", {"Retry-After": "5"}) from exc
    finally:
        watcher.cancel()


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

    limits = Limits(state.settings.max_image_bytes, state.settings.max_images_per_request)
    try:
        uploads = await read_uploads(request, limits)
    except ClientDisconnect:
        state.metrics.rejected.labels("disconnected").inc()
        raise  # answered 499 (service/errors.py)
    try:
        # At the door, before decoding: an image that cannot be queued is refused for free.
        state.batcher.reserve(len(uploads))
        try:
            images = await _decode(state, uploads, info.input_size, deadline)
        except BaseException:
            state.batcher.release(len(uploads))
            raise
        futures = state.batcher.submit([d.pixels for d in images], deadline, reserved=True)
    except QueueFull as exc:
        state.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            503, f"the queue is full ({exc}); retry shortly", "queue_full", {"Retry-After": "1"}
        ) from exc
    except ShuttingDown as exc:
        state.metrics.rejected.labels("shutting_down").inc()
        raise APIError(503, str(exc), "shutting_down", {"Retry-After": "5"}) from exc
    found = await _results(request, state, futures, deadline)
    limit = max_detections or info.max_detections
    body = [_result(u, d, f, threshold, limit, keep) for u, d, f in zip(uploads, images, found, strict=True)]
    for r in body:
        state.metrics.detections.observe(len(r["detections"]))
    served = found[-1].model
    model = {"name": served.name, "version": served.version, "sha256": served.sha256}
    return JSONResponse({"model": model, "results": body})
