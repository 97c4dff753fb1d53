"""``ssd evaluate --model X.onnx``: an artifact's mAP through ONNX Runtime, as the service runs it.

Each image file goes through the service's decoding (``service.images.decode``: format sniffing,
EXIF orientation, RGB conversion, the resize to the input size) and its ``Detector`` (the same
session options, the graph's own score threshold and NMS), and the normalised boxes are scaled to
the decoded image as ``/detect`` does. So the figure is that of the artifact a client talks to,
not of the checkpoint it came from (tests/test_release.py: these detections equal the service's).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.data import DatasetError, DetectionDataset
from model.data.subsets import class_difference
from model.evaluation import evaluate
from model.inference import ground_truth
from service.artifact import Detector
from service.images import Decoded, ImageError, decode

log = logging.getLogger("ssd.release")

MAX_PIXELS = 100_000_000  # a dataset is the user's own: larger than any request, still bounded


class ClassMismatch(ValueError):
    """The artifact and the dataset name other classes; their scores would not mean anything."""


def check_classes(detector: Detector, dataset: DetectionDataset) -> None:
    if list(detector.info.classes) != list(dataset.classes):
        raise ClassMismatch(
            f"{detector.info.path} and the dataset name other classes: "
            + class_difference(detector.info.classes, dataset.classes, str(detector.info.path), "the dataset")
        )


def predict_artifact(
    detector: Detector, dataset: DetectionDataset, batch_size: int = 8, progress: bool = False
) -> list[dict[str, np.ndarray]]:
    """Detections for every image of ``dataset``, in order: ``boxes`` float32 [K, 4] xyxy in
    pixels of the image, ``scores`` float32 [K], ``labels`` int64 [K]."""
    paths = [a.path for a in dataset.annotations]
    size = detector.info.input_size
    results: list[dict[str, np.ndarray]] = []
    rotated = 0
    bar = tqdm(
        total=len(paths), unit="img", desc="evaluate", file=sys.stderr, mininterval=5.0, delay=5.0,
        disable=not progress,
    )  # fmt: skip

    def read(path: Path) -> Decoded:
        try:
            return decode(Path(path).read_bytes(), size, MAX_PIXELS)
        except ImageError as exc:  # the file passed the loader's header check, not the service's
            raise DatasetError(f"{path}: {exc}") from exc

    # A batch's images are decoded in two threads (Pillow releases the GIL while it decodes).
    with ThreadPoolExecutor(2) as pool, bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded: list[Decoded] = list(pool.map(read, chunk))
            found = detector.detect(np.stack([d.pixels for d in decoded]))
            for image, detections, ann in zip(decoded, found, dataset.annotations[start:], strict=False):
                rotated += (image.width, image.height) != (ann.width, ann.height)
                boxes, scores, labels = detections.select(image.width, image.height, threshold=0.0)
                results.append({"boxes": boxes, "scores": scores, "labels": labels})
            bar.update(len(chunk))
    if rotated:
        log.warning(
            "%d images carry an EXIF rotation: the service detects in the rotated frame, their "
            "annotations are in the stored one, so they score lower here than they should",
            rotated,
        )
    return results


def evaluate_detector(
    detector: Detector, dataset: DetectionDataset, batch_size: int = 8, progress: bool = False
) -> dict[str, Any]:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, VOC07 mAP and AP per class of ``detector`` on
    ``dataset``. Raises ClassMismatch."""
    check_classes(detector, dataset)
    predictions = predict_artifact(detector, dataset, batch_size, progress)
    return evaluate(ground_truth(dataset), predictions, dataset.classes)


def evaluate_artifact(
    path: str | Path,
    dataset: DetectionDataset,
    *,
    batch_size: int = 8,
    providers: Sequence[str] = ("cpu",),
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_detector` of the artifact at ``path``. Raises ArtifactError (not a
    loadable artifact) and ClassMismatch."""
    return evaluate_detector(Detector(path, providers), dataset, batch_size, progress)
