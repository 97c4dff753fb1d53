"""``ssd predict FILE.onnx IMAGE... [--out DIR]``: run an artifact on image files with ONNX
Runtime alone (no torch) and write annotated images and JSON. The quickest look at a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from .artifact import ArtifactError, Detector
from .images import ImageError, decode

MAX_PIXELS = 100_000_000
DEFAULT_SCORE_THRESHOLD = 0.5

# Distinct, readable colours for class ids (Tableau 10).
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN included
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx artifact")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", default=None, help="write IMAGE.jpg with boxes and predictions.json here")
    parser.add_argument(
        "--score-threshold",
        type=_unit_interval,
        default=None,
        help=f"keep detections scoring at least this, from the artifact's own threshold to 1 "
        f"(default {DEFAULT_SCORE_THRESHOLD}, or the artifact's threshold if that is higher)",
    )
    parser.add_argument("--providers", default="cpu", help="e.g. cuda,cpu (default cpu)")


def detect_files(detector: Detector, paths: list[Path], score_threshold: float) -> list[dict[str, Any]]:
    info = detector.info
    results = []
    for path in paths:
        try:
            image = decode(path.read_bytes(), info.input_size, MAX_PIXELS)
        except (OSError, ImageError) as exc:
            results.append({"filename": str(path), "error": str(exc)})
            continue
        found = detector.detect(image.pixels[None])[0]
        detections = found.to_json(image.width, image.height, score_threshold)
        results.append(
            {"filename": str(path), "width": image.width, "height": image.height, "detections": detections}
        )
    return results


def draw(path: Path, detections: list[dict[str, Any]], out: Path) -> None:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    pen = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    for d in detections:
        colour = PALETTE[d["class_id"] % len(PALETTE)]
        x1, y1, x2, y2 = d["box"]
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        lift = bottom - top + 2
        pen.rectangle((x1, y1 - lift, x1 + right - left + 4, y1), fill=colour)
        pen.text((x1 + 2, y1 - lift), text, fill=(255, 255, 255))
    image.save(out, quality=90)


def run(args: argparse.Namespace) -> int:
    try:
        detector = Detector(args.model, providers=args.providers.split(","))
    except (ArtifactError, ValueError) as exc:
        print(f"ssd predict: {exc}", file=sys.stderr)
        return 2
    try:  # before any image is read: the artifact has already dropped lower scores
        threshold = detector.info.threshold(args.score_threshold, DEFAULT_SCORE_THRESHOLD)
    except ValueError as exc:
        print(f"ssd predict: {exc}", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.images]
    results = detect_files(detector, paths, threshold)
    info = detector.info
    report = {
        "model": {"name": info.name, "version": info.version, "sha256": info.sha256},
        "results": results,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path, result in zip(paths, results, strict=True):
            if "error" not in result:
                draw(path, result["detections"], out / f"{path.stem}.jpg")
        (out / "predictions.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"ssd predict: {r['filename']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
