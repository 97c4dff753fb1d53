"""Admission at the door: a ``POST /detect`` that could not finish within its deadline is answered
503 by this ASGI middleware, the outermost of the app's (``DoorApp``), before any other
middleware, FastAPI's routing, dependency solving and parameter validation.

A refusal must cost the event loop next to nothing: clients that retry each 503 at once (64 of
them with ``timeout_ms=300`` on a service that can keep about 30 such deadlines) send thousands
a second, and what a refusal costs is taken from the requests being served. py-spy of that
storm with the door inside the other middleware: 45% of the event loop in the metrics and
access-log middleware (16% writing one log line per refusal), 25% in dependency solving before
the door moved before routing. Here a refusal is counted in the same metrics, carries the same
``X-Request-Id``, and is logged once a second as a count (``RefusalLog``), not a line each.

A request let in holds its place: one image's worth is held (``Batcher.hold``) while its body is
read, until the route admits the request's real image count in its stead (``held``). A check
that reserved nothing let every request of a burst in at once (each saw the same empty queue),
and those the route then refused had cost a whole body read and FastAPI's routing each.

Anything this cannot read as it should (a malformed ``timeout_ms``, an unknown model, no model
loaded) goes on to the route, which answers it with the right error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from .batcher import Refused, ShuttingDown
from .errors import APIError
from .inference import deadline, refusal
from .middleware import access_log, new_request_id
from .repository import ModelNotFound, ServedModel
from .slow_clients import error_body
from .state import State
from .uploads import Limits

PATH = "/detect"
HELD = "admitted"  # the scope state's key for the door's ticket
ARRIVAL = "arrival"  # the scope state's key for the request's arrival (monotonic clock)


class DoorApp(FastAPI):
    """FastAPI with the door outside every other middleware (Starlette's ``add_middleware`` puts
    user middleware inside ServerErrorMiddleware and FastAPI's own)."""

    def build_middleware_stack(self) -> ASGIApp:
        return Door(super().build_middleware_stack())


class RefusalLog:
    """Refusals at the door in the access log: the first after a quiet second as a line of its
    own, then a count per second (metrics count every one)."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._count = 0
        self._reasons: dict[str, int] = {}
        self._flush: asyncio.TimerHandle | None = None

    def add(self, code: str, message: str, request_id: str, elapsed_ms: float) -> None:
        if self._flush is None:
            access_log.info(
                "POST %s 503 %.1f ms (%s: %s) [%s]", PATH, elapsed_ms, code, message, request_id,
                extra={"method": "POST", "path": PATH, "status": 503, "duration_ms": round(elapsed_ms, 2)},
            )  # fmt: skip
            self._flush = asyncio.get_running_loop().call_later(self.every_s, self._summarize)
            return
        self._count += 1
        self._reasons[code] = self._reasons.get(code, 0) + 1

    def _summarize(self) -> None:
        self._flush = None
        if self._count:
            reasons = ", ".join(f"{code} {n}" for code, n in sorted(self._reasons.items()))
            access_log.info(
                "POST %s 503 x%d more in the last %g s (%s)", PATH, self._count, self.every_s, reasons
            )
            self._count, self._reasons = 0, {}
            # Still refusing: the next is counted into the next second's line.
            self._flush = asyncio.get_running_loop().call_later(self.every_s, self._summarize)


class Door:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The request's arrival (its headers just read): deadlines count from here.
        arrival = scope.setdefault("state", {}).setdefault(ARRIVAL, time.monotonic())
        found = self._model(scope, arrival) if scope["method"] == "POST" and scope["path"] == PATH else None
        if found is None:
            await self.app(scope, receive, send)
            return
        state, model, due = found
        async with contextlib.AsyncExitStack() as stack:
            try:
                ticket = await stack.enter_async_context(
                    model.batcher.hold(due, state.decoder.typical_seconds)
                )
            except (Refused, ShuttingDown) as exc:
                await self._refuse(scope, receive, send, state, exc, arrival)
                return
            scope["state"][HELD] = ticket  # for the route's admission (service/detect.py)
            await self.app(scope, receive, send)

    @staticmethod
    def _model(scope: Scope, arrival: float) -> tuple[State, ServedModel, float] | None:
        """The service, the model asked for and the request's deadline; None for whatever the
        route must answer itself."""
        state = getattr(scope["app"].state, "service", None)
        if state is None:
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        names = query.get("model")
        try:
            model = state.repository.get(names[-1] if names else None)
            due = deadline(state, arrival, _number(query.get("timeout_ms")))
        except (ModelNotFound, APIError):
            return None  # the route's 404 or 422
        if model.detector is None:
            return None  # the route's 503 not_ready
        return state, model, due

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, state: State, exc: Exception, arrival: float
    ) -> None:
        await _drain(scope, receive, state)
        error = refusal(state, exc)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = new_request_id(given)
        body = error_body(error.code, error.message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode("latin-1")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()),
        ]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        elapsed = time.monotonic() - arrival
        state.metrics.requests.labels(PATH, str(error.status)).inc()
        state.metrics.request_duration.labels(PATH).observe(elapsed)
        self.log.add(error.code, error.message, rid, elapsed * 1000)


async def _drain(scope: Scope, receive: Receive, state: State) -> None:
    """Read the refused request's body and drop it (see ``uploads.discard_body`` for why), under
    the slow-client rule of ``slow_clients.BodyRateGuard`` (``SSD_BODY_TIMEOUT_S`` plus the body
    at ``SSD_MIN_BODY_RATE``), which does not reach this far out; past that or past the largest
    body allowed, the refusal is answered as it is (it closes the connection)."""
    if dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue":
        return
    settings = state.settings
    limit = Limits(settings.max_image_bytes, settings.max_images_per_request).multipart_bytes
    loop = asyncio.get_running_loop()
    origin = loop.time()
    received = 0
    while True:
        try:
            async with asyncio.timeout_at(
                origin + settings.body_timeout_s + received / settings.min_body_rate
            ):
                message = await receive()
        except TimeoutError:
            return
        received += len(message.get("body", b""))
        if message["type"] != "http.request" or received > limit or not message.get("more_body", False):
            return


def _number(values: list[str] | None) -> float | bool | None:
    """The last value as a finite number, None when absent, False when not a number."""
    if not values:
        return None
    try:
        number = float(values[-1])
    except ValueError:
        return False
    return number if math.isfinite(number) else False
