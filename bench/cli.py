"""``ssd bench``: one subcommand per benchmark (see each module's docstring for what it measures).

The serving benchmarks (serve, overload, soak) need only the serving install, plus the ``peers``
group for the peers; train, export and loss need torch (the default install).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); serving ones take parsed arguments, torch ones their own argv.
SERVING = {
    "serve": (
        "bench.serve",
        "the service under load: closed and open loop, beside the ONNX session and the peers",
    ),
    "overload": ("bench.overload", "open loop at twice capacity: fast 503s, bounded latency, flat memory"),
    "soak": ("bench.soak", "10 minutes at 70%% of capacity: no errors, no memory growth"),
    "slow-clients": (
        "bench.slow_clients",
        "slow-header and slow-body attackers: all cut on time, normal requests unharmed",
    ),
    "path": (
        "bench.request_path",
        "one /detect request's path: the service modules it crosses, and how often",
    ),
    "frontend": (
        "bench.frontend",
        "CPU per request by thread (event loop, decoding, inference), beside a bare endpoint",
    ),
    "drain": (
        "bench.drain",
        "SIGTERM under load: readiness 503, the listener's close, the last answer, the exit",
    ),
    "hostile": (
        "bench.hostile",
        "hostile inputs and clients beside normal load: the contract's answers, bounded memory",
    ),
}
TORCH = {
    "train": (
        "bench.train_bench",
        "training images/s against torchvision's step; --convergence: mAP against time",
    ),
    "export": (
        "bench.export_bench",
        "the artifact on ONNX Runtime against PyTorch eager; decoding + NMS share",
    ),
    "small-data": (
        "bench.small_data",
        "the training defaults on 400 images of shapes on real photos: mAP@0.5 per epoch",
    ),
    "loss": ("bench.loss_bench", "matching and MultiBox loss against torchvision's"),
    "eval": (
        "bench.eval_bench",
        "the evaluator's time per dataset (synthetic set, photos/) against an earlier tree's",
    ),
    "recall-by-size": (
        "bench.recall_by_size",
        "a checkpoint's recall by object size on a dataset: where mAP is lost",
    ),
    "decode-memory": (
        "bench.decode_memory",
        "peak memory of decoding one ~40-megapixel image per format: the decode budget's figures",
    ),
    "tiles": (
        "bench.tiles",
        "small objects in large photos: recall by size and mAP@0.5, tiled and not, beside SAHI",
    ),
    "parity": (
        "bench.parity",
        "torchvision exports against torchvision's own model on the photos of photos/",
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, (module, text) in SERVING.items():
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(bench_module=module)
        importlib.import_module(module).configure(p)
    for name, (module, text) in TORCH.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(bench_module=module, accepts_any=True)


def run(args: argparse.Namespace) -> int:
    if args.bench_command in SERVING:
        return importlib.import_module(args.bench_module).main(args)
    argv = args.argv[1:]  # after the benchmark's name
    if args.bench_command == "train" and "--convergence" in argv:
        argv.remove("--convergence")
        return importlib.import_module("bench.convergence").main(argv)
    try:
        module = importlib.import_module(args.bench_module)
    except ImportError as exc:
        print(f"ssd bench {args.bench_command}: needs the training install (uv sync): {exc}", file=sys.stderr)
        return 2
    return module.main(argv)
