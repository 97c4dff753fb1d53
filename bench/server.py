"""A server under test: started as a subprocess (ours or a peer) or reached at a URL, and read.

What the benchmarks read from it: its /metrics (batch sizes, resident memory) and, when it runs
here, its resident memory straight from /proc, which costs the server nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass(frozen=True)
class ServerSettings:
    """The batching and threading every server under test gets, ours and the peers alike."""

    max_batch: int = 8
    max_delay_ms: float = 5.0
    threads: int = os.cpu_count() or 2


class Server:
    """``with Server(peer, artifact, settings) as server:`` runs it on a free port until the block ends."""

    def __init__(
        self,
        peer: object,  # bench.peers.Peer
        artifact: Path | None,
        settings: ServerSettings,
        url: str | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.peer, self.artifact, self.settings, self.log = peer, artifact, settings, log
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        if url:
            parts = urlsplit(url)
            self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        else:
            self.host, self.port = "127.0.0.1", free_port()
        # Where a peer asked over gRPC listens for it (SSD_GRPC_PORT for ours).
        self.grpc_port = free_port() if getattr(peer, "grpc_method", None) else None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Server:
        if self.artifact is not None and self.process is None and self.host == "127.0.0.1":
            if not self.artifact.exists():
                # The service would wait for the file to appear (a retrain job may write it later);
                # a benchmark would only time out, so it is refused here by name.
                raise FileNotFoundError(f"no model artifact at {self.artifact}")
            argv, env = self.peer.command(
                self.artifact,
                self.port,
                self.settings.max_batch,
                self.settings.max_delay_ms,
                self.settings.threads,
            )
            if self.grpc_port is not None:
                env = {**env, "SSD_GRPC_PORT": str(self.grpc_port)}
            output = open(self.log, "wb") if self.log else subprocess.DEVNULL
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **env, **self.extra_env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that stopping it stops the workers it started too
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.peer.name} exited with {self.process.returncode} before it was ready"
                    + (f"; see {self.log}" if self.log else "")
                )
            try:
                if get(self.base + self.peer.ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.peer.name} at {self.base} was not ready within {timeout:.0f} s")

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server and every process it started (None when not ours to read)."""
        if self.process is None:
            text = self.metrics()
            found = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M) if text else None
            return int(float(found.group(1))) if found else None
        total = 0
        for pid in _process_tree(self.process.pid):
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def metrics(self) -> str:
        """The Prometheus text of our /metrics ('' for a peer without it)."""
        try:
            status, body = get(self.base + "/metrics")
        except OSError:
            return ""
        return body.decode() if status == 200 else ""


def _process_tree(root: int) -> list[int]:
    """``root`` and every process below it (BentoML's workers sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # The command name may hold spaces: the parent pid follows its closing parenthesis.
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in Prometheus text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def batch_sizes(before: str, after: str) -> dict[str, object]:
    """Batches run between two scrapes of our /metrics: their mean size and how many of each size."""
    if not before or not after:
        return {}

    def cumulative(text: str) -> dict[str, float]:
        # Summed over the models served (their label sets), bucket by bucket.
        total: dict[str, float] = {}
        for labels, value in re.findall(r"^detector_batch_size_bucket\{([^}]*)\} (\S+)$", text, re.M):
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                total[le.group(1)] = total.get(le.group(1), 0.0) + float(value)
        return total

    b, a = cumulative(before), cumulative(after)
    histogram, previous = {}, 0.0
    for le in a:
        total = a[le] - b.get(le, 0.0)
        if total - previous:
            histogram[f"<={le.removesuffix('.0')}"] = int(total - previous)
        previous = total
    batches = metric_sum(after, "detector_batch_size_count") - metric_sum(before, "detector_batch_size_count")
    images = metric_sum(after, "detector_batch_size_sum") - metric_sum(before, "detector_batch_size_sum")
    return {"mean_batch_size": round(images / batches, 2) if batches else None, "batches_by_size": histogram}


def add_server_options(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="inference threads")
