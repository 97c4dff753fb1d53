"""``ssd serve [--model FILE.onnx] [--host H] [--port P]``: the service under uvicorn.

Slow clients are cut off here, not only behind a proxy: a request's headers by the protocol class
of service/slow_clients.py (SSD_HEADER_TIMEOUT_S, SSD_MAX_HEADER_BYTES), its body by the app's
BodyRateGuard, idle keep-alive connections by uvicorn (SSD_KEEPALIVE_TIMEOUT_S).

SIGTERM (and Ctrl-C) stop it gracefully: uvicorn stops accepting connections and waits for the
requests in progress (up to SSD_SHUTDOWN_TIMEOUT_S), then the app's shutdown drains the queue,
and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the .onnx artifact (default: SSD_MODEL_PATH)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .middleware import configure_logging
    from .settings import Settings
    from .slow_clients import default_protocol, guarded_protocol

    try:
        settings = Settings(**({"model_path": args.model} if args.model else {}))
    except ValidationError as exc:
        print(f"ssd serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_json)
    app = create_app(settings, grpc_host=args.host)

    def count_cut(reason: str) -> None:
        # The metrics live in the app's state from its startup on; a cut before that is not counted.
        state = getattr(app.state, "service", None)
        if state is not None:
            state.accounting.cut(reason)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # ours (configure_logging), with request ids
        access_log=False,  # the app logs each request once, with its id and duration
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        lifespan="on",
        # Slow clients (service/slow_clients.py): the header clock and budget in the protocol,
        # idle keep-alive connections closed by uvicorn's own timer.
        http=guarded_protocol(default_protocol(), settings, count_cut),
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
        # h11 (when httptools is missing) refuses headers past this with its own 400: keep it
        # from cutting before our 431 does.
        h11_max_incomplete_event_size=settings.max_header_bytes + 1,
        # No limit_concurrency: it counts open connections, so slow clients would turn normal
        # requests into 503s. With the clocks above, 2000 slow-header connections and 200 slow
        # uploads at once were all cut on time, normal /detect p50 unchanged (bench/slow_clients.py).
    )
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT while serving, then re-raises the signal once shut down so
    # that the previous handler runs. With the default handler that kills the process (status
    # -15); a graceful stop is a success, so the previous handler here just lets run() return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stopped by signal %d", signum))
    server.run()
    # uvicorn returns without raising when the lifespan startup fails (e.g. SSD_REQUIRE_GPU).
    return 0 if server.started else 1
