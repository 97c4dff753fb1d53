"""The HTTP requests' ids and accounting as one pure ASGI middleware (no per-request task or body
copy, unlike Starlette's BaseHTTPMiddleware)."""

from __future__ import annotations

import itertools
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .accounting import NO_MODEL, Accounting, Outcome
from .framework import route_template
from .logs import request_id

# A request id needs to be unique, not unpredictable: a random prefix per process and a counter
# (32 hex digits, as uuid4().hex was). uuid4 took 13% of the event loop in a storm of 1,000
# refusals a second (py-spy, 64 clients retrying each 503 at once).
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count()


def new_request_id(given: str = "") -> str:
    """The client's ``X-Request-Id`` where it is a sane one, else a new id."""
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


class ObservabilityMiddleware:
    """Each HTTP request's id (``X-Request-Id``, in the answer and every log line) and its
    accounting (service/accounting.py): route template, status, model, duration, rejection."""

    def __init__(self, app: ASGIApp, accounting: Accounting) -> None:
        self.app = app
        self.accounting = accounting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1"))
        token = request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        self.accounting.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self.accounting.metrics.in_flight.dec()
            call = scope.get("state", {}).get("call")
            if call is not None:
                call.close()
                route, model, error = call.route, call.label, call.error
            else:
                route, model, error = route_template(scope), NO_MODEL, None
            self.accounting.record(
                Outcome(scope["method"], scope["path"], route, status, elapsed, model, error)
            )
            request_id.reset(token)
