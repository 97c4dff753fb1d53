"""What one running app holds, handed to routes by dependency injection (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import Accounting
from .budget import RequestBudget
from .decoding import Decoder
from .metrics import Metrics
from .repository import Repository
from .settings import Settings


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    repository: Repository
    decoder: Decoder
    started_at: float
    accounting: Accounting
    budget: RequestBudget
