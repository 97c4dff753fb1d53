"""``ssd serve`` as people run it: a real uvicorn server in a subprocess, with torch made
unimportable in it, scraped by promtool and stopped with SIGTERM while requests are in flight."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# `import torch` (or torchvision, onnx) anywhere in the server raises ImportError. model/'s
# torch-free registry and config may load: the `ssd` command builds the export parser from them.
NO_TORCH = (
    "import sys; sys.modules.update({m: None for m in ('torch', 'torchvision', 'onnx', 'onnxscript')}); "
    "import cli; cli.main(sys.argv[1:])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg() -> bytes:
    from model.data.synth import render

    out = io.BytesIO()
    render(np.random.default_rng(0), (480, 640)).image.save(out, "JPEG")
    return out.getvalue()


class Server:
    def __init__(self, model: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "SSD_PROVIDERS": "cpu", "SSD_INTRA_OP_THREADS": "2", **env}
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", NO_TORCH, "serve", "--model", str(model), "--port", str(self.port)],
            cwd=ROOT,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"not ready within 60 s: {log.read_text()}")

    def stop(self, signalled: bool = False) -> int:
        if not signalled and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


@pytest.mark.timing
@pytest.mark.slow
def test_served_without_torch_and_drained_on_sigterm(served_artifact, tmp_path):
    server = Server(
        served_artifact,
        tmp_path / "server.log",
        SSD_MAX_QUEUE_DELAY_MS="20",
        SSD_LOG_JSON="1",
    )
    body = jpeg()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post(
                "/detect", content=body, headers={"Content-Type": "image/jpeg", "X-Request-ID": "r-1"}
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == "r-1"
            metrics = client.get("/metrics").text

        promtool = shutil.which("promtool")
        if promtool:
            check = subprocess.run(
                [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr

        # 24 requests in flight, then SIGTERM: every one is answered, and the process exits 0.
        started = threading.Event()

        def post(_: int) -> int:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                started.set()
                return c.post("/detect", content=body, headers={"Content-Type": "image/jpeg"}).status_code

        def received() -> float:
            """/detect requests the server has taken so far (done or in flight), the first one included."""
            text = httpx.get(server.url + "/metrics", timeout=10).text
            done = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("detector_requests_total{") and 'route="/detect"' in line
            )
            in_flight = [
                line for line in text.splitlines() if line.startswith("detector_requests_in_flight ")
            ]
            return done + float(in_flight[0].rsplit(" ", 1)[1]) - 1  # minus this /metrics request

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(post, i) for i in range(24)]
            started.wait(10)
            # SIGTERM closes the listening socket: send it once all 24 are in (a busy machine
            # may take a while to open 24 connections), not after a fixed pause.
            deadline = time.monotonic() + 30
            while received() < 25 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            codes = [f.result() for f in futures]
        assert codes == [200] * 24
        assert server.stop(signalled=True) == 0
        log = (tmp_path / "server.log").read_text()
        assert '"request_id": "r-1"' in log  # JSON log lines carry the request id
        assert "ImportError" not in log
    finally:
        server.stop()


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_is_what_checks_the_metrics():
    """The check above is real: promtool rejects a malformed exposition."""
    bad = "# TYPE detector_x counter\ndetector_x{a=b} 1\n"
    check = subprocess.run(["promtool", "check", "metrics"], input=bad, capture_output=True, text=True)
    assert check.returncode != 0
