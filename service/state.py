"""What one running app holds, handed to routes by dependency injection (no module globals)."""

from __future__ import annotations

import time
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
    # Set by SIGTERM (service/server.py): readiness says 503 while every route still serves.
    draining: bool = False
    # When the work in progress must be done (time.monotonic), from the listeners' closing on:
    # one budget for the HTTP connections, the gRPC calls and the queues together.
    stop_by: float | None = None

    def not_ready(self) -> str | None:
        """Why the server is not ready for traffic (None: it is): draining, or the default model
        not loaded. /readyz, /v2/health/ready and gRPC ServerReady all answer from this."""
        if self.draining:
            return "draining: the server is shutting down"
        return self.repository.not_ready()

    def __post_init__(self) -> None:
        # Read at each scrape: the gauge cannot disagree with /readyz.
        self.metrics.ready.set_function(lambda: 1.0 if self.not_ready() is None else 0.0)

    def time_left_to_stop(self) -> float:
        """Seconds left of SSD_SHUTDOWN_TIMEOUT_S (all of it before the listeners closed)."""
        if self.stop_by is None:
            return self.settings.shutdown_timeout_s
        return max(0.0, self.stop_by - time.monotonic())
