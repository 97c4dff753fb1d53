"""Detection metrics: COCO mAP (through pycocotools) and the Pascal VOC 2007 11-point mAP.

``evaluate`` takes plain per-image records (numpy arrays or torch tensors, boxes ``x_min, y_min,
x_max, y_max`` in pixels, 0-based class ids) and returns what ``ssd evaluate`` prints and what
training logs after each epoch::

    {"map": float,        # COCO AP@[.5:.95], area "all", 100 detections
     "map50": float,      # COCO AP@.5
     "map75": float,      # COCO AP@.75
     "voc07_map": float,  # Pascal VOC 2007 11-point AP@.5
     "per_class": {name: {"ap": float | None, "ap50": float | None, "voc07_ap": float | None,
                          "num_gt": int, "num_detections": int}}}

Conventions (read these before comparing numbers with another implementation):

- Ignored ground truth. VOC "difficult" and COCO "crowd" boxes are ignored by both metrics: they
  are not counted as positives, and a detection matched to one is neither a true nor a false
  positive. pycocotools only knows ``iscrowd``, so difficult boxes go to it as crowd boxes; for
  those it measures overlap as intersection over the *detection's* area (so any detection lying
  inside a difficult box is ignored by the COCO metric), while the VOC metric uses plain IoU.
- Classes without ground truth. ``num_gt`` counts a class's non-ignored boxes. A class with none
  has no defined AP: its per-class values are ``None`` and it is left out of every mean
  (pycocotools marks it -1, which would otherwise drag the mean down). When no class has ground
  truth at all, the means are 0.0 rather than NaN, so the result is always valid JSON.
- COCO counts at most the 100 highest-scoring detections per image *and class* (its
  ``maxDets``); detections beyond those are not seen by ``map``/``map50``/``map75``. The VOC
  metric counts every detection.
- VOC matching uses continuous coordinates (no +1 pixel in widths, like COCO) and IoU >= 0.5,
  where the py-faster-rcnn ``voc_eval`` uses +1 and IoU > 0.5: the two differ only for boxes at
  the threshold or of a few pixels. Detections are taken in descending score order (stable: ties
  keep their input order, images in order); as in the devkit's ``voc_eval``, each goes to the
  ground truth of its image and class with the highest IoU (the first on a tie, a regular box
  before an ignored one): an ignored box
  makes it neither true nor false positive, an already detected box makes it a false positive
  (a duplicate), even where another box it overlaps enough is still free (COCO would fall back
  to that one). The 11 recall thresholds are exactly t/10, so a recall
  of exactly 0.3 reaches the 0.3 threshold (``np.arange(0, 1.1, 0.1)`` gives 0.30000000000000004).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_MAX_DETECTIONS", "VOC_IOU_THRESHOLD", "evaluate", "table"]

VOC_IOU_THRESHOLD = 0.5
COCO_MAX_DETECTIONS = 100  # the last of COCOeval's default maxDets (1, 10, 100)

# VOC outcome of one detection.
_FALSE_POSITIVE, _TRUE_POSITIVE, _IGNORED = 0, 1, 2

# pycocotools ignores the image size for boxes; without one given, any large value will do.
_DUMMY_IMAGE_SIZE = 1 << 20


@dataclass(frozen=True)
class _Image:
    """One image's records as validated numpy arrays."""

    gt_boxes: np.ndarray  # float64 [M, 4], xyxy pixels
    gt_labels: np.ndarray  # int64 [M]
    gt_ignored: np.ndarray  # bool [M], difficult or crowd
    boxes: np.ndarray  # float64 [K, 4], xyxy pixels
    scores: np.ndarray  # float64 [K]
    labels: np.ndarray  # int64 [K]
    width: int
    height: int


