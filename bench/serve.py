"""``ssd bench serve``: the service under load, beside the ONNX session's own limit and the peers.

In one run, on the same machine, artifact, photos and load:

1. The limit: the artifact's ONNX Runtime session alone at the service's batch size on already
   decoded photos, with the service's session settings; and what decoding costs per photo.
2. Each server (ours, then each peer: BentoML with adaptive batching, Triton through PyTriton),
   started with the same batch size, batching delay and threads: a closed-loop sweep over client
   counts, then (ours) an open-loop sweep at fixed fractions of its peak rate. For every point:
   images/s, p50/p90/p99/max latency, errors, the batch sizes from /metrics, resident memory.
3. Peers compared by throughput at equal or better p99: for a peer's best point, our highest
   throughput among our points whose p99 is no worse, divided by the peer's.

Writes ``OUT/serve.json`` and ``OUT/serve.png`` (throughput and p99 against concurrency).

    ssd bench serve [--model models/demo.onnx | --url http://host:8000] [--peers bentoml pytriton]
        [--concurrency 1 2 4 8 16 32 64] [--seconds 15] [--runs 1] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.peers import PEERS
from bench.plots import plot_sweep
from bench.server import Server, ServerSettings, add_server_options
from bench.workload import Pace, measure, photos


def session_limit(artifact: Path, images: list[bytes], settings: ServerSettings, seconds: float) -> dict:
    """Images/s of the artifact's session alone at ``max_batch``, and decoding's cost per photo."""
    from service.artifact import Detector
    from service.images import decode

    detector = Detector(artifact, providers=["cpu"], intra_op_threads=settings.threads)
    size = detector.info.input_size
    started = time.perf_counter()
    decoded = [decode(image, size, 10**9).pixels for image in images]
    decode_ms = (time.perf_counter() - started) / len(images) * 1000
    batch = np.stack([decoded[i % len(decoded)] for i in range(settings.max_batch)])
    for _ in range(3):
        detector.run(batch)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        detector.run(batch)
        runs += 1
    return {
        "session_images_per_s": round(runs * settings.max_batch / (time.perf_counter() - started), 1),
        "batch": settings.max_batch,
        "decode_ms_per_photo": round(decode_ms, 2),
    }


def sweep(
    server: Server,
    images: list[bytes],
    concurrency: list[int],
    seconds: float,
    open_loop: list[float] = (),
    timeout_ms: float | None = None,
) -> dict[str, list[dict]]:
    """Closed loop at each client count; then open loop at each fraction of the closed-loop peak.
    ``timeout_ms``: every request's deadline (ours over HTTP only)."""
    closed = []
    for clients in concurrency:
        summary, _ = measure(server, images, Pace(clients=clients), seconds, timeout_ms=timeout_ms)
        print(f"  {server.peer.name} {json.dumps(summary)}", file=sys.stderr)
        closed.append(summary)
    opened = []
    peak = max((float(p["images_per_s"]) for p in closed), default=0.0)
    for fraction in open_loop:
        summary, _ = measure(server, images, Pace(rate=fraction * peak), seconds, timeout_ms=timeout_ms)
        summary["fraction_of_peak"] = fraction
        print(f"  {server.peer.name} {json.dumps(summary)}", file=sys.stderr)
        opened.append(summary)
    return {"closed_loop": closed, "open_loop": opened}


def at_equal_p99(ours: list[dict], theirs: list[dict]) -> dict[str, object] | None:
    """Our throughput at equal or better p99 than the peer's best point, as a ratio to it."""
    valid = [p for p in theirs if p["ok"]]
    if not valid:
        return None
    best = max(valid, key=lambda p: p["images_per_s"])
    candidates = [p for p in ours if p["ok"] and p["p99_ms"] <= best["p99_ms"]]
    if not candidates:
        return {"peer_images_per_s": best["images_per_s"], "peer_p99_ms": best["p99_ms"], "ratio": 0.0}
    mine = max(candidates, key=lambda p: p["images_per_s"])
    return {
        "peer_images_per_s": best["images_per_s"],
        "peer_p99_ms": best["p99_ms"],
        "peer_concurrency": best["concurrency"],
        "ours_images_per_s": mine["images_per_s"],
        "ours_p99_ms": mine["p99_ms"],
        "ours_concurrency": mine["concurrency"],
        "ratio": round(mine["images_per_s"] / best["images_per_s"], 2),
    }


