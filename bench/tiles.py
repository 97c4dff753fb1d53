"""``ssd bench tiles``: small objects in large photos, tiled and not, beside the SAHI library.

The set is built here from a recipe (its canvases are not committed: some background photos are
ShareAlike): each canvas is a photo of photos/ cropped and scaled to 1920x1080, with the demo
model's six shapes pasted on it, 24 small ones of 12 to 96 px (the nominal size; the ground truth
is the drawn shape's box) and 2 large ones of 240 to 480 px, none overlapping. The same seed, the
same set.

Three ways to run the demo model on every canvas, each timed per image from the file's bytes to
the merged detections, in this process, on the same ONNX Runtime session:

- ``untiled``: the service's default, the whole image at the model's input size;
- ``tiled``: the service's ``tile=auto`` (service/tiling.py: tiles of the input size, 20%
  overlap, plus the whole image, merged by greedy non-maximum merging);
- ``tiled, NMS`` and ``tiled, greedy merging``: the same tiles merged by per-class NMS (IoU
  0.45), and by SAHI's greedy merging of every nested box: what the service's merging of cut
  parts was measured against;
- ``tiled 160x160``: tiles of half the input size, so that the network sees objects enlarged
  (120 tiles on these canvases: ``SSD_MAX_TILES_PER_IMAGE`` would have to allow them);
- ``sahi``: SAHI's ``get_sliced_prediction`` around the same artifact, with SAHI's own slicing,
  the same tile size and overlap, its standard prediction on, and its default merging (greedy
  NMM, intersection over the smaller, 0.5): what users bolt on in front of a server. Needs the
  ``peers`` group (``uv sync --group peers``); skipped, and said, without it.

Reported: recall at IoU 0.5 (same class) by object size, mAP@0.5 over the set, duplicates (a
box of a class mostly inside another of that class: one object counted twice), the seconds per
image and images/s, all at one score threshold (``--score-threshold``, default 0.3: SAHI merges
in Python every box above it, and at the artifact's floor of 0.01 that is thousands a slice).

    ssd bench tiles [--images 12] [--seed 0] [--photos DIR] [--out runs/bench/tiles] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bench.machine import emit, machine_info

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos" / "val2017"  # photos/README.md
DEMO = ROOT / "models" / "demo.onnx"
CANVAS = (1920, 1080)
SMALL, LARGE = (12, 96), (240, 480)
BUCKETS = ((0, 24), (24, 40), (40, 64), (64, 96), (96, math.inf))  # sqrt of the box area, px
MAX_TILES = 32  # the service's default SSD_MAX_TILES_PER_IMAGE


def build(out: Path, photos: Path, images: int, seed: int, classes: list[str]) -> Path:
    """Write ``images`` canvases and their COCO ``instances.json`` to ``out``; returns the JSON."""
    from model.data.synth import shape_vertices

    backgrounds = sorted(p for p in photos.glob("*.jpg"))
    if not backgrounds:
        raise SystemExit(f"ssd bench tiles: no photos in {photos}")
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    records["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    for index in range(images):
        rng = np.random.default_rng([seed, index])
        with Image.open(backgrounds[index % len(backgrounds)]) as photo:
            canvas = _cover(photo.convert("RGB"), CANVAS)
        pen = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float, float]] = []
        sizes = [float(rng.uniform(*SMALL)) for _ in range(24)] + [
            float(rng.uniform(*LARGE)) for _ in range(2)
        ]
        for size in sizes:
            for _ in range(50):  # a free place, or the shape is left out
                label = int(rng.integers(len(classes)))
                centre = (
                    float(rng.uniform(size, CANVAS[0] - size)),
                    float(rng.uniform(size, CANVAS[1] - size)),
                )
                vertices = shape_vertices(
                    label, centre, size, float(rng.uniform(0.8, 1.25)), float(rng.uniform(0, 2 * math.pi))
                )
                box = (*vertices.min(axis=0), *vertices.max(axis=0))
                if all(_iou(box, other) == 0 and not _near(box, other) for other in placed):
                    break
            else:
                continue
            placed.append(box)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            pen.polygon([tuple(v) for v in vertices], fill=colour, outline=(0, 0, 0))
            x0, y0, x1, y1 = (float(v) for v in box)
            records["annotations"].append({
                "id": len(records["annotations"]) + 1, "image_id": index + 1, "category_id": label + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })  # fmt: skip
        name = f"canvas_{index:03d}.jpg"
        canvas.save(out / name, quality=92)
        records["images"].append(
            {"id": index + 1, "file_name": name, "width": CANVAS[0], "height": CANVAS[1]}
        )
    path = out / "instances.json"
    path.write_text(json.dumps(records))
    return path


def _cover(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``photo`` scaled to cover ``size`` and cropped to it, centred."""
    scale = max(size[0] / photo.width, size[1] / photo.height)
    resized = photo.resize(
        (math.ceil(photo.width * scale), math.ceil(photo.height * scale)), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - size[0]) // 2, (resized.height - size[1]) // 2
    return resized.crop((left, top, left + size[0], top + size[1]))


