"""``ssd bench small-data``: what the training defaults reach on a small dataset of one's own.

The set: shapes (three classes: circle, square, triangle) drawn on real photographs, the photos/
backgrounds (the repository's own COCO photos; ``--photos`` takes a larger folder), 400 training
and 100 validation images, objects 10-60% of the image side, written as a YOLO dataset
(``data.yaml``), the form a new user most often brings. Validation images are drawn on photos
that no training image uses.

Each run is ``ssd train --model ssdlite320_mobilenet_v3_large --data OUT/data/data.yaml
--epochs 30 --seed S`` plus the run's own flags (none for ``defaults``), from random weights, in
a process of its own (``--jobs`` at a time, the cores shared out between them). The report
(``OUT/small_data.json``) gives each configuration's validation mAP@0.5 per epoch, mean over the
seeds, and its final and best; ``OUT/curves.png`` plots them.

    ssd bench small-data                                    # the defaults, seeds 0 and 1
    ssd bench small-data --runs defaults "lr=0.1:--lr 0.1" "bs32:--batch-size 32" --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.machine import machine_info

PROG = "ssd bench small-data"
PHOTOS = Path(__file__).resolve().parents[1] / "photos" / "val2017"  # photos/README.md
CLASSES = ("circle", "square", "triangle")
MODEL = "ssdlite320_mobilenet_v3_large"


def build(out: Path, photos: Path, train: int = 400, val: int = 100, seed: int = 0) -> Path:
    """Write the set to ``out`` (a YOLO dataset) and return its ``data.yaml``.

    Every fifth photo (by name) is a validation background, the rest training ones. Each image
    is a random crop of a background (50-100% of each side), its long side 416 px, with 1 to 6
    shapes of 10-60% of its shorter side (the synthetic set's drawing: shaded, partly hidden,
    colours kept apart from what is under them).
    """
    from model.data.synth import render
    from model.data.yolo import YoloWriter

    names = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(names) < 10:
        raise SystemExit(f"{PROG}: needs at least 10 photos in {photos} (found {len(names)})")
    backgrounds = {"val": names[::5], "train": [p for i, p in enumerate(names) if i % 5]}
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    writer = YoloWriter(tmp, CLASSES)
    for code, (split, count) in enumerate((("train", train), ("val", val))):
        for index in range(count):
            rng = np.random.default_rng([seed, code, index])
            with Image.open(backgrounds[split][int(rng.integers(len(backgrounds[split])))]) as photo:
                photo = photo.convert("RGB")
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = photo.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scale = 416 / max(cw, ch)
            size = (max(1, round(ch * scale)), max(1, round(cw * scale)))  # height, width
            sample = render(rng, size, max_objects=6, background=crop, sizes=(0.1, 0.6), classes=len(CLASSES))
            writer.add(split, f"{split}_{index:04d}", sample.image, sample.objects())
    writer.finish()
    tmp.rename(out)
    return out / "data.yaml"


def _run(name: str, flags: list[str], seed: int, data: Path, out: Path, epochs: int, threads: int) -> Path:
    run = out / "runs" / f"{name}-s{seed}"
    if _finished(run, epochs):
        return run  # done before: a report can be rebuilt without training again
    command = [
        sys.executable, "-m", "cli", "train", "--model", MODEL, "--data", str(data),
        "--epochs", str(epochs), "--seed", str(seed), "--out", str(run), *flags,
    ]  # fmt: skip
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with open(run.with_suffix(".log"), "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        started = time.perf_counter()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        log.write(f"exit {code} after {time.perf_counter() - started:.0f} s\n")
    if code:
        raise SystemExit(
            f"{PROG}: run {name} seed {seed} failed (exit {code}); see {run.with_suffix('.log')}"
        )
    return run


def _finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs


def _curve(run: Path) -> list[float]:
    return [json.loads(line)["val"]["map50"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/small-data")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["defaults"],
        metavar="NAME[:FLAGS]",
        help='configurations: "defaults", or a name and ssd train flags, e.g. "lr0.1:--lr 0.1"',
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (the cores are shared out)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs of --runs, any seed",
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    data = out / "data" / "data.yaml"
    if not data.exists():
        if not args.photos.is_dir():
            raise SystemExit(f"{PROG}: no photos at {args.photos} (--photos)")
        build(out / "data", args.photos)
    configs = {}
    for spec in args.runs:
        name, _, flags = spec.partition(":")
        configs[name] = shlex.split(flags)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.report_only:
        jobs, runs = [], []
        for name, flags in configs.items():
            for run in sorted((out / "runs").glob(f"{name}-s*")):
                if run.is_dir() and run.name[len(name) + 2 :].isdigit() and _finished(run, args.epochs):
                    jobs.append((name, flags, int(run.name[len(name) + 2 :])))
                    runs.append(run)
    else:
        jobs = [(name, flags, seed) for name, flags in configs.items() for seed in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda j: _run(*j, data, out, args.epochs, threads), jobs))

    results = {}
    for name in configs:
        curves = [_curve(run) for (n, _, _), run in zip(jobs, runs, strict=True) if n == name]
        mean = [statistics.fmean(values) for values in zip(*curves, strict=True)]
        if not curves:
            continue
        results[name] = {
            "flags": shlex.join(configs[name]),
            "seeds": [seed for n, _, seed in jobs if n == name],
            "final_map50_per_seed": [round(c[-1], 4) for c in curves],
            "final_map50": round(mean[-1], 4),
            "best_map50": round(max(mean), 4),
            "map50_by_epoch": [round(v, 4) for v in mean],
        }
    report = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join([*PROG.split(), *(argv if argv is not None else sys.argv[1:])]),
        "model": MODEL,
        "epochs": args.epochs,
        "results": results,
    }
    (out / "small_data.json").write_text(json.dumps(report, indent=2))
    _plot(results, out / "curves.png")
    for name, r in results.items():
        print(f"{name:>16}: final mAP@0.5 {r['final_map50']:.3f} (seeds {r['final_map50_per_seed']}), "
              f"best {r['best_map50']:.3f}")  # fmt: skip
    print(f"report: {out / 'small_data.json'}, curves: {out / 'curves.png'}")
    return 0


def _plot(results: dict, path: Path) -> None:
    from bench.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        curve = r["map50_by_epoch"]
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} ({r['final_map50']:.3f})")
    ax.set(xlabel="epoch", ylabel="validation mAP@0.5 (mean of seeds)", ylim=(0, 1), title="Small dataset")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
