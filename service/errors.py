"""Errors as the contract's JSON, ``{"error": {"code": ..., "message": ...}}``, never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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


class APIError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


OIP_PREFIX = "/v2"


def _render(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Our contract's error, or under /v2 the Open Inference Protocol's ``{"error": "..."}``,
    where a bad parameter is 400, not 422."""
    if request.url.path == OIP_PREFIX or request.url.path.startswith(OIP_PREFIX + "/"):
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    return error_response(status, code, message, headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _render(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body'))}: {e['msg']}"
            for e in exc.errors()
        )
        return _render(request, 422, "invalid_parameters", problems or "invalid parameters")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _render(
            request,
            exc.status_code,
            _CODES.get(exc.status_code, "error"),
            str(exc.detail),
            getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # No one reads this answer; its status is what the metrics and the access log record
        # (nginx's 499), so that a client leaving never looks like a server error.
        return _render(request, 499, "client_disconnected", "the client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _render(request, 500, "internal_error", "internal error; see the service log")
