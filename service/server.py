"""``ssd serve [--model FILE.onnx] [--host H] [--port P]``: the service under uvicorn.

Slow clients are cut off here, not only behind a proxy: a request's headers by the protocol class
of service/slow_clients.py (SSD_HEADER_TIMEOUT_S, SSD_MAX_HEADER_BYTES), its body by the app's
BodyRateGuard, idle keep-alive connections by uvicorn (SSD_KEEPALIVE_TIMEOUT_S).

SIGTERM drains it (``DrainingServer``): for SSD_DRAIN_S the readiness routes answer 503 while
every route still serves, since a load balancer goes on routing here for a few seconds after it
is told (Kubernetes removes an endpoint asynchronously); then the listeners close, and the
requests in progress, the gRPC calls and the queues have SSD_SHUTDOWN_TIMEOUT_S together to
finish; the process exits 0. SIGINT (Ctrl-C), or a second signal (a second or more after the
first: the same signal twice at once is one stop), skips the drain; one more stops without
waiting for the work in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import resource
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger(__name__)


# The errors of accept() at a resource limit: the connection is dropped unanswered.
ACCEPT_LIMITS = {
    errno.EMFILE: "fd_limit",
    errno.ENFILE: "fd_limit",
    errno.ENOBUFS: "memory",
    errno.ENOMEM: "memory",
}
LOG_EVERY_S = 10.0
# Descriptors kept for everything but HTTP connections: the model files, the gRPC listener and
# its connections, logs, ONNX Runtime's and the event loop's own (about 60 at rest).
RESERVED_FDS = 64


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one, as Go's runtime does for every
    program: each connection is a descriptor, and a soft limit of 256 dropped 103 of 300
    concurrent connections, unanswered. The limits after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite RLIMIT_NOFILE (past fs.nr_open, 2^20 by default).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Dropped:
    """Connections refused or dropped at a resource limit: each counted
    (``detector_rejected_requests_total`` under ``fd_limit`` or ``memory``), logged at most
    once per LOG_EVERY_S with the count since."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._since = 0
        self._logged_at = -math.inf

    def __call__(self, reason: str, how: str) -> None:
        self._count(reason)
        self._since += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.error("%d connections %s (open files limit %d)", self._since, how, soft)
            self._since, self._logged_at = 0, now


def accept_errors(dropped: Dropped) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The event loop's exception handler: asyncio's loop reports a failed accept() here (and
    retries a second later); anything else goes to the loop's default handler. (uvloop's libuv
    drops such a connection silently: ``connection_ceiling`` keeps from getting there.)"""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        reason = ACCEPT_LIMITS.get(getattr(exc, "errno", None)) if isinstance(exc, OSError) else None
        if reason is None:
            loop.default_exception_handler(context)
            return
        dropped(reason, f"dropped unanswered: accept() failed with {errno.errorcode.get(exc.errno)}")

    return handle


_REFUSAL_BODY = (
    b'{"error": {"code": "fd_limit", "message": "too many open connections for the open files limit"}}'
)
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def connection_ceiling(
    base: type[asyncio.Protocol], ceiling: int, dropped: Dropped
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol class) answering a connection past ``ceiling`` open ones
    with a 503 and closing it: past the open files limit accept() fails, and libuv (uvloop)
    then accepts and closes the connection without a word to anyone."""
    open_connections = 0

    class Ceiling(base):  # type: ignore[misc, valid-type]
        _counted = False
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal open_connections
            if open_connections >= ceiling:
                self._refused = True
                dropped("fd_limit", f"refused with 503: {ceiling} open, the most the open files limit allows")
                transport.write(REFUSAL)  # type: ignore[attr-defined]
                transport.close()
                return
            open_connections += 1
            self._counted = True
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal open_connections
            if self._refused:
                return
            if self._counted:
                open_connections -= 1
                self._counted = False
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> bool | None:
            return None if self._refused else super().eof_received()

        def pause_writing(self) -> None:
            if not self._refused:
                super().pause_writing()

        def resume_writing(self) -> None:
            if not self._refused:
                super().resume_writing()

    return Ceiling


