"""What the serving benchmarks send and how one load point is measured.

The photos: the COCO val2017 photos of photos/ (real JPEGs of varied sizes and content; ``--images``
takes another folder), sent in turn. One measured point: a short untimed warm-up at the same pace,
then the load, with our /metrics read before and after (batch sizes) and the server's resident
memory after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen, machine
from bench.peers import PEERS
from bench.plots import plot_timeline
from bench.server import Server, ServerSettings, add_server_options, batch_sizes

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos" / "val2017"  # real photos, chosen by licence (photos/README.md)
FALLBACK = ROOT / "docs" / "images" / "demo_scene.jpg"


def photos(folder: Path | None = None, limit: int | None = None) -> tuple[list[bytes], str]:
    """The JPEG files of ``folder`` (default: photos/) as bytes, and where they came from."""
    folder = folder or PHOTOS
    files = sorted(folder.glob("*.jpg"))[:limit] if folder.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} photos from {folder}"
    if folder != PHOTOS:
        raise SystemExit(f"no .jpg files in {folder}")
    return [FALLBACK.read_bytes()], f"{FALLBACK} ({PHOTOS} is absent)"


@dataclass(frozen=True)
class Pace:
    """Closed loop at ``clients`` or open loop at ``rate`` requests/s."""

    clients: int | None = None
    rate: float | None = None

    def describe(self) -> dict[str, float]:
        return (
            {"concurrency": self.clients} if self.clients is not None else {"rate": round(self.rate or 0, 1)}
        )


def with_query(request: bytes, query: str) -> bytes:
    """``request`` (raw HTTP/1.1) with ``query`` added to its request line's path."""
    line, rest = request.split(b"\r\n", 1)
    method, target, version = line.split(b" ")
    joiner = b"&" if b"?" in target else b"?"
    return b" ".join((method, target + joiner + query.encode(), version)) + b"\r\n" + rest


def measure(
    server: Server,
    images: list[bytes],
    pace: Pace,
    seconds: float,
    warmup: float = 3.0,
    timeout_ms: float | None = None,
) -> tuple[dict[str, object], loadgen.Result]:
    """One load point against ``server``: summary (throughput, latency, errors, batches, memory).
    ``timeout_ms``: every request carries that deadline (ours only: peers have no such parameter)."""
    requests = tuple(server.peer.request(image, server.port) for image in images)
    if timeout_ms is not None:
        if server.peer.name != "ours":
            raise ValueError(f"{server.peer.name} takes no per-request deadline")
        requests = tuple(with_query(r, f"timeout_ms={timeout_ms:g}") for r in requests)

    grpc = server.peer.grpc_method
    if timeout_ms is not None and grpc:
        raise ValueError("--timeout-ms is for HTTP requests")

    def load(duration: float) -> loadgen.Load:
        return loadgen.Load(
            port=server.grpc_port if grpc else server.port,
            host=server.host,
            grpc_method=grpc,
            requests=requests,
            seconds=duration,
            clients=pace.clients,
            rate=pace.rate,
        )

    if warmup > 0:
        loadgen.run(load(warmup))
    before = server.metrics()
    result = loadgen.run(load(seconds))
    summary = pace.describe() | loadgen.summarize(result) | batch_sizes(before, server.metrics())
    rss = server.rss_bytes()
    if rss is not None:
        summary["rss_mb"] = round(rss / 2**20, 1)
    return summary, result


def capacity(
    peer: object,
    artifact: Path | None,
    settings: ServerSettings,
    env: dict[str, str],
    images: list[bytes],
    seconds: float,
    url: str | None = None,
) -> float:
    """Images/s at saturation: closed loop with enough clients to keep every batch full, on a
    server of its own."""
    with Server(peer, artifact, settings, url=url, env=env) as server:
        summary, _ = measure(server, images, Pace(clients=2 * settings.max_batch), seconds)
    return float(summary["images_per_s"])  # type: ignore[arg-type]


class MemorySampler:
    """Samples the server's resident memory every ``every`` seconds while the block runs."""

    def __init__(self, server: Server, every: float = 1.0) -> None:
        import threading

        self.server, self.every = server, every
        self.samples: list[tuple[float, int]] = []  # (seconds from the start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        origin = time.monotonic()
        while not self._stop.is_set():
            rss = self.server.rss_bytes()
            if rss is not None:
                self.samples.append((time.monotonic() - origin, rss))
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self, settle: float) -> dict[str, float]:
        """Resident memory after ``settle`` seconds, at the end, its peak, and the growth in between."""
        settled = [b for t, b in self.samples if t >= settle] or [b for _, b in self.samples]
        if not settled:
            return {}
        first, last, peak = settled[0], settled[-1], max(settled)
        return {
            "rss_start_mb": round(first / 2**20, 1),
            "rss_end_mb": round(last / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1),
            "rss_growth": round((last - first) / first, 4),
            "rss_peak_growth": round((peak - first) / first, 4),
        }


