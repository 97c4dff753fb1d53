"""What one running app holds, handed to routes by dependency injection (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .batcher import Batcher
from .decoding import Decoder
from .metrics import Metrics
from .runtime import ModelRuntime
from .settings import Settings


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    runtime: ModelRuntime
    batcher: Batcher
    decoder: Decoder
    started_at: float


def get_state(request: Request) -> State:
    return request.app.state.service


StateDep = Annotated[State, Depends(get_state)]
