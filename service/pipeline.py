"""One inference request through the core, whatever carried it (``POST /detect``, the OIP over
REST or over gRPC). Each transport only parses its wire format into a ``Call`` and renders the
answer; every guarantee lives here, once:

============  ============================================================================
stage         what it owns
============  ============================================================================
arrival       ``Call(state, route, arrival)``: the route template and the monotonic time the
              request's head was read (deadlines count from it)
model         ``Call.resolve(name, version)``: the one lookup (404 ``model_not_found``, 503
              ``not_ready``); the answer's ``identity``
door          ``Call.door(due)``: before the body is read (HTTP) or parsed (gRPC), one image's
              place held in the model's batcher, or 503 ``overloaded``/``queue_full``
request bytes ``Call.bytes``: the process-wide budget of request bytes in flight
              (service/budget.py), 503 ``request_budget`` past it
deadline      ``Call.set_deadline(timeout_ms, transport_due)``: once, from the arrival (422
              past ``SSD_REQUEST_TIMEOUT_S``)
run           ``Call.run(images, ...)``: the whole count admitted in place of the door's, the
              images decoded within the decode budget, batched, each step re-checking the
              deadline (504) and the client (499)
errors        ``APIError`` with the contract's HTTP status and a code; ``Call.fail`` records
              the one that answered, which the accounting (service/accounting.py) counts
              once in ``detector_rejected_requests_total{reason}``
============  ============================================================================

A request's deadline is its arrival plus ``timeout_ms`` (default ``SSD_REQUEST_TIMEOUT_S``),
or the transport's own deadline (gRPC's) where that is earlier. At the door it is the longest a
request may have when the request's own deadline is not known yet (OIP requests carry it in
their body). Work that cannot be answered in time is never done: decoding not started is not
started, images queued are dropped before inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .artifact import Detections, ModelInfo
from .batcher import DeadlineExceeded, QueueFull, Refused, ShuttingDown, Ticket
from .budget import Reservation
from .errors import APIError, ClientGone
from .images import Decoded, ImageError, Rect
from .memory import release_soon
from .repository import ModelNotFound, NoModel, Repository, ServedModel
from .state import State
from .tiling import Tiling, merge_passes

# A request body this large leaves enough freed heap behind to be worth handing back at once.
RELEASE_ABOVE = 8 * 1024 * 1024


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


@dataclass(frozen=True)
class Found:
    """One image's answer: the size its boxes are in, and what the model found (merged over its
    tiles and the whole image where it was tiled: ``tiles`` their rectangles)."""

    width: int
    height: int
    detections: Detections
    tiles: tuple[Rect, ...] = ()

    def json(self, query: Query) -> list[dict]:
        """The contract's detection objects, as ``query`` asks."""
        return self.detections.to_json(self.width, self.height, query.threshold, query.limit, query.keep)

    def arrays(self, query: Query) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same detections as arrays: boxes float32 [n, 4] in pixels, scores, labels int64."""
        return self.detections.select(self.width, self.height, query.threshold, query.limit, query.keep)


def lookup(repository: Repository, name: str | None, version: int | str | None = None) -> ServedModel:
    """A model by name (default: the default model) and version (default: its highest), as
    every route looks it up: 404 ``model_not_found`` for a name or version not served, 503
    ``not_ready`` when no model is listed at all."""
    try:
        return repository.get(name, version)
    except NoModel as exc:
        raise not_ready(str(exc)) from None
    except ModelNotFound as exc:
        raise APIError(404, str(exc), "model_not_found") from None


def not_ready(why: str) -> APIError:
    """The 503 for a request nothing can serve yet (a model not loaded, no model at all): why."""
    return APIError(503, why, "not_ready", {"Retry-After": "5"})


def refusal(exc: Exception) -> APIError:
    """The 503 or 504 for a request the batcher refused or dropped."""
    if isinstance(exc, Refused):
        code = "queue_full" if isinstance(exc, QueueFull) else "overloaded"
        # The connection is closed: a client that retries at once (not honouring Retry-After)
        # must reconnect first, and pays for it. 64 clients retrying each 503 at once with
        # timeout_ms=300 got 57 images/s answered so, against 6 on kept-alive connections, where
        # their refusals took the whole event loop (docs/benchmarks-history.md, "Scheduling and
        # deadlines").
        headers = {"Retry-After": str(exc.retry_after), "Connection": "close"}
        return APIError(503, f"{exc}; retry in about {exc.retry_after} s", code, headers)
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), "shutting_down", {"Retry-After": "5"})
    return APIError(504, str(exc), "deadline_exceeded", reason="deadline")


@dataclass
class Call:
    """One inference request in the core. Built by its transport at arrival; every stage of the
    module docstring is a method, each done once."""

    state: State
    route: str  # the route's template, or the gRPC method: the metrics' and the log's label
    arrival: float = field(default_factory=time.monotonic)
    model: ServedModel | None = None
    due: float | None = None
    timeout_s: float | None = None  # the deadline's length, for the 504's message
    held: Ticket | None = None  # the door's place, until ``run`` admits the whole count
    error: APIError | None = None  # the error that answered it, recorded once (``fail``)
    bytes: Reservation | None = None  # request bytes held against the process-wide budget
    label: str = "-"  # the metrics' and the log's ``model``: a served name once looked up, or "-"
    _lookup: APIError | None = None
    _info: ModelInfo | None = None

    # --- model ---------------------------------------------------------------------------------

    def resolve(self, name: str | None, version: int | str | None = None) -> ServedModel:
        """The model asked for (default: the default model), looked up once: 404 for a name or
        version not served, 503 while it is not loaded."""
        if self.model is not None:
            return self.model
        if self._lookup is not None:
            raise self._lookup
        try:
            model = lookup(self.state.repository, name, version)
        except APIError as exc:
            self._lookup = exc
            raise
        self.label = model.name  # a name the repository serves: a bounded label set
        if model.detector is None:
            self._lookup = not_ready(model.why_not_ready())
            raise self._lookup
        self.model, self._info = model, model.detector.info
        return model

    @property
    def info(self) -> ModelInfo:
        """The resolved model's metadata (its artifact as loaded when it was looked up)."""
        assert self._info is not None, "resolve() first"
        return self._info

    # --- deadline ------------------------------------------------------------------------------

    def longest_due(self) -> float:
        """The latest deadline any request may have (its arrival plus SSD_REQUEST_TIMEOUT_S)."""
        return self.arrival + self.state.settings.request_timeout_s

    def set_deadline(self, timeout_ms: float | None, transport_due: float | None = None) -> float:
        """The request's deadline, set once: its arrival plus ``timeout_ms``, which may shorten
        ``SSD_REQUEST_TIMEOUT_S`` but not pass it (422), or the transport's own deadline
        (``transport_due``, gRPC's) where that is earlier."""
        if self.due is not None:
            return self.due
        limit = self.state.settings.request_timeout_s
        if timeout_ms is not None and not 0 < timeout_ms <= limit * 1000:
            raise APIError(
                422,
                f"timeout_ms: more than 0 and at most {limit * 1000:g} (SSD_REQUEST_TIMEOUT_S)",
                "invalid_parameters",
            )
        due = self.arrival + (timeout_ms / 1000 if timeout_ms is not None else limit)
        if transport_due is not None and transport_due < due:
            due = transport_due
        self.due, self.timeout_s = due, due - self.arrival
        return due

    # --- door ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def door(self, due: float | None = None) -> AsyncIterator[None]:
        """Hold one image's place in the model's batcher until ``run`` admits the whole count,
        or the block ends: refused (503) when one image could not finish by ``due`` (default:
        the request's deadline, else the longest)."""
        model = self.model
        assert model is not None, "resolve() first"
        due = due or self.due or self.longest_due()
        try:
            async with model.batcher.hold(due, self.state.decoder.typical_seconds) as ticket:
                self.held = ticket
                yield
        except (Refused, ShuttingDown) as exc:
            if self.held is not None:
                raise  # refused later, inside the block: the block's own error
            raise refusal(exc) from exc

    # --- run -----------------------------------------------------------------------------------

    async def run(
        self,
        images: Sequence[bytes] | np.ndarray,
        names: Sequence[str | None] | None = None,
        gone: Callable[[], Awaitable[Any]] | None = None,
        tiling: Tiling | None = None,
        threshold: float = 0.0,
    ) -> list[Found]:
        """Detections for encoded ``images`` (or pixels uint8 [B, H, W, 3] at the model's input
        size) by the deadline; ``gone`` returns when the client goes away. With ``tiling``, each
        image also in tiles at full resolution, merged (scores under ``threshold`` left out
        before the merge: the answer drops them anyway). Raises APIError (4xx, 503, 504) or
        ClientGone."""
        info = self.info
        due = self.set_deadline(None)
        names = names if names is not None else [None] * len(images)
        if tiling is not None and isinstance(images, np.ndarray):
            raise APIError(422, "tile: tiling needs encoded images, not pixels", "invalid_parameters")
        work = asyncio.ensure_future(self._run(images, names, info.input_size, due, tiling, threshold))
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
                raise ClientGone()
            raise APIError(
                504,
                f"no answer within the request's deadline ({(self.timeout_s or 0) * 1000:g} ms)",
                "deadline_exceeded",
                reason="deadline",
            )
        try:
            return work.result()
        except (Refused, ShuttingDown, DeadlineExceeded) as exc:
            raise refusal(exc) from exc

    async def _pixels(
        self,
        images: Sequence[bytes],
        names: Sequence[str | None],
        input_size: tuple[int, int],
        grids: Sequence[tuple[Rect, ...]],
    ) -> list[Decoded]:
        """Every image decoded (in the decode threads, within the budget), with its tiles; the
        first bad image, in the request's order, is the answer (4xx naming it)."""
        decoder = self.state.decoder
        if len(images) == 1:  # most requests: awaited in place, no task of its own
            return [await _named(names[0], decoder.decode(images[0], input_size, grids[0]))]
        outcomes = await asyncio.gather(
            *(decoder.decode(data, input_size, rects) for data, rects in zip(images, grids, strict=True)),
            return_exceptions=True,
        )
        return _first_error(names, outcomes)

    async def _grids(
        self,
        images: Sequence[bytes],
        names: Sequence[str | None],
        tiling: Tiling,
        input_size: tuple[int, int],
    ) -> list[tuple[Rect, ...]]:
        """Each image's tiles, from its header alone: what admission counts before decoding."""
        decoder, limit = self.state.decoder, self.state.settings.max_tiles_per_image
        sizes = await asyncio.gather(*(decoder.size(data) for data in images), return_exceptions=True)
        return [tuple(tiling.grid(w, h, input_size, limit)) for w, h in _first_error(names, sizes)]

    async def _run(
        self,
        images: Sequence[bytes] | np.ndarray,
        names: Sequence[str | None],
        input_size: tuple[int, int],
        due: float,
        tiling: Tiling | None,
        threshold: float,
    ) -> list[Found]:
        model = self.model
        assert model is not None
        decoder = self.state.decoder
        held, self.held = self.held, None
        grids: list[tuple[Rect, ...]] = [()] * len(images)
        if tiling is not None:  # the door's place stays held meanwhile (its block gives it back)
            assert not isinstance(images, np.ndarray)
            grids = await self._grids(images, names, tiling, input_size)
        # A tiled image costs its tiles and the whole image: admission, the queue's bound and
        # the deadline's estimate count every model input.
        inputs = sum(len(rects) + 1 for rects in grids)
        async with model.batcher.admit(inputs, due, decoder.typical_seconds, held) as ticket:
            try:
                if isinstance(images, np.ndarray):  # pixels at the model's input size
                    height, width = input_size
                    decoded = [Decoded(pixels, width, height) for pixels in images]
                else:
                    decoded = await self._pixels(images, names, input_size, grids)
            except (asyncio.CancelledError, DeadlineExceeded):
                ticket.abandoned()
                raise
            futures = ticket.submit([array for d in decoded for array in d.inputs()])
        try:
            found = list(await asyncio.gather(*futures))
            ticket.done()
        except BaseException:
            for f in futures:
                f.cancel()  # the batcher drops cancelled images before inference
            ticket.abandoned()
            raise
        answers, at = [], 0
        for image in decoded:
            passes = found[at : at + 1 + len(image.rects)]
            at += len(passes)
            if tiling is not None:
                model.batcher.metrics.tiles.observe(len(image.rects))
            if image.rects:
                merged = await _merged(passes, image, threshold)
                answers.append(Found(image.width, image.height, merged, image.rects))
            else:
                answers.append(Found(image.width, image.height, passes[0]))
        return answers

    # --- answer --------------------------------------------------------------------------------

    def answered(self, counts: Sequence[int]) -> None:
        """Count the detections returned per image (after the query's filters)."""
        assert self.model is not None
        for count in counts:
            self.model.batcher.metrics.detections.observe(count)

    def identity(self, found: Sequence[Found] = ()) -> dict[str, str]:
        """Which model answered: its served name and repository version, and the artifact that
        ran (after a hot reload, the new one: the detections say which)."""
        assert self.model is not None
        info = found[-1].detections.model if found else self.info
        return self.model.identity(info)

    def fail(self, error: APIError) -> APIError:
        """Record the error that answers this request (the first one: a later one is a
        consequence), for the accounting."""
        if self.error is None:
            self.error = error
        return error

    def close(self) -> None:
        """The request is over: its bytes go back to the budget, and a large body's memory to
        the system (glibc keeps freed heap for reuse: two 64 MB gRPC messages left 340 MB
        resident after their answers without it)."""
        if self.bytes is not None:
            held = self.bytes.held
            self.bytes.release()
            if held >= RELEASE_ABOVE:
                release_soon()


