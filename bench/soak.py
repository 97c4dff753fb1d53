"""``ssd bench soak``: a long open-loop run at 70% of capacity: no errors, memory that does not grow.

Capacity is measured first (closed loop, every batch full) unless ``--capacity`` gives it. Memory
growth is counted from the end of the first minute (allocator pools, ONNX Runtime's arenas and the
photos' first decodes settle by then) to the end of the run. Writes ``OUT/soak.json`` and
``OUT/soak.png`` (rates, latency and memory in 10-second steps).

    ssd bench soak [--model models/demo.onnx | --url URL] [--minutes 10] [--fraction 0.7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import machine
from bench.peers import PEERS
from bench.server import Server, ServerSettings
from bench.workload import (
    MemorySampler,
    Pace,
    add_load_options,
    admission_env,
    capacity,
    measure,
    photos,
    timeline,
    write_report,
)

SETTLE_S = 60.0


def main(args: argparse.Namespace) -> int:
    settings = ServerSettings(args.max_batch, args.max_delay_ms, args.threads)
    images, source = photos(Path(args.images) if args.images else None)
    artifact = Path(args.model).resolve() if not args.url else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    env = admission_env(args)
    peak = args.capacity or capacity(
        PEERS["ours"], artifact, settings, env, images, args.measure_seconds, args.url
    )
    with Server(
        PEERS["ours"], artifact, settings, url=args.url, log=out / "soak-server.log", env=env
    ) as server:
        with MemorySampler(server, every=5.0) as memory:
            summary, result = measure(server, images, Pace(rate=args.fraction * peak), seconds, warmup=0)
        series = timeline(result, 10.0, memory)
    errors = sum(summary["errors"].values())
    report = {
        "machine": machine.machine_info(),
        "command": "ssd bench " + " ".join(sys.argv[2:]),
        "artifact": str(artifact or args.url),
        "photos": source,
        "settings": vars(settings) | {"server_env": env},
        "capacity_images_per_s": peak,
        "offered_per_s": round(args.fraction * peak, 1),
        "minutes": args.minutes,
        "soak": summary | memory.growth(settle=min(SETTLE_S, seconds / 4)),
        "errors": errors,
        "timeline": series,
    }
    write_report(
        out,
        "soak",
        report,
        f"soak: {args.fraction:.0%} of capacity ({report['offered_per_s']} requests/s) for "
        f"{args.minutes:g} min",
    )
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--fraction", type=float, default=0.7, help="offered load as a fraction of capacity")
    parser.add_argument("--minutes", type=float, default=10.0)
