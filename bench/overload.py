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

from bench.workload import (
    LoadRun,
    MemorySampler,
    Pace,
    add_load_options,
    measure,
    timeline,
    write_report,
)


def main(args: argparse.Namespace) -> int:
    run = LoadRun.prepare(args)
    images, peak = run.images, run.peak
    with run.server("overload") as server:
        unloaded, _ = measure(server, images, Pace(rate=0.5 * peak), args.measure_seconds)
        print(
            f"ssd bench overload: capacity {peak} images/s; at half: {json.dumps(unloaded)}", file=sys.stderr
        )
        with MemorySampler(server, every=1.0) as memory:
            loaded, result = measure(
                server,
                images,
                Pace(rate=args.factor * peak),
                args.seconds,
                warmup=0,
                timeout_ms=args.timeout_ms,
            )
        series = timeline(result, 1.0, memory)
    answered = loaded["p99_ms"]
    report = run.header | {
        "unloaded": unloaded,
        "overload": loaded | {"offered_per_s": round(args.factor * peak, 1)} | memory.growth(settle=5.0),
        "accepted_p99_over_unloaded_p99": round(answered / unloaded["p99_ms"], 2),
        "timeline": series,
    }
    write_report(
        run.out,
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