def _iou(a: Any, b: Any) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _near(a: Any, b: Any, gap: float = 8.0) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


# --- The three ways -------------------------------------------------------------------------------


def ours(
    detector: Any, data: bytes, tiling: Any, floor: float, max_tiles: int = MAX_TILES, how: str = "fragments"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The service's own path (``ssd predict --tile``'s): boxes in pixels, scores, labels."""
    from service.predict import detect_image

    image, found = detect_image(detector, data, floor, tiling, max_tiles, how)
    return found.select(image.width, image.height, floor)


def sahi_model(detector: Any, threshold: float) -> Any:
    """SAHI's detection model around our artifact: each slice resized to the input size as the
    service resizes it, run by the same session."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction

    height, width = detector.info.input_size

    class Ours(DetectionModel):
        def load_model(self) -> None:
            self.set_model(detector)

        def set_model(self, model: Any, **kwargs: Any) -> None:
            self.model = model
            self.category_mapping = {str(i): name for i, name in enumerate(model.info.classes)}

        def perform_inference(self, image: np.ndarray) -> None:
            pixels = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            self._original_predictions = (self.model.detect(pixels[None])[0], image.shape[1], image.shape[0])

        def _create_object_prediction_list_from_original_predictions(
            self, shift_amount_list: Any = ((0, 0),), full_shape_list: Any = None
        ) -> None:
            found, w, h = self._original_predictions
            # SAHI passes [x, y] or [[x, y]] (and [h, w] or [[h, w]]), by version and path.
            shift = list(
                np.asarray(shift_amount_list if shift_amount_list is not None else [0, 0]).reshape(-1)[:2]
            )
            full = None if full_shape_list is None else list(np.asarray(full_shape_list).reshape(-1)[:2])
            boxes, scores, labels = found.select(w, h, self.confidence_threshold)
            names = self.category_mapping
            self._object_prediction_list_per_image = [
                [
                    ObjectPrediction(
                        bbox=box.tolist(),
                        category_id=int(label),
                        category_name=names[str(int(label))],
                        shift_amount=shift,
                        score=float(score),
                        full_shape=full,
                    )
                    for box, score, label in zip(boxes, scores, labels, strict=True)
                ]
            ]

    return Ours(confidence_threshold=threshold, load_at_init=True)


