"""What every request leaves behind, whatever carried it: ``detector_requests_total{route, code,
model}``, ``detector_request_duration_seconds{route, model}``, one count in
``detector_rejected_requests_total{reason}`` for an inference request answered with an error,
and the access log's line. HTTP's middleware (service/middleware.py), the door's refusals
(service/door.py) and gRPC's calls (service/oip/grpc.py) all end here.

``route`` is the route's template (``/detect``, ``/v2/models/{name}/infer``), the gRPC method's
name, or ``unmatched`` for a path no route serves: a bounded set, whatever paths clients send.
``model`` is the served name of the model that the request was for, or ``-``: a name is a label
only once the repository has served it (a 404's name never is).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .errors import APIError
from .metrics import Metrics

access_log = logging.getLogger("service.access")
QUIET = frozenset({"/metrics", "/healthz", "/readyz"})  # probes: counted, not logged
NO_MODEL = "-"


@dataclass(frozen=True)
class Outcome:
    """One request, answered."""

    method: str
    path: str
    route: str
    status: int
    seconds: float
    model: str = NO_MODEL
    error: APIError | None = None  # set for an inference request answered with an error


class Accounting:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.refusals = RefusalLog()

    def record(self, outcome: Outcome, log_line: bool = True) -> None:
        m = self.metrics
        m.requests.labels(outcome.route, str(outcome.status), outcome.model).inc()
        m.request_duration.labels(outcome.route, outcome.model).observe(outcome.seconds)
        if outcome.error is not None:
            m.rejected.labels(outcome.error.reason).inc()
        if log_line and outcome.route not in QUIET:
            ms = outcome.seconds * 1000
            access_log.info(
                "%s %s %d %.1f ms%s", outcome.method, outcome.path, outcome.status, ms,
                f" model={outcome.model}" if outcome.model != NO_MODEL else "",
                extra={"method": outcome.method, "path": outcome.path, "status": outcome.status,
                       "duration_ms": round(ms, 2), "model": outcome.model},
            )  # fmt: skip

    def refused(self, outcome: Outcome, request_id: str) -> None:
        """A refusal at the door: counted as every request is, logged as a count per second."""
        self.record(outcome, log_line=False)
        assert outcome.error is not None
        self.refusals.add(outcome, request_id)

    def cut(self, reason: str) -> None:
        """A connection cut before any request was read (a slow or oversized head)."""
        self.metrics.rejected.labels(reason).inc()


class RefusalLog:
    """Refusals at the door in the access log: the first after a quiet second as a line of its
    own, then a count per second (metrics count every one). One line per refusal took 16% of
    the event loop in a storm of retried refusals."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._count = 0
        self._reasons: dict[str, int] = {}
        self._flush: asyncio.TimerHandle | None = None

    def add(self, outcome: Outcome, request_id: str) -> None:
        error = outcome.error
        assert error is not None
        if self._flush is None:
            ms = outcome.seconds * 1000
            access_log.info(
                "%s %s %d %.1f ms (%s: %s) [%s]", outcome.method, outcome.path, outcome.status, ms,
                error.code, error.message, request_id,
                extra={"method": outcome.method, "path": outcome.path, "status": outcome.status,
                       "duration_ms": round(ms, 2), "model": outcome.model},
            )  # fmt: skip
            self._flush = asyncio.get_running_loop().call_later(self.every_s, self._summarize)
            return
        self._count += 1
        self._reasons[error.code] = self._reasons.get(error.code, 0) + 1

    def _summarize(self) -> None:
        self._flush = None
        if self._count:
            reasons = ", ".join(f"{code} {n}" for code, n in sorted(self._reasons.items()))
            access_log.info(
                "503 x%d more at the door in the last %g s (%s)", self._count, self.every_s, reasons
            )
            self._count, self._reasons = 0, {}
            # Still refusing: the next is counted into the next second's line.
            self._flush = asyncio.get_running_loop().call_later(self.every_s, self._summarize)
