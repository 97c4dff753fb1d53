"""One request's images through one model, whatever the protocol (``/detect``, the OIP over
REST or gRPC): its parameters checked, its deadline kept, its images decoded within the budget,
batched, and its detections filtered as asked.

A request's deadline is its arrival plus ``timeout_ms`` (default ``SSD_REQUEST_TIMEOUT_S``). It is
checked at every step, so that work that cannot be answered in time is never done:

- at the door, before the body is read (``door``): a request whose first image could not finish
  in time is refused (503 with ``Retry-After``);
- once the images are known (``infer``): the batcher admits the whole count before any decoding;
- while decoding, and in the queue: the deadline passing, or the client leaving, stops the
  request's work where it is (decoding not started is not started, images queued are dropped
  before inference): 504, or 499 for a client that is gone.

Errors are ``APIError`` with the HTTP status of design.md; each protocol renders them its way.
Every request refused or dropped before its answer counts once in
``detector_rejected_requests_total{reason}``, whatever its number of images.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from starlette.requests import ClientDisconnect

from .artifact import Detections, ModelInfo
from .batcher import DeadlineExceeded, QueueFull, Refused, ShuttingDown, Ticket
from .errors import APIError
from .images import ImageError
from .repository import ServedModel
from .state import State


@dataclass(frozen=True)
class Query:
    """What a request asks of the detections: ``threshold``, at most ``limit``, classes ``keep``."""

    threshold: float
    limit: int
    keep: set[int] | None

    @classmethod
    def parse(
        cls,
        info: ModelInfo,
        default_threshold: float,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> Query:
        """Checked against the model: 422 naming the parameter."""
        if max_detections is not None and not 1 <= max_detections <= info.max_detections:
            raise APIError(
                422, f"max_detections: 1 to {info.max_detections} for this model", "invalid_parameters"
            )
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise APIError(422, "score_threshold: from the model's floor to 1", "invalid_parameters")
        try:  # a default below the artifact's floor is raised to it (and warned about at load)
            threshold = info.threshold(score_threshold, default_threshold)
        except ValueError as exc:
            raise APIError(422, str(exc), "invalid_parameters") from None
        keep = None
        if classes is not None:
            names = [c.strip() for c in classes if c.strip()]
            unknown = [n for n in names if n not in info.classes]
            if unknown or not names:
                raise APIError(
                    422,
                    f"classes: unknown names {unknown}; the model has {info.classes}",
                    "invalid_parameters",
                )
            keep = {info.classes.index(n) for n in names}
        return cls(threshold, max_detections or info.max_detections, keep)


def deadline(state: State, arrival: float | None, timeout_ms: float | None) -> float:
    """The request's deadline on the monotonic clock: its arrival (as its headers were read) plus
    ``timeout_ms``, which may shorten ``SSD_REQUEST_TIMEOUT_S`` but not pass it (422)."""
    limit = state.settings.request_timeout_s
    if timeout_ms is not None and not 0 < timeout_ms <= limit * 1000:
        raise APIError(
            422,
            f"timeout_ms: more than 0 and at most {limit * 1000:g} (SSD_REQUEST_TIMEOUT_S)",
            "invalid_parameters",
        )
    return (arrival or time.monotonic()) + (timeout_ms / 1000 if timeout_ms is not None else limit)


def refusal(state: State, exc: Exception) -> APIError:
    """The 503 or 504 for a request the batcher refused or dropped, counted once."""
    if isinstance(exc, Refused):
        code = "queue_full" if isinstance(exc, QueueFull) else "overloaded"
        state.metrics.rejected.labels(code).inc()
        # The connection is closed: a client that retries at once (not honouring Retry-After)
        # must reconnect first, and pays for it. 64 clients retrying each 503 at once with
        # timeout_ms=300 got 57 images/s answered so, against 6 on kept-alive connections, where
        # their refusals took the whole event loop (docs/benchmarks.md, Scheduling). Closing
        # also spares the body of a refusal answered without reading it.
        headers = {"Retry-After": str(exc.retry_after), "Connection": "close"}
        return APIError(503, f"{exc}; retry in about {exc.retry_after} s", code, headers)
    if isinstance(exc, ShuttingDown):
        state.metrics.rejected.labels("shutting_down").inc()
        return APIError(503, str(exc), "shutting_down", {"Retry-After": "5"})
    state.metrics.rejected.labels("deadline").inc()
    return APIError(504, str(exc), "deadline_exceeded")


def ready_model(model: ServedModel) -> ModelInfo:
    """The model's metadata, or 503 while it is not loaded."""
    detector = model.detector
    if detector is None:
        raise APIError(503, f"model {model.name} is not loaded yet", "not_ready", {"Retry-After": "5"})
    return detector.info


