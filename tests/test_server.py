"""``ssd serve`` as people run it: a real uvicorn server in a subprocess, with torch made
unimportable in it, scraped by promtool and stopped with SIGTERM while requests are in flight."""

from __future__ import annotations

import contextlib
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
    def __init__(self, model: Path, log: Path, wait_ready: bool = True, preexec_fn=None, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # No drain unless a test asks for one: every stop here would wait SSD_DRAIN_S.
        environment = {
            **os.environ,
            "SSD_PROVIDERS": "cpu",
            "SSD_INTRA_OP_THREADS": "2",
            "SSD_DRAIN_S": "0",
            **env,
        }
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", NO_TORCH, "serve", "--model", str(model), "--port", str(self.port)],
            cwd=ROOT,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        if not wait_ready:
            return
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


@pytest.mark.timing
@pytest.mark.slow
def test_sigterm_drains_readiness_first_then_closes(served_artifact, tmp_path):
    """A load balancer goes on routing new connections here for a while after SIGTERM: for
    SSD_DRAIN_S readiness says 503 and every request is still answered; then the listener
    closes (connections refused), and the process exits 0."""
    drain_s = 2.0
    server = Server(served_artifact, tmp_path / "server.log", SSD_DRAIN_S=str(drain_s))
    body = jpeg()
    sent: list[tuple[float, int | str]] = []  # (when sent, status or the error's name)
    probes: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def outcome(call) -> int | str:
        try:
            return call().status_code
        except httpx.TransportError as exc:
            return type(exc).__name__

    def client() -> None:  # a new connection per request, as a balancer spreading them would
        while not stop.is_set():
            when = time.monotonic()
            sent.append(
                (
                    when,
                    outcome(
                        lambda: httpx.post(
                            server.url + "/detect",
                            content=body,
                            headers={"Content-Type": "image/jpeg"},
                            timeout=30,
                        )
                    ),
                )
            )

    def prober() -> None:
        while not stop.is_set():
            probes.append((time.monotonic(), outcome(lambda: httpx.get(server.url + "/readyz", timeout=5))))
            time.sleep(0.05)

    try:
        threads = [threading.Thread(target=client) for _ in range(4)] + [threading.Thread(target=prober)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(drain_s + 1.5)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert server.stop(signalled=True) == 0
    finally:
        stop.set()
        server.stop()
    # 0.3 s of margin at each edge: the signal's handling, the 0.1 s tick that ends the drain.
    during = [code for when, code in sent if signalled + 0.3 < when < signalled + drain_s - 0.3]
    assert during and set(during) == {200}, during
    before = [code for when, code in probes if when < signalled - 0.1]
    assert before and set(before) == {200}, before
    draining = [code for when, code in probes if signalled + 0.3 < when < signalled + drain_s - 0.3]
    assert draining and set(draining) == {503}, draining
    after = [code for when, code in probes if when > signalled + drain_s + 1.0]
    assert after and all(code == "ConnectError" for code in after), after


@pytest.mark.timing
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE as Linux applies it")
def test_connections_dropped_at_the_open_files_limit_are_logged_and_counted(served_artifact, tmp_path):
    """Past the descriptor limit a connection cannot be accepted and is dropped unanswered: each
    is counted, a log line says so (not one per connection), and the server goes on serving."""
    import resource

    limit = 192
    server = Server(
        served_artifact,
        tmp_path / "server.log",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    held: list[socket.socket] = []
    try:
        for _ in range(limit + 40):  # idle connections, each a descriptor in the server
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # an unfinished head holds the connection
            held.append(s)
        time.sleep(1.0)
        answers = []
        for s in held[-20:]:  # the last ones are past the ceiling: answered 503 and closed
            with contextlib.suppress(OSError):
                answers.append(s.recv(4096))
        assert answers and all(a.startswith(b"HTTP/1.1 503 ") and b"fd_limit" in a for a in answers), answers
        for s in held:
            s.close()
        held.clear()
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/readyz").status_code == 200  # still accepting
            text = client.get("/metrics").text
        dropped = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('detector_rejected_requests_total{reason="fd_limit"}')
        ]
        assert dropped and dropped[0] >= 1, text
    finally:
        for s in held:
            s.close()
        server.stop()
    log = (tmp_path / "server.log").read_text()
    lines = [line for line in log.splitlines() if "connections refused with 503" in line]
    assert len(lines) == 1, log[-3000:]  # one line for all of them (one per 10 s at most)


def test_a_refused_artifact_stops_the_server_only_when_nothing_could_replace_it(tmp_path):
    """``ssd serve --model broken.onnx`` with no poll and no reload token could never serve:
    it exits non-zero saying why. With SSD_MODEL_POLL_S set (the compose and Kubernetes case) a
    fixed file may come, so it stays up and says why on /readyz."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    argv = [sys.executable, "-c", NO_TORCH, "serve", "--model", str(broken), "--port", str(free_port())]
    env = {**os.environ, "SSD_PROVIDERS": "cpu", "SSD_DRAIN_S": "0", "SSD_MODEL_POLL_S": "0"}
    env.pop("SSD_ADMIN_TOKEN", None)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert (
        "INVALID_PROTOBUF" in done.stdout + done.stderr
        and "nothing can replace it" in done.stdout + done.stderr
    )

    server = Server(broken, tmp_path / "polled.log", SSD_MODEL_POLL_S="1", wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(server.url + "/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.process.poll() is None, "not serving"
                time.sleep(0.2)
        assert ready.status_code == 503 and "INVALID_PROTOBUF" in ready.json()["error"]["message"]
        assert ready.headers["retry-after"] == "5"
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


def test_invalid_settings_are_named_as_the_user_set_them(monkeypatch):
    """A bad setting is reported by its environment variable and the value given, one per line,
    and a bad combination by its own message: the user set SSD_*, not pydantic's field names."""
    from pydantic import ValidationError

    from service.server import settings_errors
    from service.settings import Settings

    monkeypatch.setenv("SSD_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("SSD_DRAIN_S", "soon")
    with pytest.raises(ValidationError) as caught:
        Settings()
    lines = settings_errors(caught.value).splitlines()
    assert len(lines) == 2
    assert lines[0].strip().startswith("SSD_MAX_BATCH_SIZE=0: ")
    assert lines[1].strip().startswith("SSD_DRAIN_S=soon: ")
    monkeypatch.delenv("SSD_MAX_BATCH_SIZE")
    monkeypatch.delenv("SSD_DRAIN_S")
    monkeypatch.setenv("SSD_MODEL_DIR", "/nonexistent-models")
    with pytest.raises(ValidationError) as caught:
        Settings(model_path="a.onnx")
    assert "not both" in settings_errors(caught.value)


def test_the_same_sigterm_twice_at_once_is_one_stop_and_still_drains(monkeypatch):
    """`uv run ssd serve` under a supervisor that signals the process group (systemd's default,
    `kill -TERM -PGID`): the server gets the SIGTERM twice within milliseconds, once from the
    supervisor and once forwarded by uv. That is one stop: it drains. A second SIGTERM a second
    or more later is an operator insisting: it skips the drain."""
    import types

    import uvicorn

    from service import server as serving

    clock = [100.0]
    monkeypatch.setattr(serving.time, "monotonic", lambda: clock[0])
    state = types.SimpleNamespace(draining=False)
    server = serving.DrainingServer(uvicorn.Config(app=lambda *a: None), 5.0, lambda: state)
    server.handle_exit(signal.SIGTERM, None)
    clock[0] += 0.003
    server.handle_exit(signal.SIGTERM, None)  # forwarded by uv
    assert state.draining and not server.should_exit and not server.force_exit
    assert server._captured_signals == [signal.SIGTERM]  # re-raised once: one "stopped" line
    clock[0] += serving.SAME_STOP_S
    server.handle_exit(signal.SIGTERM, None)  # insisted
    assert server.should_exit and not server.force_exit
    clock[0] += serving.SAME_STOP_S
    server.handle_exit(signal.SIGINT, None)  # and once more: no waiting for the work in progress
    assert server.force_exit