# The same signal again within this time is the same request to stop, not a second one: `uv run`
# forwards the SIGTERM its process group got (systemd's control-group kill, `kill -TERM -PGID`),
# so the server receives it twice within milliseconds, and must still drain.
SAME_STOP_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its graceful shutdown (the module docstring).

    uvicorn reads ``should_exit`` every 0.1 s in its main loop; its signal handler
    (``handle_exit``) runs on the main thread between two of the loop's steps, so setting flags
    here needs no lock."""

    def __init__(
        self, config: uvicorn.Config, drain_s: float, state: Any, dropped: Dropped | None = None
    ) -> None:
        super().__init__(config)
        self._dropped = dropped
        self.drain_s = drain_s
        self._state = state  # () -> State | None: the app's, once its startup has made it
        self._drain_until: float | None = None
        self._last_signal: tuple[int, float] | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)  # the app's startup (its state) first, then the listeners
        if self._dropped is not None:
            asyncio.get_running_loop().set_exception_handler(accept_errors(self._dropped))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if (
            self._last_signal is not None
            and self._last_signal[0] == sig
            and now - self._last_signal[1] < SAME_STOP_S
        ):
            return  # the same stop, delivered twice (below)
        self._last_signal = (sig, now)
        self._captured_signals.append(sig)  # uvicorn re-raises them once stopped
        state: State | None = self._state()
        if self.should_exit:  # already closing: stop without waiting for the work in progress
            self.force_exit = True
        elif sig == signal.SIGTERM and self._drain_until is None and self.drain_s > 0 and state:
            state.draining = True
            self._drain_until = time.monotonic() + self.drain_s
            log.info("SIGTERM: draining, readiness says 503 for %.1f s, then shutting down", self.drain_s)
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: Any = None) -> None:
        state: State | None = self._state()
        if state is not None:
            state.draining = True
            state.stop_by = time.monotonic() + state.settings.shutdown_timeout_s
        log.info(
            "closing the listeners; the work in progress has %.1f s",
            self.config.timeout_graceful_shutdown or 0,
        )
        await super().shutdown(sockets)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the .onnx artifact (default: SSD_MODEL_PATH)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def settings_errors(exc: ValidationError) -> str:
    """One line per bad setting, named as the user set it (``SSD_MAX_BATCH_SIZE``, not pydantic's
    field name), with the value given where there is one."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        name = f"SSD_{field.upper()}" if field else "settings"
        given = f"={error['input']}" if field and isinstance(error.get("input"), str | int | float) else ""
        lines.append(f"  {name}{given}: {error['msg']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .app import create_app
    from .logs import configure_logging
    from .settings import Settings
    from .slow_clients import default_protocol, guarded_protocol

    try:
        settings = Settings(**({"model_path": args.model} if args.model else {}))
    except ValidationError as exc:
        print("ssd serve: invalid settings:\n" + settings_errors(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_json)
    soft, hard = raise_open_files_limit()
    ceiling = max(1, soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else 1 << 30
    log.info("open files limit %d (hard %d): at most %d HTTP connections", soft, hard, ceiling)
    app = create_app(settings, grpc_host=args.host)

    def count_cut(reason: str) -> None:
        # The metrics live in the app's state from its startup on; a cut before that is not counted.
        state = getattr(app.state, "service", None)
        if state is not None:
            state.accounting.cut(reason)

    dropped = Dropped(count_cut)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # ours (service/logs.py), with request ids
        access_log=False,  # the app logs each request once, with its id and duration
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        lifespan="on",
        # Slow clients (service/slow_clients.py): the header clock and budget in the protocol,
        # idle keep-alive connections closed by uvicorn's own timer.
        http=connection_ceiling(guarded_protocol(default_protocol(), settings, count_cut), ceiling, dropped),
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
        # h11 (when httptools is missing) refuses headers past this with its own 400: keep it
        # from cutting before our 431 does.
        h11_max_incomplete_event_size=settings.max_header_bytes + 1,
        # No limit_concurrency: it counts open connections, so slow clients would turn normal
        # requests into 503s. With the clocks above, 2000 slow-header connections and 200 slow
        # uploads at once were all cut on time, normal /detect p50 unchanged (bench/slow_clients.py).
    )
    server = DrainingServer(config, settings.drain_s, lambda: getattr(app.state, "service", None), dropped)
    # uvicorn handles SIGTERM/SIGINT while serving, then re-raises the signal once shut down so
    # that the previous handler runs. With the default handler that kills the process (status
    # -15); a graceful stop is a success, so the previous handler here just lets run() return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stopped by signal %d", signum))
    server.run()
    # uvicorn returns without raising when the lifespan startup fails (e.g. SSD_REQUIRE_GPU).
    return 0 if server.started else 1
