"""``ssd bench soak``: a long open-loop run at 70% of capacity: no errors, memory that does not grow.

Capacity is measured first (closed loop, every batch full) unless ``--capacity`` gives it. Memory
growth is counted from the end of the first minute (allocator pools, ONNX Runtime's arenas and the
photos' first decodes settle by then) to the end of the run. Writes ``OUT/soak.json`` and
``OUT/soak.png`` (rates, latency and memory in 10-second steps).

    ssd bench soak [--model models/demo.onnx | --url URL] [--minutes 10] [--fraction 0.7]
"""

from __future__ import annotations

import argparse

from bench.workload import (
    LoadRun,
    MemorySampler,
    Pace,
    add_load_options,
    measure,
    timeline,
    write_report,
)

SETTLE_S = 60.0


def main(args: argparse.Namespace) -> int:
    run = LoadRun.prepare(args)
    seconds = args.minutes * 60
    with run.server("soak") as server, MemorySampler(server, every=5.0) as memory:
        pace = Pace(rate=args.fraction * run.peak)
        summary, result = measure(server, run.images, pace, seconds, warmup=0, timeout_ms=args.timeout_ms)
    series = timeline(result, 10.0, memory)
    errors = sum(summary["errors"].values())
    report = run.header | {
        "offered_per_s": round(args.fraction * run.peak, 1),
        "minutes": args.minutes,
        "soak": summary | memory.growth(settle=min(SETTLE_S, seconds / 4)),
        "errors": errors,
        "timeline": series,
    }
    write_report(
        run.out,
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
