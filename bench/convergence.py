"""``ssd bench train --convergence``: SSDlite320 from random initialisation on the synthetic set.

The training issue's figure: on ``ssd data synth`` (2000 training and 300 validation images),
ssdlite320_mobilenet_v3_large from random weights on this machine's CPU, validation mAP@0.5
against wall time (training and validation both counted), and where it stands at the time budget.
Generates the set when missing, trains through ``model.train`` (the real loop, progress bars and
all), then writes ``OUT/convergence.json`` with the curve; the run's ``curves.png`` is the plot.

    ssd bench train --convergence [--epochs 14] [--minutes 30] [--out runs/convergence]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.machine import machine_info

PROG = "ssd bench train --convergence"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--epochs", type=int, default=14, help="the schedule's length")
    parser.add_argument("--minutes", type=float, default=30.0, help="the time budget the goal is set in")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--precise-bn", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from model import train
    from model.data.synth import generate

    out = Path(args.out)
    data = out / "data"
    if not (data / "ImageSets").is_dir():
        generate(data, "voc", images=2000, val_images=300, seed=0)
    run = out / "run"
    if (run / "metrics.jsonl").exists():
        raise SystemExit(f"{run} holds an earlier run; remove it or give another --out")
    config = train.TrainConfig(
        model="ssdlite320_mobilenet_v3_large",
        data=str(data),
        out=str(run),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        precise_bn=args.precise_bn,
        workers=args.workers,
        seed=args.seed,
        device="cpu",
    )
    train.train(config)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [
        {
            "epoch": h["epoch"],
            "minutes": round(h["wall_time_s"] / 60, 1),
            "map50": round(h["val"]["map50"], 4),
        }
        for h in history
    ]
    within = [p for p in curve if p["minutes"] <= args.minutes]
    report = {
        "machine": machine_info(),
        "command": f"{PROG} " + " ".join(argv or []),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "curve": curve,
        f"map50_within_{args.minutes:g}_min": max((p["map50"] for p in within), default=None),
        "best_map50": max(p["map50"] for p in curve),
        "plot": str(run / "curves.png"),
    }
    (out / "convergence.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
