"""``ssd bench overload``: open-loop load at twice capacity; what cannot be taken must be refused fast.

1. Capacity: closed loop with enough clients to keep every batch full (or ``--capacity``).
2. Unloaded p99: open loop at half of capacity, where nothing waits beyond the batching window.
3. Overload: open loop at ``--factor`` x capacity for ``--seconds``, memory sampled every second.

The goals: requests beyond capacity answered 503 quickly, accepted requests' p99 under twice the
unloaded p99, memory flat. Writes ``OUT/overload.json`` and ``OUT/overload.png`` (the run over time).

    ssd bench overload [--model models/demo.onnx | --url URL] [--factor 2] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
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


def main(args: argparse.Namespace) -> int:
    settings = ServerSettings(args.max_batch, args.max_delay_ms, args.threads)
    images, source = photos(Path(args.images) if args.images else None)
    artifact = Path(args.model).resolve() if not args.url else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = admission_env(args)
    peak = args.capacity or capacity(
        PEERS["ours"], artifact, settings, env, images, args.measure_seconds, args.url
    )
    with Server(
        PEERS["ours"], artifact, settings, url=args.url, log=out / "overload-server.log", env=env
    ) as server:
        unloaded, _ = measure(server, images, Pace(rate=0.5 * peak), args.measure_seconds)
        print(
            f"ssd bench overload: capacity {peak} images/s; at half: {json.dumps(unloaded)}", file=sys.stderr
        )
        with MemorySampler(server, every=1.0) as memory:
            loaded, result = measure(server, images, Pace(rate=args.factor * peak), args.seconds, warmup=0)
        series = timeline(result, 1.0, memory)
    answered = loaded["p99_ms"]
    report = {
        "machine": machine.machine_info(),
        "command": "ssd bench " + " ".join(sys.argv[2:]),
        "artifact": str(artifact or args.url),
        "photos": source,
        "settings": vars(settings) | {"server_env": env},
        "capacity_images_per_s": peak,
        "unloaded": unloaded,
        "overload": loaded | {"offered_per_s": round(args.factor * peak, 1)} | memory.growth(settle=5.0),
        "accepted_p99_over_unloaded_p99": round(answered / unloaded["p99_ms"], 2),
        "timeline": series,
    }
    write_report(
        out,
        "overload",
        report,
        f"overload: {args.factor}x capacity ({report['overload']['offered_per_s']} requests/s offered) "
        f"for {args.seconds:.0f} s",
    )
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--seconds", type=float, default=60.0)
