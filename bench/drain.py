"""``ssd bench drain``: the timeline of a SIGTERM under load, as a load balancer sees it.

``ssd serve`` with the service's defaults (``SSD_DRAIN_S`` = 5 s) and the demo model; CLIENTS
closed-loop clients, each opening a new connection per ``/detect`` (as a balancer spreading new
connections would), and a ``/readyz`` probe every 20 ms; SIGTERM after ``--before`` seconds.
Printed: when readiness turned 503, when the listener closed (the first refused connection), the
requests sent during the drain and how they were answered, the last answer, and the exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .server import free_port

ROOT = Path(__file__).resolve().parents[1]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(ROOT / "models" / "demo.onnx"))
    parser.add_argument("--image", default=str(ROOT / "docs" / "images" / "demo_scene.jpg"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before SIGTERM")


def _outcome(call) -> int | str:
    import httpx  # the dev install's; imported here so that `ssd --help` parses without it

    try:
        return call().status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def main(args: argparse.Namespace) -> int:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")} | {"SSD_PROVIDERS": "cpu"}
    argv = [sys.executable, "-m", "cli", "serve", "--model", args.model, "--port", str(port)]
    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _outcome(lambda: httpx.get(url + "/readyz", timeout=1)) != 200:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            print("ssd bench drain: the server did not become ready", file=sys.stderr)
            return 1
        time.sleep(0.2)
    body = Path(args.image).read_bytes()
    sent: list[tuple[float, float, int | str]] = []  # (sent, answered, status or error)
    probes: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            code = _outcome(
                lambda: httpx.post(
                    url + "/detect", content=body, headers={"Content-Type": "image/jpeg"}, timeout=30
                )
            )
            sent.append((started, time.monotonic(), code))

    def prober() -> None:
        while not stop.is_set():
            probes.append((time.monotonic(), _outcome(lambda: httpx.get(url + "/readyz", timeout=5))))
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(args.clients)] + [
        threading.Thread(target=prober)
    ]
    for thread in threads:
        thread.start()
    time.sleep(args.before)
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(120)
    exited = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - signalled) * 1000)

    after = [(t, c) for t, c in probes if t > signalled]
    not_ready = next((t for t, c in after if c == 503), None)
    # The listener's close: the first connection refused, a probe's or a client's.
    refused = [t for t, c in after if c == "ConnectError"] + [s for s, _, c in sent if c == "ConnectError"]
    closed = min(refused, default=exited)
    during = [c for s, _, c in sent if signalled < s < closed]
    answered = [e for _, e, c in sent if c == 200]
    report = {
        "exit_code": code,
        "readiness_503_ms": ms(not_ready),
        "readiness_200_after_signal": sum(1 for _, c in after if c == 200),
        "listener_closed_ms": ms(closed),
        "sent_during_drain": len(during),
        "answered_200_during_drain": during.count(200),
        "other_answers_during_drain": [c for c in during if c != 200],
        "last_answer_ms": ms(max(answered) if answered else None),
        "exit_ms": ms(exited),
        "sent_after_close": sum(1 for s, _, _ in sent if s > closed),
    }
    print(json.dumps(report))
    return 0 if code == 0 else 1
