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

import numpy as np
from PIL import Image, ImageOps

from .artifact import ArtifactError, Detections, Detector
from .drawing import draw, encode
from .errors import APIError
from .images import Decoded, ImageError, finish, open_image
from .tiling import Tiling, merge_passes

MAX_PIXELS = 100_000_000
DEFAULT_SCORE_THRESHOLD = 0.5


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
    parser.add_argument(
        "--tile",
        default="off",
        help="tiled inference, as the service's tile: auto (tiles of the model's input size), off "
        "(default), or WIDTHxHEIGHT; for small objects in large photos",
    )
    parser.add_argument("--tile-overlap", type=float, default=0.2, help="the tiles' overlap (default 0.2)")
    parser.add_argument(
        "--max-tiles", type=int, default=32, help="the most tiles per image (default 32, as the service's)"
    )


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


def detect_image(
    detector: Detector,
    data: bytes,
    threshold: float,
    tiling: Tiling | None = None,
    max_tiles: int = 32,
    how: str = "fragments",
) -> tuple[Decoded, Detections]:
    """One image file's bytes, decoded as the service decodes them (with ``tiling``, at full
    resolution and cut into tiles), and its detections (merged over its tiles, ``how``:
    service/tiling.py's ``merge``). Raises ImageError, and APIError for a grid past ``max_tiles``."""
    size = detector.info.input_size
    opened = open_image(data, size, MAX_PIXELS, draft=tiling is None)
    try:
        rects = tuple(tiling.grid(opened.width, opened.height, size, max_tiles)) if tiling else ()
    except APIError:
        opened.close()
        raise
    image = finish(opened, size, MAX_PIXELS, rects)
    passes = detector.detect(np.stack(image.inputs()))
    if not rects:
        return image, passes[0]
    return image, merge_passes(passes, rects, image.width, image.height, threshold, how)


def detect_files(
    detector: Detector,
    paths: list[Path],
    score_threshold: float,
    tiling: Tiling | None = None,
    max_tiles: int = 32,
) -> list[dict[str, Any]]:
    """Each file's answer as ``/detect`` gives it (with ``tiling``, its tiles too), or its error."""
    results = []
    for path in paths:
        try:
            image, found = detect_image(detector, path.read_bytes(), score_threshold, tiling, max_tiles)
        except (OSError, ImageError, APIError) as exc:
            results.append({"filename": str(path), "error": getattr(exc, "message", None) or str(exc)})
            continue
        result = {
            "filename": str(path),
            "width": image.width,
            "height": image.height,
            "detections": found.to_json(image.width, image.height, score_threshold),
        }
        if tiling is not None:
            result["tiles"] = [list(r) for r in image.rects]
        results.append(result)
    return results


def draw_file(path: Path, result: dict[str, Any], out: Path) -> None:
    """The image of ``path`` (EXIF-oriented) with its answer drawn, written to ``out``."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    out.write_bytes(encode(draw(image, result["detections"], result.get("tiles", ())), "image/jpeg"))


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
    try:
        tiling = Tiling.parse(args.tile, args.tile_overlap, "off", 0.2)
    except APIError as exc:
        print(f"ssd predict: --{exc.message.replace('_', '-')}", file=sys.stderr)
        return 2
    paths = [source for source, _ in named]
    results = detect_files(detector, paths, threshold, tiling, args.max_tiles)
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
                draw_file(path, result, out / name)
        (out / "predictions.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"ssd predict: {r['filename']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