def sahi(model: Any, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sahi.predict import get_sliced_prediction

    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = model.model.info.input_size
    guard = Image.MAX_IMAGE_PIXELS
    try:
        result = get_sliced_prediction(
            image,
            model,
            slice_height=height,
            slice_width=width,
            overlap_height_ratio=0.2,
            overlap_width_ratio=0.2,
            perform_standard_pred=True,
            postprocess_type="GREEDYNMM",
            postprocess_match_metric="IOS",
            postprocess_match_threshold=0.5,
            verbose=0,
        )
    finally:
        Image.MAX_IMAGE_PIXELS = guard  # SAHI turns Pillow's decompression-bomb guard off, for good
    found = result.object_prediction_list
    boxes = np.array([p.bbox.to_xyxy() for p in found], np.float32).reshape(-1, 4)
    return (
        boxes,
        np.array([p.score.value for p in found], np.float32),
        np.array([p.category.id for p in found], np.int64),
    )


# --- Scores ---------------------------------------------------------------------------------------


def recall_by_size(truth: list[dict], found: list[tuple]) -> dict[str, dict[str, float]]:
    """Per size bucket (sqrt of the box's area, px): objects, found at IoU >= 0.5 with their class
    (each detection matched once, in score order)."""
    counts = {f"{lo}-{hi}" if hi != math.inf else f"{lo}+": [0, 0] for lo, hi in BUCKETS}
    for gt, (boxes, scores, labels) in zip(truth, found, strict=True):
        taken = np.zeros(len(scores), dtype=bool)
        order = np.argsort(-scores)
        for box, label in zip(gt["boxes"], gt["labels"], strict=True):
            side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
            key = next(
                k
                for k, (lo, hi) in zip(counts, BUCKETS, strict=True)
                if lo <= side < hi or (hi == math.inf and side >= lo)
            )
            counts[key][0] += 1
            for i in order:
                if not taken[i] and labels[i] == label and _iou(box, boxes[i]) >= 0.5:
                    taken[i] = True
                    counts[key][1] += 1
                    break
    return {k: {"objects": n, "recall": round(hit / n, 3) if n else None} for k, (n, hit) in counts.items()}


def duplicates(found: list[tuple]) -> int:
    """Boxes of one class lying mostly inside another of that class (intersection over the
    smaller at least 0.5): the same object counted twice, where a tile edge cut it."""
    count = 0
    for boxes, _, labels in found:
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if labels[i] != labels[j]:
                    continue
                a, b = boxes[i], boxes[j]
                w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                count += int(smaller > 0 and w * h / smaller >= 0.5)
    return int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd bench tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="canvases to build (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--photos", type=Path, default=PHOTOS, help="background photos (default photos/val2017)"
    )
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "tiles")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--no-sahi", action="store_true", help="leave SAHI out")
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)

    from model.evaluation import evaluate
    from service.artifact import Detector

    detector = Detector(args.model, ("cpu",))
    classes = list(detector.info.classes)
    instances = build(args.out, args.photos, args.images, args.seed, classes)
    records = json.loads(instances.read_text())
    files = [args.out / image["file_name"] for image in records["images"]]
    truth = [{"boxes": [], "labels": []} for _ in files]
    for ann in records["annotations"]:
        x, y, w, h = ann["bbox"]
        truth[ann["image_id"] - 1]["boxes"].append([x, y, x + w, y + h])
        truth[ann["image_id"] - 1]["labels"].append(ann["category_id"] - 1)
    from service.tiling import Tiling

    auto, small = Tiling(True, None, 0.2), Tiling(False, (160, 160), 0.2)
    ways: dict[str, Any] = {
        "untiled": lambda data: ours(detector, data, None, args.score_threshold),
        "tiled": lambda data: ours(detector, data, auto, args.score_threshold),
        # The same tiles merged the two other ways (service/tiling.py, merge).
        "tiled, NMS": lambda data: ours(detector, data, auto, args.score_threshold, how="nms"),
        "tiled, greedy merging": lambda data: ours(detector, data, auto, args.score_threshold, how="nmm"),
        # Tiles half the input: the network sees objects twice as large, at four times the
        # tiles (past the service's default cap: SSD_MAX_TILES_PER_IMAGE raised to allow it).
        "tiled 160x160": lambda data: ours(detector, data, small, args.score_threshold, 4 * MAX_TILES + 8),
    }
    skipped = None
    if not args.no_sahi:
        try:
            model = sahi_model(detector, args.score_threshold)
            ways["sahi"] = lambda data: sahi(model, data)
        except ImportError as exc:
            skipped = f"SAHI is not installed ({exc}): uv sync --group peers"
            print(f"ssd bench tiles: {skipped}", file=sys.stderr)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "command": "ssd bench tiles " + " ".join(argv if argv is not None else sys.argv[3:]),
        "images": len(files),
        "objects": len(records["annotations"]),
        "score_threshold": args.score_threshold,
        "sahi_skipped": skipped,
        "ways": {},
    }
    blobs = [f.read_bytes() for f in files]
    for name, run in ways.items():
        run(blobs[0])  # warm: the session's first batches of each shape
        found, seconds = [], []
        for data in blobs:
            started = time.perf_counter()
            found.append(run(data))
            seconds.append(time.perf_counter() - started)
        ground = [
            {"boxes": np.array(t["boxes"], np.float32).reshape(-1, 4), "labels": np.array(t["labels"])}
            for t in truth
        ]
        predicted = [{"boxes": b, "scores": s, "labels": c} for b, s, c in found]
        metrics = evaluate(ground, predicted, classes)
        report["ways"][name] = {
            "recall_by_size": recall_by_size(truth, found),
            "map50": round(metrics["map50"], 3),
            "duplicates": duplicates(found),
            "seconds_per_image": round(float(np.median(seconds)), 3),
            "images_per_s": round(len(seconds) / sum(seconds), 2),
        }
        print(name, json.dumps(report["ways"][name]), file=sys.stderr)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
