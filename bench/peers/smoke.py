"""Start each peer, ask it for one photo's detections over a raw socket, stop it: the counts must
agree with ours.

    uv run --group peers python -m bench.peers.smoke [--artifact models/demo.onnx] [--image X.jpg]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.peers import PEERS, ROOT, Peer

PHOTO = ROOT / "photos" / "val2017" / "000000165518.jpg"  # photos/README.md


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(
    peer: Peer, artifact: Path, max_batch: int = 8, max_delay_ms: float = 5.0, threads: int = 1,
    timeout: float = 180.0, log: Path | None = None, env: dict[str, str] | None = None,
) -> Iterator[int]:  # fmt: skip
    """Runs ``peer`` on a free port until ready; yields the port; stops its process group."""
    port = free_port()
    argv, extra = peer.command(artifact, port, max_batch, max_delay_ms, threads)
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **extra, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{peer.ready_path}", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer.name} was not ready within {timeout:.0f} s")
            time.sleep(0.25)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if log:
            output.close()


def exchange(request: bytes, port: int, timeout: float = 30.0) -> tuple[int, bytes]:
    """Sends one raw request; returns the status and the body (Content-Length or chunked)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before the headers: {data!r}")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])

        def more() -> bytes:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the middle of the body")
            return chunk

        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if length:
            while len(rest) < int(length.group(1)):
                rest += more()
            return status, rest[: int(length.group(1))]
        if not re.search(rb"(?im)^transfer-encoding: *chunked", head):
            raise ValueError(f"no Content-Length and not chunked: {head!r}")
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            line, rest = rest.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += more()
            body, rest = body + rest[:size], rest[size + 2 :]
            if size == 0:
                return status, body


# The demo model finds shapes: on a photo its scores are low, so the check looks at them all.
LOW_THRESHOLD = {"SSD_SCORE_THRESHOLD": "0.05"}


def found(
    peer: Peer, artifact: Path, image: bytes, threads: int = 1, log: Path | None = None,
    env: dict[str, str] | None = None,
) -> list[dict]:  # fmt: skip
    """The detections ``peer`` finds in ``image`` (started and stopped here)."""
    with running(peer, artifact, threads=threads, log=log, env=env) as port:
        return peer.found(*exchange(peer.request(image, port), port))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "models" / "demo.onnx"))
    parser.add_argument("--image", default=str(PHOTO))
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    image, artifact = Path(args.image).read_bytes(), Path(args.artifact).resolve()
    results: dict[str, list[dict]] = {}
    failed = False
    for name in args.peers:
        peer = PEERS[name]
        reason = peer.unavailable()
        if reason:
            print(f"{name}: unavailable: {reason}")
            continue
        started = time.perf_counter()
        results[name] = found(peer, artifact, image, args.threads, env=LOW_THRESHOLD)
        same = results[name] == results.get("ours", results[name])
        failed |= not same
        print(
            f"{name}: {len(results[name])} detections at score >= 0.05, "
            f"{'the same as ours' if same else 'NOT the same as ours'} "
            f"({time.perf_counter() - started:.1f} s from start to stop)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
