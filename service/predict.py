"""``ssd predict FILE.onnx IMAGE_OR_FOLDER... [--out DIR]``: run an artifact on image files with
ONNX Runtime alone (no torch) and write annotated images and JSON. The quickest look at a model.
A folder is walked (sorted, recursively) for files with an image extension; a file named on the
command line is read whatever its name."""

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


# What a folder is walked for: the extensions of the formats the service decodes (formats.py).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx artifact")
    parser.add_argument("images", nargs="+", help="image files, or folders to walk for them")
    parser.add_argument("--out", default=None, help="write IMAGE.jpg with boxes and predictions.json here")
    parser.add_argument(
        "--score-threshold",
        type=_unit_interval,
        default=None,
        help=f"keep detections scoring at least this, from the artifact's own threshold to 1 "
        f"(default {DEFAULT_SCORE_THRESHOLD}, or the artifact's threshold if that is higher)",
    )
    parser.add_argument("--providers", default="cpu", help="e.g. cuda,cpu (default cpu)")


def image_files(arguments: list[str]) -> list[tuple[Path, Path]]:
    """Each image to read and the name of its annotated copy under ``--out``: a file as given
    (its own name), a folder's images with their path inside it (so that two ``x.jpg`` in two
    subfolders stay apart). Raises FileNotFoundError naming an argument that is neither."""
    found: list[tuple[Path, Path]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += [(p, p.relative_to(path).with_suffix(".jpg")) for p in files]
        elif path.exists():
            found.append((path, Path(path.stem + ".jpg")))
        else:
            raise FileNotFoundError(f"{argument}: no such file or folder")
    taken: set[Path] = set()
    named = []
    for source, name in found:  # the same name from two arguments: the second gets a number
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = name.with_name(f"{name.stem}-{n}{name.suffix}")
        taken.add(unique)
        named.append((source, unique))
    return named


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
    try:
        named = image_files(args.images)
    except FileNotFoundError as exc:
        print(f"ssd predict: {exc}", file=sys.stderr)
        return 2
    if not named:
        print(f"ssd predict: no images in {', '.join(args.images)}", file=sys.stderr)
        return 2
    paths = [source for source, _ in named]
    results = detect_files(detector, paths, threshold)
    info = detector.info
    report = {
        "model": {"name": info.name, "version": info.version, "sha256": info.sha256},
        "results": results,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for (path, name), result in zip(named, results, strict=True):
            if "error" not in result:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                draw(path, result["detections"], out / name)
        (out / "predictions.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"ssd predict: {r['filename']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
