"""The exported artifact against torchvision's own SSD, on real photos.

For each torchvision model (``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large``): random weights
in COCO's layout (91 classes, background included; batch-norm statistics from synthetic scenes,
so the scores vary), saved as a state dict and given to ``ssd export --torchvision NAME
--weights-file``, as a user would. COCO_V1 weights cannot be downloaded here; with 91 classes and
random weights every default box of every class is a candidate, the hardest case for the
post-processing. Then the photos of photos/ (the repository's own COCO photos), decoded and resized as the
service does, go through the artifact (ONNX Runtime, CPU) and through torchvision's model with
the same thresholds, 8 at a time, and every detection is matched one to one (export/verify.py's
rule: same label, boxes and scores within 1e-4, ties aside).

    ssd bench parity [--models ssd300_vgg16] [--json runs/bench/parity.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import emit, machine_info
from export import verify
from export.calibrated import random_model
from export.exporter import ExportOptions, export_artifact
from export.sources import from_torchvision
from model.registry import TORCHVISION_MODELS
from service.images import decode

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos" / "val2017"  # photos/README.md


def photos(input_size: tuple[int, int], folder: Path = PHOTOS) -> np.ndarray:
    """The JPEGs of ``folder`` as the service feeds them to the model: uint8 [N, H, W, 3]."""
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no photos in {folder}")
    return np.stack([decode(p.read_bytes(), input_size, 100_000_000).pixels for p in paths])


def parity(name: str, folder: Path = PHOTOS, batch: int = 8) -> dict:
    model = random_model(name, num_classes=91, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.save(model.state_dict(), weights)
        source = from_torchvision(name, weights)
        started = time.perf_counter()
        artifact = export_artifact(source, Path(tmp) / "model.onnx", ExportOptions())
        export_s = time.perf_counter() - started
        sess = verify.session(artifact.path)
        reference = source.reference(ExportOptions().config)
        images = photos(model.input_size, folder)
        report = verify.Report(batch_sizes=[batch])
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            ref, got = reference(chunk), verify.run(sess, chunk)
            for i in range(len(chunk)):
                where = f"photo {start + i}"
                verify.compare_image(
                    ref.image(i), got.image(i), verify.BOX_ATOL, verify.SCORE_ATOL, 0.01, where, report
                )
    result = {
        "model": name,
        "classes": 90,
        "photos": len(images),
        "detections_compared": report.detections,
        "mismatches": len(report.problems),
        "ties": report.excused,
        "max_box_error": report.max_box_error,
        "max_score_error": report.max_score_error,
        "export_s": round(export_s, 1),
        "export_check": artifact.report.summary() if artifact.report else None,
    }
    print(result, file=sys.stderr)
    for problem in report.problems[:5]:
        print("  ", problem, file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd bench parity", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TORCHVISION_MODELS), choices=TORCHVISION_MODELS)
    parser.add_argument(
        "--images", type=Path, default=PHOTOS, help="folder of JPEG photos (default: photos/val2017)"
    )
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    report = {"machine": machine_info(), "results": [parity(name, args.images) for name in args.models]}
    emit(report, args.json)
    return 1 if any(r["mismatches"] for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
