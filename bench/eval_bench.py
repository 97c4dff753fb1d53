"""Wall time of whole ``ssd evaluate`` runs, for one or more code trees (before/after a change).

Two cases, their inputs made here when missing:

- ``synth``: the 300 validation images of the synthetic set (6 classes) with a 1-epoch SSDlite
  checkpoint, ``ssd data synth --out data/synth --images 2000 --val-images 300 --seed 0`` and
  ``ssd train --model ssdlite320_mobilenet_v3_large --data data/synth --epochs 1 --batch-size 16
  --workers 1 --out runs/eval-1epoch`` (3 to 5 minutes on 2 cores);
- ``coco``: COCO photos with their instances file (``--coco``, default
  photos/instances_val2017.json, the repository's ten; the figures in docs/benchmarks.md were
  made on 79 COCO val2017 photos passed the same way) with an SSDlite of their 80 categories
  (81 classes with the background): random weights, batch-norm statistics from synthetic
  scenes, so that most scores sit above the 0.01 threshold as an untrained network's do (32,000
  NMS candidates per image), saved in ``ssd train``'s checkpoint format.

Each tree runs ``python -c 'import cli; cli.main()' evaluate ...`` from its own folder with this
interpreter (one virtual environment for all, so only the code differs); rounds alternate the
trees, so that the load of a shared machine falls on all of them alike, and the best of
``--repeat`` rounds counts. Prints one JSON line: seconds per tree and case, whether every tree
printed the same metrics, the load average around each run, the machine.

    ssd bench eval [--roots /tmp/before .] [--repeat 2] [--cases synth coco] [--coco FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ssdlite320_mobilenet_v3_large"
COCO = ROOT / "photos" / "instances_val2017.json"  # photos/README.md
SYNTH = ROOT / "data" / "synth"
SYNTH_CHECKPOINT = ROOT / "runs" / "eval-1epoch" / "best.pt"
COCO_CHECKPOINTS = ROOT / "runs" / "eval-bench"


def _ssd(root: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """``ssd ARGS`` with the code of ``root`` and this interpreter."""
    env = os.environ | {"PYTHONPATH": str(root)}
    command = [sys.executable, "-c", "import cli; cli.main()", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=capture, text=True, check=False)


def make_synth_checkpoint() -> Path:
    if not (SYNTH / "ImageSets").is_dir():
        synth = ["data", "synth", "--images", "2000", "--val-images", "300", "--seed", "0"]
        _ssd(ROOT, *synth, "--out", str(SYNTH), capture=False).check_returncode()
    if not SYNTH_CHECKPOINT.is_file():
        train = f"train --model {MODEL} --epochs 1 --batch-size 16 --workers 1".split()
        out = ["--data", str(SYNTH), "--out", str(SYNTH_CHECKPOINT.parent)]
        _ssd(ROOT, *train, *out, capture=False).check_returncode()
    return SYNTH_CHECKPOINT


def make_coco_checkpoint(instances: Path, seed: int = 0) -> Path:
    """The random SSDlite of the instances file's classes (export/calibrated.py ``random_model``),
    made once per class list."""
    from model.data import open_dataset

    classes = open_dataset(instances, "val").classes
    digest = hashlib.sha256(json.dumps(classes).encode()).hexdigest()[:8]
    checkpoint = COCO_CHECKPOINTS / f"coco-{len(classes)}-{digest}-ssdlite.pt"
    if checkpoint.is_file():
        return checkpoint
    from export.calibrated import random_model
    from model.checkpoint import atomic_save

    model = random_model(MODEL, len(classes) + 1, seed)
    state = {"model": model.state_dict(), "model_name": MODEL, "num_classes": len(classes) + 1}
    atomic_save(state | {"classes": classes, "scale_set": None, "epoch": 0, "metrics": {}}, checkpoint)
    return checkpoint


CASES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "synth": lambda args: [
        *("--checkpoint", str(make_synth_checkpoint()), "--data", str(SYNTH), "--split", "val")
    ],
    "coco": lambda args: [
        *("--checkpoint", str(make_coco_checkpoint(Path(args.coco))), "--data", args.coco, "--split", "val")
    ],
}

# Times select_detections of the tree it runs in (on PYTHONPATH) on saved decoded outputs.
TIME_SELECT = """
import sys, time, torch
from model.postprocess import select_detections
scores, boxes = torch.load(sys.argv[1])
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    select_detections(scores, boxes)
    times.append(time.perf_counter() - start)
