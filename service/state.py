"""What one running app holds, handed to routes by dependency injection (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from .decoding import Decoder
from .errors import APIError
from .metrics import Metrics
from .repository import ModelNotFound, Repository, ServedModel
from .settings import Settings


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    repository: Repository
    decoder: Decoder
    started_at: float


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request,
# and under a storm of requests a wait for one of anyio's 40 thread tokens (seen in py-spy).
async def get_state(request: Request) -> State:
    return request.app.state.service


StateDep = Annotated[State, Depends(get_state)]


ModelQuery = Annotated[
    str | None, Query(max_length=128, description="a model of the repository (default: the default model)")
]


def served(state: State, name: str | None, version: int | str | None = None) -> ServedModel:
    """The model a request names (or the default): 404 for a name or version not served."""
    try:
        return state.repository.get(name, version)
    except ModelNotFound as exc:
        raise APIError(404, str(exc), "model_not_found") from None
