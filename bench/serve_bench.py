"""The service under load against the ONNX session's own throughput, batching on and off.

1. The limit: the artifact's ONNX Runtime session alone, batch 8, on already-decoded inputs,
   with the service's session settings (same threads, spinning off): images/s.
2. ``ssd serve`` in a subprocess, driven by N concurrent closed-loop clients posting one real
   JPEG (raw body), for a fixed time: images/s, p50/p90/p99/max latency, errors, and the batch
   sizes from /metrics. Once with the default batching (SSD_MAX_BATCH_SIZE=8), once without (1).

The load generator is a separate process speaking HTTP/1.1 over asyncio streams with the request
bytes built once: a fraction of a core, where an HTTP client library would take the service's CPU.

    uv run python bench/serve_bench.py ARTIFACT.onnx [--image PHOTO.jpg] [--clients 16]
        [--seconds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(
    port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(status)
    finally:
        writer.close()


def load(port: int, body: bytes, clients: int, seconds: float, out: multiprocessing.Queue) -> None:
    request = (
        f"POST /detect HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors: list[int] = []

    async def main() -> float:
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(*(_client(port, request, stop_at, latencies, errors) for _ in range(clients)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    out.put({"elapsed": elapsed, "latencies": latencies, "errors": errors})


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def batch_histogram(before: str, after: str) -> dict[str, int]:
    """Batches per batch-size bucket during the run: {"<=1": n, "<=2": n, ...}, empty ones left out."""

    def cumulative(text: str) -> dict[str, float]:
        found = re.findall(r'detector_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)
        return {le: float(v) for le, v in found}

    b, a = cumulative(before), cumulative(after)
    out, previous = {}, 0.0
    for le in a:
        total = a[le] - b.get(le, 0.0)
        if total - previous:
            out[f"<={le.removesuffix('.0')}"] = int(total - previous)
        previous = total
    return out


def serve_run(
    artifact: Path, body: bytes, clients: int, seconds: float, threads: int, max_batch: int
) -> dict:
    port = free_port()
    env = {
        **os.environ,
        "SSD_PROVIDERS": "cpu",
        "SSD_INTRA_OP_THREADS": str(threads),
        "SSD_MAX_BATCH_SIZE": str(max_batch),
        "SSD_MAX_QUEUE_SIZE": "256",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--model", str(artifact), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        # Warm-up: a few seconds of the same load, not counted.
        queue: multiprocessing.Queue = multiprocessing.Queue()
        warm = multiprocessing.Process(target=load, args=(port, body, clients, 3.0, queue))
        warm.start()
        queue.get()
        warm.join()
        before = scrape(port)
        runner = multiprocessing.Process(target=load, args=(port, body, clients, seconds, queue))
        runner.start()
        result = queue.get()
        runner.join()
        after = scrape(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    lat = sorted(result["latencies"])
    batches = metric(after, "detector_batch_size_count") - metric(before, "detector_batch_size_count")
    images = metric(after, "detector_batch_size_sum") - metric(before, "detector_batch_size_sum")
    q = np.quantile(lat, [0.5, 0.9, 0.99]) if lat else [float("nan")] * 3
    return {
        "max_batch_size": max_batch,
        "images_per_s": round(len(lat) / result["elapsed"], 1),
        "p50_ms": round(q[0] * 1000, 1),
        "p90_ms": round(q[1] * 1000, 1),
        "p99_ms": round(q[2] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1) if lat else None,
        "errors": len(result["errors"]),
        "mean_batch_size": round(images / batches, 2) if batches else None,
        "batches_by_size": batch_histogram(before, after),
    }


def session_throughput(artifact: Path, threads: int, batch: int, seconds: float) -> float:
    sys.path.insert(0, str(ROOT))
    from service.artifact import Detector
    from service.images import decode

    detector = Detector(artifact, providers=["cpu"], intra_op_threads=threads)
    photo = decode(Path(ARGS.image).read_bytes(), detector.info.input_size, 10**9).pixels
    images = np.stack([photo] * batch)
    for _ in range(3):
        detector.run(images)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        detector.run(images)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    default_image = COCO / "000000018575.jpg"  # a 640x480 COCO val2017 photo
    parser.add_argument("--image", default=str(default_image))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json")
    global ARGS
    ARGS = args = parser.parse_args()
    artifact = Path(args.artifact).resolve()
    body = Path(args.image).read_bytes()
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_name

    limit = session_throughput(artifact, args.threads, 8, min(args.seconds, 15))
    print(f"ONNX session alone, batch 8: {limit:.1f} images/s", file=sys.stderr)
    runs = []
    for max_batch in (8, 1):
        run = serve_run(artifact, body, args.clients, args.seconds, args.threads, max_batch)
        run["of_session_throughput"] = round(run["images_per_s"] / limit, 3)
        print(json.dumps(run), file=sys.stderr)
        runs.append(run)
    report = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
        "artifact": str(artifact),
        "image": args.image,
        "clients": args.clients,
        "seconds": args.seconds,
        "session_images_per_s_batch8": round(limit, 1),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
