"""The service's log: plain or JSON lines, each with its request's id, written by a thread of
its own.

A log call on the event loop only makes the record (its message formatted, its request id
attached) and queues it; the line is formatted and written by the ``ssd-log`` thread. Writing
on the loop cost it 0.05 ms per access-log line (a write to an unbuffered stderr each), and a
reader that stops reading (a full pipe) stopped the whole service. The queue is bounded: past
``QUEUE_LINES`` waiting lines, new ones are dropped and counted, and the count is logged once
the queue has room again.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import queue
from logging.handlers import QueueHandler, QueueListener
from typing import Any

from .threadnames import LOG, name_this_thread

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
QUEUE_LINES = 10_000


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key in ("method", "path", "status", "duration_ms", "model"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


PLAIN = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _Queued(QueueHandler):
    """Records onto the bounded queue, as they are: only the message is formatted here (its
    arguments may change after the call), the line in the writing thread."""

    def __init__(self, lines: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                dropped = logging.makeLogRecord(
                    {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                     "msg": f"{self.dropped} log lines dropped: the log's reader fell behind",
                     "request_id": "-"}
                )  # fmt: skip
                self.queue.put_nowait(dropped)
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(QueueListener):
    def _monitor(self) -> None:
        name_this_thread(LOG)
        super()._monitor()

    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel, timeout=5)  # room for it, even behind a full queue

    def stop(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                super().stop()


_writer: _Writer | None = None


@atexit.register
def _stop() -> None:
    if _writer is not None:
        _writer.stop()


def configure_logging(json_lines: bool, level: int = logging.INFO) -> None:
    """The root logger's lines to stderr, through the writing thread (stopped, and its queue
    written out, at exit)."""
    global _writer  # logging is the process's: one root logger, one writer
    _stop()
    # What no line shows, not looked up for every record (the logging HOWTO's "Optimization"):
    # the caller's file and line (a walk up the stack: most of a record's cost), the thread's
    # and the process's names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    output = logging.StreamHandler()
    output.setFormatter(JSONFormatter() if json_lines else logging.Formatter(PLAIN))
    lines: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_LINES)
    handler = _Queued(lines)
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _writer = _Writer(lines, output)
    _writer.start()