def median_sweep(runs: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """One sweep from several of the same server: at each point the run of median images/s, with
    the median of each latency percentile across runs and every run's images/s kept beside."""
    if len(runs) == 1:
        return runs[0]
    merged: dict[str, list[dict]] = {}
    for kind in ("closed_loop", "open_loop"):
        merged[kind] = []
        for points in zip(*(run[kind] for run in runs), strict=True):
            ranked = sorted(points, key=lambda p: p["images_per_s"])
            point = dict(ranked[len(ranked) // 2])
            for key in ("p50_ms", "p90_ms", "p99_ms"):
                point[key] = round(float(np.median([p[key] for p in points])), 1)
            point["images_per_s_runs"] = [p["images_per_s"] for p in points]
            merged[kind].append(point)
    return merged


def point_by_point(servers: dict[str, dict], peers: list[str], ours: str = "ours") -> list[dict[str, object]]:
    """At each client count: our images/s over the best peer's, and both p99s."""
    rows = []
    for index, mine in enumerate(servers[ours]["closed_loop"]):
        theirs = [(name, servers[name]["closed_loop"][index]) for name in peers]
        theirs = [(name, p) for name, p in theirs if p["ok"]]
        row: dict[str, object] = {
            "concurrency": mine["concurrency"],
            "ours_images_per_s": mine["images_per_s"],
            "ours_p99_ms": mine["p99_ms"],
        }
        if theirs:
            name, best = max(theirs, key=lambda item: item[1]["images_per_s"])
            row.update(
                best_peer=name,
                peer_images_per_s=best["images_per_s"],
                peer_p99_ms=best["p99_ms"],
                ratio=round(mine["images_per_s"] / best["images_per_s"], 3),
            )
        rows.append(row)
    return rows


def available_peers(names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The peers to run and, for those left out, why."""
    wanted = [p for p in PEERS if not p.startswith("ours")] if names is None else names
    run, skipped = [], {}
    for name in wanted:
        if name == "ours":
            continue
        if name not in PEERS:
            known = ", ".join(p for p in PEERS if not p.startswith("ours"))
            raise SystemExit(f"unknown peer {name!r}; known: {known}")
        reason = PEERS[name].unavailable()
        if reason:
            skipped[name] = reason
        else:
            run.append(name)
    return run, skipped


def main(args: argparse.Namespace) -> int:
    settings = ServerSettings(args.max_batch, args.max_delay_ms, args.threads)
    images, source = photos(Path(args.images) if args.images else None)
    artifact = Path(args.model).resolve() if args.model else None
    peers, skipped = available_peers(None if args.peers is None else [p for p in args.peers if p != "none"])
    if args.url and peers:
        print("ssd bench serve: --url measures that one server; peers left out", file=sys.stderr)
        peers = []
    report: dict = {
        "machine": machine.machine_info(),
        "command": "ssd bench " + " ".join(sys.argv[2:]),
        "artifact": str(artifact or args.url),
        "photos": source,
        "settings": vars(settings),
        "seconds_per_point": args.seconds,
        "peers_skipped": skipped,
    }
    if artifact is not None:
        report["limit"] = session_limit(artifact, images, settings, min(args.seconds, 10))
        print(f"ssd bench serve: limit {json.dumps(report['limit'])}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Runs interleave (ours, each peer, ours again, ...) so that a machine whose speed drifts
    # drifts under every server alike.
    ours = [PROTOCOLS[p] for p in args.protocol]
    runs: dict[str, list[dict]] = {name: [] for name in [*ours, *peers]}
    for _ in range(args.runs):
        for name in runs:
            with Server(PEERS[name], artifact, settings, url=args.url, log=out / f"{name}.log") as server:
                fractions = args.open_loop if name == ours[0] else []
                deadline = args.timeout_ms if PEERS[name].grpc_method is None and name in ours else None
                runs[name].append(sweep(server, images, args.concurrency, args.seconds, fractions, deadline))
    report["runs"] = args.runs
    report["servers"] = {name: median_sweep(sweeps) for name, sweeps in runs.items()}
    report["point_by_point"] = point_by_point(report["servers"], [*ours[1:], *peers], ours[0])
    if len(ours) > 1:
        report["protocols"] = {name: point_by_point(report["servers"], [name], ours[0]) for name in ours[1:]}
    ours = report["servers"][ours[0]]["closed_loop"]
    if "limit" in report:
        best = max(p["images_per_s"] for p in ours)
        report["ours_of_session_limit"] = round(best / report["limit"]["session_images_per_s"], 3)
    report["versus_peers"] = {
        name: at_equal_p99(ours, report["servers"][name]["closed_loop"]) for name in peers
    }
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    image = plot_sweep(report, out / "serve.png")
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("limit", "ours_of_session_limit", "versus_peers", "point_by_point")
                if k in report
            }
        )
    )
    print(
        f"ssd bench serve: wrote {out / 'serve.json'}" + (f" and {image}" if image else ""), file=sys.stderr
    )
    return 0


# How ours is asked (--protocol): the server names of bench/peers.
PROTOCOLS = {"detect": "ours", "oip-rest": "ours-oip-rest", "oip-grpc": "ours-oip-grpc"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/demo.onnx", help="the artifact every server loads")
    parser.add_argument("--url", default=None, help="measure a running service instead of starting one")
    parser.add_argument(
        "--images", default=None, help="folder of JPEG photos (default: photos/val2017, the repository's own)"
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=None,
        help="peers beside ours (default: every installed one; none: no peer)",
    )
    parser.add_argument(
        "--protocol",
        nargs="+",
        choices=list(PROTOCOLS),
        default=["detect"],
        help="how ours is asked: POST /detect, the OIP over REST (binary tensors) or gRPC; the first "
        "is the one compared with the peers",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument(
        "--open-loop",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75, 0.9],
        help="fractions of our peak rate",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="per load point, after a 3 s warm-up")
    parser.add_argument(
        "--timeout-ms",
        type=float,
        default=None,
        help="every request's deadline (ours over HTTP; peers have none)",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="sweeps per server, interleaved; each point is their median"
    )
    add_server_options(parser)
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON report and the plot")