print(min(times))
"""


def decoded_batch(checkpoint: str, data: str, path: Path, batch: int = 32) -> dict:
    """Scores and boxes of the first ``batch`` images, saved to ``path``; what they hold."""
    import torch

    from model import PostprocessConfig
    from model.checkpoint import load_model
    from model.data import open_dataset
    from model.postprocess import decode_outputs
    from model.transforms import collate, eval_transforms

    model, _ = load_model(checkpoint)
    dataset = open_dataset(data, "val", transform=eval_transforms(model.input_size))
    images = collate([dataset[i] for i in range(min(batch, len(dataset)))])[0]
    with torch.no_grad():
        scores, boxes = decode_outputs(*model(images), model.priors)
    torch.save((scores, boxes), path)
    config = PostprocessConfig()
    above = (scores > config.score_threshold).sum(dim=1).clamp(max=config.topk_candidates)
    return {
        "batch": len(images),
        "classes": scores.shape[2],
        "candidates_per_image": int(above.sum()) // len(images),
    }


def time_postprocess(roots: list[Path], case_args: list[str], repeat: int) -> dict:
    """Seconds of one select_detections call on a batch of 32 of the case, per tree (best of
    ``repeat`` after one untimed call)."""
    options = dict(zip(case_args[::2], case_args[1::2], strict=True))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "decoded.pt"
        report = decoded_batch(options["--checkpoint"], options["--data"], path)
        report["seconds"] = {}
        for root in roots:
            env = os.environ | {"PYTHONPATH": str(root)}
            command = [sys.executable, "-c", TIME_SELECT, str(path), str(repeat + 1)]
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
            report["seconds"][str(root)] = round(float(done.stdout.strip().splitlines()[-1]), 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd bench eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--roots", nargs="+", default=[str(ROOT)], help="code trees to time (default: this one)"
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--coco",
        default=str(COCO),
        help="the coco case's instances JSON, its images beside it (default: photos/)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best counts (default 2)")
    parser.add_argument(
        "--postprocess", action="store_true", help="also time select_detections alone on a batch of 32"
    )
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in args.roots]
    report: dict = {
        "benchmark": "ssd evaluate wall time",
        "command": " ".join(["ssd bench eval", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "cases": {},
    }
    for case in args.cases:
        evaluate_args = ["evaluate", *CASES[case](args)]
        if args.postprocess:
            report.setdefault("postprocess", {})[case] = time_postprocess(
                roots, evaluate_args[1:], args.repeat
            )
        runs: dict[str, dict] = {str(r): {"seconds": [], "load": [], "metrics": set()} for r in roots}
        for _ in range(args.repeat):
            for root in roots:
                load = os.getloadavg()[0]
                start = time.perf_counter()
                done = _ssd(root, *evaluate_args)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"ssd evaluate failed in {root} ({case})")
                metrics = done.stdout.strip().splitlines()[-1]
                run = runs[str(root)]
                run["seconds"].append(round(seconds, 1))
                run["load"].append([round(load, 2), round(os.getloadavg()[0], 2)])
                run["metrics"].add(hashlib.sha256(metrics.encode()).hexdigest()[:12])
                run["map"] = json.loads(metrics)["map"]
        for run in runs.values():
            run["best"] = min(run["seconds"])
        every_metrics = set().union(*(run.pop("metrics") for run in runs.values()))
        report["cases"][case] = {
            "args": evaluate_args,
            "same_metrics": len(every_metrics) == 1,
            "roots": runs,
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