def door(state: State, model: ServedModel, due: float) -> None:
    """Before a byte of the body is read: could one image finish by ``due``? Raises the batcher's
    refusals (Refused, ShuttingDown) for the caller to answer (it knows what to do with the body)."""
    model.batcher.check(1, due, state.decoder.typical_seconds)


@dataclass(frozen=True)
class Found:
    """One image's answer: the size its boxes are in, and what the model found."""

    width: int
    height: int
    detections: Detections

    def json(self, query: Query) -> list[dict]:
        """The contract's detection objects, as ``query`` asks."""
        return self.detections.to_json(self.width, self.height, query.threshold, query.limit, query.keep)

    def arrays(self, query: Query) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same detections as arrays: boxes float32 [n, 4] in pixels, scores, labels int64."""
        return self.detections.select(self.width, self.height, query.threshold, query.limit, query.keep)


def answered(model: ServedModel, counts: Sequence[int]) -> None:
    """Count the detections returned per image (after the query's filters)."""
    for count in counts:
        model.batcher.metrics.detections.observe(count)


async def _pixels(state: State, images: Sequence[bytes], names: Sequence[str | None],
                  input_size: tuple[int, int]) -> list[tuple[int, int, np.ndarray]]:  # fmt: skip
    """Decode every image (in the decode threads, within the budget); the first bad image, in
    the request's order, is the answer (4xx naming it)."""
    outcomes = await asyncio.gather(
        *(state.decoder.decode(data, input_size) for data in images), return_exceptions=True
    )
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, ImageError):
            raise APIError(outcome.status, (f"{name}: " if name else "") + str(outcome), outcome.code)
        if isinstance(outcome, BaseException):
            raise outcome
    return [(d.width, d.height, d.pixels) for d in outcomes]  # type: ignore[union-attr]


async def _run(
    state: State,
    model: ServedModel,
    images: Sequence[bytes] | np.ndarray,
    names: Sequence[str | None],
    input_size: tuple[int, int],
    due: float,
    held: Ticket | None,
) -> list[Found]:
    async with model.batcher.admit(len(images), due, state.decoder.typical_seconds, held) as ticket:
        try:
            if isinstance(images, np.ndarray):  # pixels at the model's input size: nothing to decode
                height, width = input_size
                decoded = [(width, height, pixels) for pixels in images]
            else:
                decoded = await _pixels(state, images, names, input_size)
        except (asyncio.CancelledError, DeadlineExceeded):
            ticket.abandoned()
            raise
        futures = ticket.submit([pixels for _, _, pixels in decoded])
    try:
        found = list(await asyncio.gather(*futures))
        ticket.done()
    except BaseException:
        for f in futures:
            f.cancel()  # the batcher drops cancelled images before inference
        ticket.abandoned()
        raise
    return [Found(w, h, d) for (w, h, _), d in zip(decoded, found, strict=True)]


async def infer(
    state: State,
    model: ServedModel,
    images: Sequence[bytes] | np.ndarray,
    due: float,
    gone: Callable[[], Awaitable[None]] | None = None,
    names: Sequence[str | None] | None = None,
    timeout_s: float | None = None,
    held: Ticket | None = None,
) -> list[Found]:
    """Detections for encoded ``images`` (or ``pixels`` uint8 [B, H, W, 3] at the model's input
    size) by ``due``; ``gone`` returns when the client goes away; ``timeout_s``, the deadline's
    length, for the 504's message; ``held``, the request's admission at the door, which the
    whole count's replaces. Raises APIError (4xx, 503, 504) or ClientDisconnect."""
    info = ready_model(model)
    names = names if names is not None else [None] * len(images)
    work = asyncio.ensure_future(_run(state, model, images, names, info.input_size, due, held))
    watcher = asyncio.ensure_future(gone()) if gone is not None else None
    try:
        await asyncio.wait(
            {work} | ({watcher} if watcher else set()),
            timeout=max(0.0, due - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    except BaseException:  # this request was cancelled (a gRPC call its client cancelled)
        work.cancel()
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
    if not work.done():
        work.cancel()  # decoding not started never starts; queued images are dropped
        with contextlib.suppress(BaseException):
            await work
        if watcher is not None and watcher.done() and not watcher.cancelled():
            state.metrics.rejected.labels("disconnected").inc()
            raise ClientDisconnect()
        state.metrics.rejected.labels("deadline").inc()
        given = f" ({timeout_s * 1000:g} ms)" if timeout_s is not None else ""
        raise APIError(504, f"no answer within the request's deadline{given}", "deadline_exceeded")
    try:
        return work.result()
    except (Refused, ShuttingDown, DeadlineExceeded) as exc:
        raise refusal(state, exc) from exc
