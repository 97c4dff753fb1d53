"""The process-wide budget of request bytes in flight, shared by every transport.

Each request's bounds (``SSD_MAX_REQUEST_BYTES``, ``SSD_MAX_IMAGE_BYTES``, the image count) cap
what one request may send; this caps what all of them hold at once: bodies being read, and read
bodies until their request ends (their images are decoded from them). HTTP takes a body's
declared length before reading it, or its chunks as they come; gRPC takes the largest message
before reading one (its length is not known before), then gives back what it did not use.

A request that does not fit waits its turn, first come first served (an unread body costs only
the socket's buffers meanwhile), until its deadline: then 503 ``request_budget``. A burst of small
requests never waits: they fit together.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import APIError


class RequestBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def reservation(self) -> Reservation:
        return Reservation(self)

    async def _take(self, size: int, due: float | None) -> None:
        if not self._waiting and self.used + size <= self.total:
            self.used += size
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiting.append(entry)
        try:
            loop = asyncio.get_running_loop()
            timeout = None if due is None else max(0.0, due - loop.time())
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():
                self._give(size)  # granted as it timed out: not ours to keep
            else:
                future.cancel()
                self._waiting.remove(entry)
                self._wake()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise APIError(
                503,
                f"the request bytes in flight would pass the budget of {self.total >> 20} MB "
                "(SSD_REQUEST_BUDGET_MB) before the request's deadline",
                "overloaded",
                {"Retry-After": "1", "Connection": "close"},
                reason="request_budget",
            ) from None

    def _give(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            size, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if self.used + size > self.total:
                return
            self._waiting.popleft()
            self.used += size
            future.set_result(None)


class Reservation:
    """One request's bytes held against the budget (``RequestBudget.reservation``)."""

    def __init__(self, budget: RequestBudget) -> None:
        self.budget = budget
        self.held = 0

    async def take(self, size: int, due: float | None = None) -> None:
        """``size`` more bytes, waiting for them up to ``due`` (the event loop's clock, which is
        the monotonic clock): 503 past it. More than the whole budget at once is 413."""
        if size <= 0:
            return
        if self.held + size > self.budget.total:
            raise APIError(
                413,
                f"the request passes {self.budget.total} bytes, the whole budget of request bytes "
                "in flight (SSD_REQUEST_BUDGET_MB)",
                "payload_too_large",
            )
        await self.budget._take(size, due)
        self.held += size

    def shrink(self, size: int) -> None:
        """Keep ``size`` bytes (what a read really took), give back the rest."""
        if size < self.held:
            extra, self.held = self.held - size, size
            self.budget._give(extra)

    def release(self) -> None:
        self.shrink(0)
