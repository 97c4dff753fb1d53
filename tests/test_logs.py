"""The service's log (service/logs.py): lines with their request's id, written by a thread of
their own, from a bounded queue whose overflow is counted, not waited for."""

from __future__ import annotations

import io
import json
import logging
import queue
import sys

import pytest

from service import logs


@pytest.fixture
def configure(monkeypatch):
    """``configure(json_lines)`` -> what the log writes; the root logger restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configure(json_lines: bool) -> io.StringIO:
        # In the test's own phase: pytest's capture puts its own sys.stderr back between phases.
        out = io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)  # the writer's stream, taken when it is made
        logs.configure_logging(json_lines)
        return out

    yield configure
    logs._stop()
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_lines_carry_the_request_id_and_are_written_by_their_own_thread(configure):
    out = configure(True)
    writer = logs._writer
    assert writer is not None and writer._thread is not None and writer._thread.is_alive()
    token = logs.request_id.set("abc123")
    logging.getLogger("service.access").info(
        "%s %s %d", "POST", "/detect", 200, extra={"status": 200, "path": "/detect"}
    )
    logs.request_id.reset(token)
    logging.getLogger("x").warning("outside a request")
    logs._stop()  # every queued line is written
    assert writer._thread is None
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "POST /detect 200" and first["request_id"] == "abc123"
    assert first["status"] == 200 and first["level"] == "info"
    assert second["request_id"] == "-" and second["level"] == "warning"


def test_plain_lines_and_exceptions(configure):
    out = configure(False)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("service.app").exception("failed on %s", "/detect")
    logs._stop()
    text = out.getvalue()
    assert "ERROR service.app [-] failed on /detect" in text
    assert "ValueError: boom" in text and "Traceback" in text


def test_a_full_queue_drops_lines_and_says_how_many_once_it_has_room():
    lines: queue.Queue = queue.Queue(2)
    handler = logs._Queued(lines)
    logger = logging.getLogger("test.logs.full")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.warning("line %d", i)  # never blocks
        assert handler.dropped == 3
        assert [lines.get_nowait().getMessage() for _ in range(2)] == ["line 0", "line 1"]
        logger.warning("line 5")
        dropped, last = lines.get_nowait(), lines.get_nowait()
        assert dropped.getMessage() == "3 log lines dropped: the log's reader fell behind"
        assert last.getMessage() == "line 5" and handler.dropped == 0
    finally:
        logger.removeHandler(handler)
