"""The door's access log under a storm of refusals: a line for the first, then a count a second."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.accounting import Outcome, RefusalLog
from service.errors import APIError


def refused(code: str, message: str, seconds: float) -> Outcome:
    error = APIError(503, message, code)
    return Outcome("POST", "/detect", "/detect", 503, seconds, "shapes", error)


@pytest.mark.timing
def test_refusals_are_logged_as_a_count_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        # Lines at 0.5 s (the storm's count), 1.0 s (the late one's) and none at 1.5 s; each
        # step below is a quarter interval away from them, for a slow or busy machine.
        log = RefusalLog(every_s=0.5)
        log.add(refused("overloaded", "the request would finish too late", 0.0004), "r1")
        for n in range(500):  # a storm: one line would be written for each
            log.add(refused("queue_full" if n % 5 == 0 else "overloaded", "...", 0.0003), f"r{n}")
        await asyncio.sleep(0.75)
        log.add(refused("overloaded", "...", 0.0003), "late")  # still refusing: into the next interval
        await asyncio.sleep(1.0)  # quiet: the interval after the late one writes nothing
        log.add(refused("overloaded", "after the storm", 0.0002), "r-next")  # a line of its own again

    with caplog.at_level(logging.INFO, logger="service.access"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 4, lines
    assert "503" in lines[0] and "the request would finish too late" in lines[0] and "[r1]" in lines[0]
    assert "x500 more" in lines[1] and "overloaded 400" in lines[1] and "queue_full 100" in lines[1]
    assert "x1 more" in lines[2]
    assert "after the storm" in lines[3]
