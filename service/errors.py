"""Errors as the contract's JSON, ``{"error": {"code": ..., "message": ...}}``, never a stack trace."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    499: "client_disconnected",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
}


# ``detector_rejected_requests_total{reason}`` names a few codes otherwise (the names its alerts
# and dashboards have always used); every other code is its own reason.
REASONS = {"deadline_exceeded": "deadline", "client_disconnected": "disconnected"}


class APIError(Exception):
    """An answer other than success: the contract's HTTP status, a code, a message for people,
    headers, and the ``reason`` it is counted under when it answers an inference request."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.headers = headers
        self.reason = reason or REASONS.get(self.code, self.code)


class ClientGone(Exception):
    """The client went away before its answer, whatever the transport (499)."""


def client_gone() -> APIError:
    """A client that went away: no server error (nginx's 499), never read by anyone."""
    return APIError(499, "the client closed the connection", "client_disconnected")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


OIP_PREFIX = "/v2"


def is_oip(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def error_body(code: str, message: str) -> bytes:
    """The contract's error as bytes, for answers written below FastAPI (the door, the HTTP
    protocol's own 408 and 431)."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def body(path: str, error: APIError) -> tuple[int, bytes]:
    """The status and JSON body of ``error`` on ``path``: our contract's, or under /v2 the Open
    Inference Protocol's ``{"error": "..."}``, where a bad parameter is 400, not 422."""
    if is_oip(path):
        return (400 if error.status == 422 else error.status), json.dumps({"error": error.message}).encode()
    return error.status, error_body(error.code, error.message)


def as_api_error(exc: Exception, method: str, path: str) -> APIError:
    """The answer to an exception a route raised: its own APIError, 499 for a client that went
    away (nobody reads it; its status is what the metrics and the access log record, nginx's,
    so that a client leaving never looks like a server error), else 500, logged."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnect | ClientGone):
        return client_gone()
    if isinstance(exc, StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return APIError(500, "internal error; see the service log", "internal_error")


def render(scope: Scope, error: APIError) -> Response:
    """``error`` as the answer to the request of ``scope``, recorded in its ``Call`` (if any) as
    the error that answered it."""
    call = scope.get("state", {}).get("call")
    if call is not None:
        call.fail(error)
    status, content = body(scope["path"], error)
    return Response(content, status_code=status, headers=error.headers, media_type="application/json")


def install(app: FastAPI) -> None:
    """The same answers for FastAPI's routes (the inference routes answer below FastAPI:
    service/endpoints.py)."""

    async def _answer(request: Request, exc: Exception) -> Response:
        return render(request.scope, as_api_error(exc, request.method, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body'))}: {e['msg']}"
            for e in exc.errors()
        )
        return render(request.scope, APIError(422, problems or "invalid parameters", "invalid_parameters"))

    for kind in (APIError, StarletteHTTPException, ClientDisconnect, ClientGone, Exception):
        app.add_exception_handler(kind, _answer)
