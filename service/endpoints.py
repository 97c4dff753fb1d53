"""The inference routes, answered below FastAPI: ``POST /detect`` and the OIP's ``POST
/v2/models/{name}[/versions/{version}]/infer``.

Why not FastAPI routes: its routing, dependency solving and parameter validation took a third of
the event loop's CPU per ``/detect`` (cProfile of ``ssd bench frontend``'s load, thread CPU
time), more than the request's own work; these routes take a handful of parameters, which their
transport adapters (service/detect.py, service/oip/rest.py) read by an allow-list with the same
rules and errors. FastAPI keeps their declarations: the OpenAPI schema still describes them,
and another method on their paths is still its 405.

Nothing a request is promised lives here. The door, the accounting and the body guard are the
middleware around this one, as for every route; admission, deadlines, limits and errors are the
core's (service/pipeline.py); an error answers as FastAPI's handlers answer it
(``errors.as_api_error``, ``errors.render``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .door import Head
from .errors import as_api_error, render
from .pipeline import Call, not_ready


@dataclass(frozen=True)
class Endpoint:
    """An inference route: ``head`` reads a request's path and query (None: not this route; the
    door reads the same), ``handle`` answers it from its ``Call`` and that head."""

    head: Callable[[Scope], Head | None]
    handle: Callable[[Request, Call, Head], Awaitable[Response]]


class InferenceRoutes:
    """ASGI middleware, the innermost of the app's: a POST to an inference route is answered
    here, everything else goes on to FastAPI."""

    def __init__(self, app: ASGIApp, endpoints: Sequence[Endpoint]) -> None:
        self.app = app
        self.endpoints = tuple(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for endpoint in self.endpoints:
                head = endpoint.head(scope)
                if head is not None:
                    await self._answer(endpoint, head, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(endpoint: Endpoint, head: Head, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        call = state.get("call")
        request = Request(scope, receive)
        try:
            if call is None:  # no door stood in front (an app mounted under another, a startup)
                service = getattr(scope["app"].state, "service", None)
                if service is None:
                    raise not_ready("the service is starting")
                call = state["call"] = Call(service, head.route)
            response = await endpoint.handle(request, call, head)
        except Exception as exc:
            response = render(scope, as_api_error(exc, "POST", scope["path"]))
        await response(scope, receive, send)