def timeline(result: loadgen.Result, bucket: float, memory: MemorySampler | None = None) -> dict[str, list]:
    """Per-``bucket``-seconds series of a run: answered, rejected and failed rates, latency, memory."""
    import numpy as np

    edges = np.arange(0.0, result.elapsed + bucket, bucket)
    series: dict[str, list] = {
        k: [] for k in ("t", "ok_per_s", "rejected_per_s", "failed_per_s", "p50_ms", "p99_ms")
    }
    for lo, hi in itertools.pairwise(edges):
        inside = (result.started >= lo) & (result.started < hi)
        status, latency = result.status[inside], result.latency[inside]
        ok = latency[status == 200]
        series["t"].append(float(hi))
        series["ok_per_s"].append(float(ok.size / bucket))
        series["rejected_per_s"].append(float((status == 503).sum() / bucket))
        series["failed_per_s"].append(float(((status != 200) & (status != 503)).sum() / bucket))
        series["p50_ms"].append(float(np.quantile(ok, 0.5) * 1000) if ok.size else float("nan"))
        series["p99_ms"].append(float(np.quantile(ok, 0.99) * 1000) if ok.size else float("nan"))
    if memory is not None:
        series["rss_t"] = [t for t, _ in memory.samples]
        series["rss_mb"] = [b / 2**20 for _, b in memory.samples]
    return series


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options overload and soak share: what to load, how capacity is known, where reports go."""
    parser.add_argument("--model", default="models/demo.onnx")
    parser.add_argument("--url", default=None, help="a running service instead of starting one")
    parser.add_argument(
        "--images", default=None, help="folder of JPEG photos (default: photos/val2017, the repository's own)"
    )
    parser.add_argument("--capacity", type=float, default=None, help="images/s; default: measured first")
    parser.add_argument(
        "--measure-seconds",
        type=float,
        default=20.0,
        help="length of the capacity (and unloaded) measurement",
    )
    parser.add_argument(
        "--max-queue", type=int, default=None, help="SSD_MAX_QUEUE_SIZE (default: the service's)"
    )
    parser.add_argument(
        "--timeout-ms", type=float, default=None, help="every request's deadline (default: the service's)"
    )
    add_server_options(parser)
    parser.add_argument("--out", default="runs/bench")


def admission_env(args: argparse.Namespace) -> dict[str, str]:
    """The service's admission settings: its defaults unless told otherwise (the serving sweep
    raises the queue bound so that the load, not the bound, decides; overload and soak must not)."""
    from service.settings import Settings

    env = {"SSD_MAX_QUEUE_SIZE": str(args.max_queue or Settings.model_fields["max_queue_size"].default)}
    return env


def write_report(out: Path, name: str, report: dict, title: str) -> None:
    """``OUT/NAME.json``, ``OUT/NAME.png`` (the run over time) and a one-line summary on stdout."""
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    image = plot_timeline(report["timeline"], f"{title}, {report['machine']['cpu']}", out / f"{name}.png")
    print(json.dumps({k: v for k, v in report.items() if k not in ("timeline", "machine")}))
    written = f"{out / name}.json" + (f" and {image}" if image else "")
    print(f"ssd bench {name}: wrote {written}", file=sys.stderr)


@dataclass
class LoadRun:
    """What overload and soak share before their load: the photos, our server's settings and
    admission environment, the report folder, the capacity the load is a multiple of, and the
    report's header naming all of them."""

    settings: ServerSettings
    images: list[bytes]
    artifact: Path | None
    url: str | None
    out: Path
    env: dict[str, str]
    peak: float
    header: dict

    @classmethod
    def prepare(cls, args: argparse.Namespace) -> LoadRun:
        settings = ServerSettings(args.max_batch, args.max_delay_ms, args.threads)
        images, source = photos(Path(args.images) if args.images else None)
        artifact = Path(args.model).resolve() if not args.url else None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = admission_env(args)
        peak = args.capacity or capacity(
            PEERS["ours"], artifact, settings, env, images, args.measure_seconds, args.url
        )
        header = {
            "machine": machine.machine_info(),
            "command": "ssd bench " + " ".join(sys.argv[2:]),
            "artifact": str(artifact or args.url),
            "photos": source,
            "settings": vars(settings) | {"server_env": env},
            "capacity_images_per_s": peak,
        }
        return cls(settings, images, artifact, args.url, out, env, peak, header)

    def server(self, name: str) -> Server:
        """Our service as the load will see it, logging to ``OUT/NAME-server.log``."""
        return Server(
            PEERS["ours"],
            self.artifact,
            self.settings,
            url=self.url,
            log=self.out / f"{name}-server.log",
            env=self.env,
        )