class BadImage(APIError):
    """A 4xx for one image of a request (``index``, in the request's order), naming it. A
    transport that answers each image on its own (Label Studio's tasks) leaves it out and goes
    on with the others."""

    def __init__(self, index: int, name: str | None, error: ImageError) -> None:
        super().__init__(error.status, (f"{name}: " if name else "") + str(error), error.code)
        self.index = index


async def _named(name: str | None, decoding: Awaitable[Decoded]) -> Decoded:
    try:
        return await decoding
    except ImageError as exc:
        raise BadImage(0, name, exc) from None


def _first_error(names: Sequence[str | None], outcomes: Sequence[Any]) -> list[Any]:
    """The outcomes of a request's images, or the first error in the request's order (4xx
    naming the image for a bad one)."""
    for index, (name, outcome) in enumerate(zip(names, outcomes, strict=True)):
        if isinstance(outcome, ImageError):
            raise BadImage(index, name, outcome)
        if isinstance(outcome, BaseException):
            raise outcome
    return list(outcomes)


# Above this many boxes the merge (quadratic in the boxes of a class) leaves the event loop.
MERGE_ON_LOOP = 200


async def _merged(passes: Sequence[Detections], image: Decoded, threshold: float) -> Detections:
    """One image's detections over its passes, merged (service/tiling.py), off the event loop
    where there are many."""
    merge = functools.partial(merge_passes, list(passes), image.rects, image.width, image.height, threshold)
    if sum(int((d.scores >= threshold).sum()) for d in passes) > MERGE_ON_LOOP:
        return await asyncio.to_thread(merge)
    return merge()
