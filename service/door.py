"""Refusals at the door, before routing: a ``POST /detect`` that could not finish within its
deadline is answered 503 by this ASGI middleware, without FastAPI's routing, dependency solving
and parameter validation, which took most of the event loop in a storm of refusals (py-spy: 25%
in dependency solving alone). The route makes the same check again (service/detect.py) and
remains the one place that answers everything else: anything this cannot read as it should
(a malformed ``timeout_ms``, an unknown model, no model loaded) goes on to the route, which
answers it with the right error.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .batcher import Refused, ShuttingDown
from .errors import APIError, error_response
from .inference import deadline, refusal
from .repository import ModelNotFound
from .uploads import Limits, discard_body

PATH = "/detect"


class Door:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_detect = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PATH
        if is_detect and await self._refused(scope, receive, send):
            return
        await self.app(scope, receive, send)

    async def _refused(self, scope: Scope, receive: Receive, send: Send) -> bool:
        state = getattr(scope["app"].state, "service", None)
        if state is None:
            return False
        arrival = scope.get("state", {}).get("arrival")
        if arrival is None:
            return False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        names = query.get("model")
        try:
            model = state.repository.get(names[-1] if names else None)
            due = deadline(state, arrival, _number(query.get("timeout_ms")))
        except (ModelNotFound, APIError):
            return False  # the route's 404 or 422
        if model.detector is None:
            return False
        try:
            model.batcher.check(1, due, state.decoder.typical_seconds)
        except (Refused, ShuttingDown) as exc:
            limits = Limits(state.settings.max_image_bytes, state.settings.max_images_per_request)
            read = await discard_body(Request(scope, receive), limits.multipart_bytes)
            error = refusal(state, exc, body_read=read)
            await error_response(error.status, error.code, error.message, error.headers)(scope, receive, send)
            return True
        return False


def _number(values: list[str] | None) -> float | bool | None:
    """The last value as a finite number, None when absent, False when not a number."""
    if not values:
        return None
    try:
        number = float(values[-1])
    except ValueError:
        return False
    return number if math.isfinite(number) else False
