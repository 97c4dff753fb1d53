"""Admission at the door: an inference request over HTTP (``POST /detect``, the OIP's
``POST /v2/models/{name}[/versions/{v}]/infer``) that could not finish within its deadline is
answered 503 by this ASGI middleware, the outermost of the app's own, before the other
middleware, FastAPI's routing, dependency solving and parameter validation, and before a byte
of its body is read. gRPC's calls take the same door in service/oip/grpc.py, once their message
(which carries the model's name) is in.

Each transport adapter tells the door what a request's head asks for (``Head``: its route, model,
version and ``timeout_ms``; see ``head`` in service/detect.py and service/oip/rest.py). The
door opens the request's ``Call`` (service/pipeline.py) with it: the model's one lookup, the
deadline, the place held in the batcher until the route admits the request's real image count.
Anything the door cannot read as it should (a malformed ``timeout_ms``, an unknown model, no
model loaded) goes on to the route, which answers it with the right error from the same ``Call``.

A refusal must cost the event loop next to nothing: clients that retry each 503 at once (64 of
them with ``timeout_ms=300`` on a service that can keep about 30 such deadlines) send thousands
a second, and with the door inside the other middleware 45% of the event loop went to the
metrics and access-log middleware (docs/benchmarks-history.md, "Scheduling and deadlines").
Here a refusal is counted in the same metrics (service/accounting.py), carries the same
``X-Request-Id``, closes the connection, and is logged once a second as a count. Its unread body
is discarded by the HTTP protocol after the answer (service/slow_clients.py), as for every answer
given before a body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from .accounting import Outcome
from .errors import APIError, body
from .middleware import new_request_id
from .pipeline import Call


@dataclass(frozen=True)
class Head:
    """What an inference request's head (path and query) asks for."""

    route: str  # the route's template
    model: str | None
    version: str | None = None
    timeout_ms: float | None = None  # None where the head does not carry it (OIP: in the body)


HeadReader = Callable[[Scope], Head | None]


class Door:
    def __init__(self, app: ASGIApp, heads: Sequence[HeadReader]) -> None:
        self.app = app
        self.heads = tuple(heads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()  # the request's head just read: deadlines count from here
        service = getattr(scope["app"].state, "service", None)
        head = next((h for read in self.heads if (h := read(scope)) is not None), None)
        if head is None or service is None:
            await self.app(scope, receive, send)
            return
        call = Call(service, head.route, arrival)
        scope.setdefault("state", {})["call"] = call
        try:
            call.resolve(head.model, head.version)
            if head.timeout_ms is not None:
                call.set_deadline(head.timeout_ms)
        except APIError:
            await self.app(scope, receive, send)  # the route answers it, from the same Call
            return
        try:
            async with call.door():
                await self.app(scope, receive, send)
        except APIError as error:  # refused at the door: nothing else has run
            await self._refuse(scope, send, call, call.fail(error))
        finally:
            call.close()

    @staticmethod
    async def _refuse(scope: Scope, send: Send, call: Call, error: APIError) -> None:
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = new_request_id(given)
        status, content = body(scope["path"], error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-request-id", rid.encode("latin-1")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})
        model = call.label
        outcome = Outcome("POST", scope["path"], call.route, status, time.monotonic() - call.arrival,
                          model, error)  # fmt: skip
        call.state.accounting.refused(outcome, rid)
