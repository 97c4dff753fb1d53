"""The HTTP routes' dependencies: the app's state, the model query parameters, and the refusal
of unknown query parameters."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Query, Request

from .errors import APIError
from .framework import query_names
from .pipeline import lookup
from .repository import ServedModel
from .settings import Settings
from .state import State


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request,
# and under a storm of requests a wait for one of anyio's 40 thread tokens (seen in py-spy).
async def get_state(request: Request) -> State:
    return request.app.state.service


StateDep = Annotated[State, Depends(get_state)]


ModelQuery = Annotated[
    str | None, Query(max_length=128, description="a model of the repository (default: the default model)")
]
VersionQuery = Annotated[
    str | None, Query(max_length=20, description="a version of that model (default: its highest)")
]


def served(state: State, name: str | None, version: int | str | None = None) -> ServedModel:
    """The model a request names (or the default): 404 for a name or version not served."""
    return lookup(state.repository, name, version)


def unknown_query(unknown: Iterable[str], known: Iterable[str]) -> APIError:
    """422 for query parameters a route does not take: a typo (``threshold`` for
    ``score_threshold``) must not be answered as if it were not there."""
    return APIError(
        422,
        f"unknown query parameters {sorted(unknown)}; this route takes {sorted(known) or 'none'}",
        "invalid_parameters",
    )


async def known_query(request: Request) -> None:
    """``unknown_query`` for FastAPI's routes."""
    known = query_names(request.scope)
    if known is None:
        return
    unknown = set(request.query_params) - known
    if unknown:
        raise unknown_query(unknown, known)


def require_operator(request: Request, settings: Settings, what: str) -> None:
    """403 unless the request carries ``Authorization: Bearer SSD_ADMIN_TOKEN`` (and always
    where no token is configured: ``what`` is disabled)."""
    token = settings.admin_token
    if token is None:
        raise APIError(403, f"{what} is disabled: no SSD_ADMIN_TOKEN is configured", "forbidden")
    # RFC 9110: the scheme is case-insensitive ("bearer" is as good as "Bearer").
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(403, "a valid bearer token is required", "forbidden")
