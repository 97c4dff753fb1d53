"""A live ``ssd serve`` for the tests that need real sockets (slow clients, hostile bytes, Triton's
own clients): started with the default settings plus the given ones, ready when /readyz says so,
stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    process: subprocess.Popen
    log: Path


@contextmanager
def live_server(folder: Path, settings: dict[str, str], timeout_s: float = 90.0) -> Iterator[Live]:
    """``ssd serve`` on a free port with ``settings`` (SSD_* variables; the caller's own are dropped,
    so that the defaults are what is tested)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env |= {"SSD_PROVIDERS": "cpu", "SSD_DRAIN_S": "0", **settings}  # no drain at the stop
    log = folder / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    live = Live(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(live.url):
            if process.poll() is not None:
                pytest.fail(f"ssd serve exited with {process.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ssd serve not ready within {timeout_s:g} s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield live
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