def evaluate(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
) -> dict[str, Any]:
    """COCO and VOC07 metrics of ``predictions`` against ``ground_truth`` (see the module docstring).

    Args:
        ground_truth: one record per image: ``"boxes"`` float [M, 4] xyxy pixels, ``"labels"`` int
            [M] 0-based; optional ``"difficult"`` bool [M], ``"crowd"`` bool [M] (both ignored
            boxes), ``"width"``/``"height"`` ints (unused by the metrics themselves).
        predictions: one record per image, in the same order: ``"boxes"`` float [K, 4] xyxy pixels,
            ``"scores"`` float [K], ``"labels"`` int [K] 0-based.
        classes: the class names, indexed by the labels.

    Returns:
        ``{"map", "map50", "map75", "voc07_map": float, "per_class": {name: {"ap", "ap50",
        "voc07_ap": float | None, "num_gt": int, "num_detections": int}}}``, plain Python values
        (``num_detections``: the detections of the class that were evaluated, every score).

    Raises:
        ValueError: the two sequences differ in length, a record is malformed, a label is out of
            range, a ground-truth box has a negative size, or a class name repeats.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(
            f"ground_truth and predictions must have one record per image each, "
            f"got {len(ground_truth)} and {len(predictions)}"
        )
    names = list(classes)
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique (they key per_class), got {names}")
    images = [
        _parse(index, gt, pred, len(names))
        for index, (gt, pred) in enumerate(zip(ground_truth, predictions, strict=True))
    ]

    num_gt = np.zeros(len(names), dtype=np.int64)
    num_detections = np.zeros(len(names), dtype=np.int64)
    for image in images:
        num_gt += np.bincount(image.gt_labels[~image.gt_ignored], minlength=len(names))
        num_detections += np.bincount(image.labels, minlength=len(names))
    has_gt = num_gt > 0

    if has_gt.any():
        coco_stats, coco_ap, coco_ap50 = _coco(images, len(names))
    else:  # pycocotools would give -1 everywhere (or fail on no images); nothing to measure
        coco_stats = np.zeros(3)
        coco_ap = coco_ap50 = np.full(len(names), np.nan)
    voc_ap = _voc07(images, num_gt)

    def optional(value: float, present: bool) -> float | None:
        return float(value) if present else None

    per_class = {
        name: {
            "ap": optional(coco_ap[k], has_gt[k]),
            "ap50": optional(coco_ap50[k], has_gt[k]),
            "voc07_ap": optional(voc_ap[k], has_gt[k]),
            "num_gt": int(num_gt[k]),
            "num_detections": int(num_detections[k]),
        }
        for k, name in enumerate(names)
    }
    return {
        "map": float(coco_stats[0]),
        "map50": float(coco_stats[1]),
        "map75": float(coco_stats[2]),
        "voc07_map": float(voc_ap[has_gt].mean()) if has_gt.any() else 0.0,
        "per_class": per_class,
    }


def table(metrics: Mapping[str, Any]) -> list[str]:
    """:func:`evaluate`'s result as a table a person reads: one row per class (AP, AP50, objects,
    detections; "-" for a class with no objects to measure), then the means."""
    rows = [
        (
            name,
            "-" if entry["ap"] is None else f"{entry['ap']:.3f}",
            "-" if entry["ap50"] is None else f"{entry['ap50']:.3f}",
            str(entry["num_gt"]),
            str(entry.get("num_detections", "")),
        )
        for name, entry in metrics["per_class"].items()
    ]
    header = ("class", "AP", "AP50", "objects", "detections")
    rows.append(("all (mean)", f"{metrics['map']:.3f}", f"{metrics['map50']:.3f}", "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return [line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]),
            f"VOC07 mAP {metrics['voc07_map']:.3f}; AP is COCO's AP@[.5:.95], AP50 at IoU 0.5"]  # fmt: skip


def _as_array(value: Any, dtype: type) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU; torch itself is not needed
        value = value.detach().cpu()
    return np.asarray(value, dtype=dtype)


def _boxes(value: Any, where: str) -> np.ndarray:
    boxes = _as_array(value, np.float64)
    if boxes.size == 0:  # accept [0], [0, 4] and friends for "no boxes"
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be [N, 4], got shape {list(boxes.shape)}")
    return boxes


def _vector(value: Any, dtype: type, length: int, where: str) -> np.ndarray:
    array = _as_array(value, dtype).reshape(-1)
    if len(array) != length:
        raise ValueError(f"{where}: expected {length} values (one per box), got {len(array)}")
    return array


def _labels(value: Any, length: int, num_classes: int, where: str) -> np.ndarray:
    labels = _vector(value, np.int64, length, where)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must be in [0, {num_classes}), got {sorted(set(labels.tolist()))}")
    return labels


def _parse(index: int, gt: Mapping[str, Any], pred: Mapping[str, Any], num_classes: int) -> _Image:
    where = f"ground_truth[{index}]"
    gt_boxes = _boxes(gt["boxes"], where)
    if not np.isfinite(gt_boxes).all() or (gt_boxes[:, 2:] < gt_boxes[:, :2]).any():
        raise ValueError(f"{where}: boxes must be finite xyxy with x_max >= x_min and y_max >= y_min")
    m = len(gt_boxes)
    gt_labels = _labels(gt["labels"], m, num_classes, f"{where} labels")
    ignored = np.zeros(m, dtype=bool)
    for key in ("difficult", "crowd"):
        if gt.get(key) is not None:
            ignored |= _vector(gt[key], bool, m, f"{where} {key}")

    where = f"predictions[{index}]"
    boxes = _boxes(pred["boxes"], where)
    k = len(boxes)
    return _Image(
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_ignored=ignored,
        boxes=boxes,
        scores=_vector(pred["scores"], np.float64, k, f"{where} scores"),
        labels=_labels(pred["labels"], k, num_classes, f"{where} labels"),
        width=int(gt.get("width") or _DUMMY_IMAGE_SIZE),
        height=int(gt.get("height") or _DUMMY_IMAGE_SIZE),
    )


def _coco(images: Sequence[_Image], num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval on the records; returns stats[:3] [3], per-class AP@[.5:.95] [C], AP@.5 [C]
    (-1 for classes without ground truth)."""
    # Ids start at 1: COCOeval treats an annotation id of 0 as "unmatched".
    image_entries = [
        {"id": i + 1, "width": image.width, "height": image.height} for i, image in enumerate(images)
    ]
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    gt_annotations: list[dict[str, Any]] = []
    dt_annotations: list[dict[str, Any]] = []
    for i, image in enumerate(images):
        for box, label, ignored in zip(
            _xywh(image.gt_boxes), image.gt_labels.tolist(), image.gt_ignored.tolist(), strict=True
        ):
            gt_annotations.append(
                {
                    "id": len(gt_annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(ignored),
                }
            )
        for box, label, score in zip(
            _xywh(image.boxes), image.labels.tolist(), image.scores.tolist(), strict=True
        ):
            # What COCO.loadRes would make of a results list (which it cannot do when it is empty).
            dt_annotations.append(
                {
                    "id": len(dt_annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "score": score,
                }
            )

    # pycocotools prints progress; the caller's stdout may be reserved for a JSON object.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": image_entries, "categories": categories, "annotations": gt_annotations}
        coco_dt.dataset = {"images": image_entries, "categories": categories, "annotations": dt_annotations}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    params = evaluator.params
    area_all = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(COCO_MAX_DETECTIONS)
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    precision = evaluator.eval["precision"][:, :, :, area_all, max_dets]  # [T, R, K]
    # A class is either all -1 (no ground truth) or all set, so plain means are exact.
    ap = precision.mean(axis=(0, 1))
    ap50 = precision[iou50].mean(axis=0)
    return np.asarray(evaluator.stats[:3]), ap, ap50


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    """[N, 4] xyxy -> N lists [x, y, w, h] of Python floats."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [N, 4] and [M, 4] xyxy boxes, continuous coordinates -> [N, M]; 0 where the union is 0."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(boxes: np.ndarray, gt_boxes: np.ndarray, gt_ignored: np.ndarray) -> np.ndarray:
    """VOC outcomes [D] of one image's detections of one class, ``boxes`` [D, 4] already in
    descending score order, against that class's ground truth [G, 4] / ignored flags [G]."""
    outcomes = np.full(len(boxes), _FALSE_POSITIVE, dtype=np.int8)
    if len(gt_boxes) == 0:
        return outcomes
    iou = box_iou(boxes, gt_boxes)
    # The devkit's argmax, except that on an exact tie a regular box wins over an ignored one
    # (as in COCOeval): an ignored duplicate of a box must not swallow its detection.
    regular = np.where(gt_ignored[None, :], -1.0, iou)
    ignored = np.where(gt_ignored[None, :], iou, -1.0)
    best = np.where(
        regular.max(axis=1) >= ignored.max(axis=1), regular.argmax(axis=1), ignored.argmax(axis=1)
    )
    good = iou[np.arange(len(boxes)), best] >= VOC_IOU_THRESHOLD
    outcomes[good & gt_ignored[best]] = _IGNORED
    detected = np.zeros(len(gt_boxes), dtype=bool)
    # The first (highest-scoring) detection of a box is the true positive; later ones are duplicates.
    for d in np.flatnonzero(good & ~gt_ignored[best]):
        if not detected[best[d]]:
            outcomes[d] = _TRUE_POSITIVE
            detected[best[d]] = True
    return outcomes


def _voc07(images: Sequence[_Image], num_gt: np.ndarray) -> np.ndarray:
    """Per-class VOC07 11-point AP [C]; NaN for classes without ground truth."""
    num_classes = len(num_gt)
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    outcomes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image in images:
        for c in np.unique(image.labels).tolist():
            keep = image.labels == c
            order = np.argsort(-image.scores[keep], kind="stable")
            gt = image.gt_labels == c
            scores[c].append(image.scores[keep][order])
            outcomes[c].append(
                _match_image(image.boxes[keep][order], image.gt_boxes[gt], image.gt_ignored[gt])
            )

    ap = np.full(num_classes, np.nan)
    thresholds = np.arange(11) / 10
    for c in np.flatnonzero(num_gt > 0).tolist():
        if not scores[c]:
            ap[c] = 0.0
            continue
        # A stable global sort keeps each image's own (stable) order, so matching per image above
        # saw the detections in the order this one does.
        order = np.argsort(-np.concatenate(scores[c]), kind="stable")
        result = np.concatenate(outcomes[c])[order]
        result = result[result != _IGNORED]
        if len(result) == 0:
            ap[c] = 0.0
            continue
        true_positives = np.cumsum(result == _TRUE_POSITIVE)
        recall = true_positives / num_gt[c]
        precision = true_positives / np.arange(1, len(result) + 1)
        # Max precision at recall >= t: the suffix maximum of precision, read at the first
        # detection where recall (non-decreasing) reaches t; 0 where it never does.
        suffix_max = np.maximum.accumulate(precision[::-1])[::-1]
        first = np.searchsorted(recall, thresholds, side="left")
        reached = first < len(recall)
        ap[c] = np.where(reached, suffix_max[np.minimum(first, len(recall) - 1)], 0.0).mean()
    return ap
