"""The HTTP routes' dependencies: the app's state, the request's ``Call`` (service/pipeline.py),
the model query parameters, and the refusal of unknown query parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from .errors import APIError
from .framework import query_names, route_template
from .pipeline import Call, lookup
from .repository import ServedModel
from .state import State


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request,
# and under a storm of requests a wait for one of anyio's 40 thread tokens (seen in py-spy).
async def get_state(request: Request) -> State:
    return request.app.state.service


StateDep = Annotated[State, Depends(get_state)]


async def get_call(request: Request) -> Call:
    """The inference request the door opened (service/door.py), or a new one where no door
    stood (an app mounted under another)."""
    state = request.scope.setdefault("state", {})
    call = state.get("call")
    if call is None:
        call = state["call"] = Call(request.app.state.service, route_template(request.scope))
    return call


CallDep = Annotated[Call, Depends(get_call)]

ModelQuery = Annotated[
    str | None, Query(max_length=128, description="a model of the repository (default: the default model)")
]
VersionQuery = Annotated[
    str | None, Query(max_length=20, description="a version of that model (default: its highest)")
]


def served(state: State, name: str | None, version: int | str | None = None) -> ServedModel:
    """The model a request names (or the default): 404 for a name or version not served."""
    return lookup(state.repository, name, version)


async def known_query(request: Request) -> None:
    """422 for a query parameter the route does not take: a typo (``threshold`` for
    ``score_threshold``) must not be answered as if it were not there."""
    known = query_names(request.scope)
    if known is None:
        return
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise APIError(
            422,
            f"unknown query parameters {unknown}; this route takes {sorted(known) or 'none'}",
            "invalid_parameters",
        )
