"""What every dataset format loads into: per-image annotations, and a torch Dataset over them.

Formats (voc.py, coco.py, yolo.py) parse and validate their files into :class:`Annotation` lists
up front, so that bad data is reported when the dataset is opened, naming the file, and never
as a crash deep inside training. Images are decoded lazily in ``__getitem__``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

T = TypeVar("T")


class DatasetError(ValueError):
    """Bad data, with a message that names the file (and line or object where there is one)."""


@dataclass
class Annotation:
    """One image's ground truth, in pixels of the image as stored on disk (no EXIF rotation,
    as in torchvision's and pycocotools' readers).

    boxes: float32 [M, 4], x_min, y_min, x_max, y_max, clipped to the image, positive area.
    labels: int64 [M], 0-based index into the dataset's ``classes``.
    difficult: bool [M], Pascal VOC's flag: kept for training, ignored by evaluation.
    crowd: bool [M], COCO's iscrowd: left out of training, respected by evaluation.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        count = len(self.boxes)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(count, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(count)
        self.difficult = (
            np.asarray(self.difficult, dtype=bool).reshape(-1)
            if len(self.difficult)
            else np.zeros(count, dtype=bool)
        )
        self.crowd = (
            np.asarray(self.crowd, dtype=bool).reshape(-1) if len(self.crowd) else np.zeros(count, dtype=bool)
        )
        if len(self.difficult) != count or len(self.crowd) != count:
            raise ValueError(
                f"{self.path}: {count} boxes but {len(self.difficult)} difficult "
                f"and {len(self.crowd)} crowd flags"
            )


def reading(items: Sequence[T], what: str) -> Iterable[T]:
    """``items`` with a progress bar on stderr once reading them has lasted 5 s (a large set's
    image headers and label files take minutes on a slow disk); silent for a small set."""
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="file", file=sys.stderr, delay=5.0, mininterval=5.0)


@dataclass(frozen=True)
class LabelledBox:
    """One object as the format writers take it: ``box`` x_min, y_min, x_max, y_max in pixel
    edges; ``truncated``: cut by the image border (VOC's flag); ``area``: the visible area in
    pixels (COCO's, that of the segment), the box's when None."""

    label: int
    box: tuple[float, float, float, float]
    truncated: bool = False
    area: float | None = None


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image's header: PIL opens lazily, nothing is decoded.

    A missing file or an unreadable header is a :class:`DatasetError` naming the file; a file
    whose header is fine but whose data is truncated is only found when it is decoded.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: image file not found") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read the image header ({exc})") from exc


def clip_boxes(
    boxes: np.ndarray, width: int, height: int, source: Path | str
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy pixel boxes to the image and find those left with positive area.

    boxes: float [M, 4] x_min, y_min, x_max, y_max in pixels. Returns ``(clipped, keep)``:
    float32 [M, 4] clipped to ``[0, width] x [0, height]``, and bool [M], False for a box whose
    area is zero or negative before or after clipping (the caller drops those and warns once per
    file). A non-finite coordinate is a :class:`DatasetError` naming ``source``: clipping would
    turn it into a plausible but wrong box.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise DatasetError(f"{source}: a box has a non-finite coordinate")
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = np.empty_like(boxes)
    clipped[:, 0::2] = boxes[:, 0::2].clip(0, width)
    clipped[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = valid & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, keep


def make_annotation(
    image_id: int,
    path: Path,
    width: int,
    height: int,
    boxes: np.ndarray,
    labels: np.ndarray,
    source: Path | str,
    difficult: np.ndarray | None = None,
    crowd: np.ndarray | None = None,
) -> tuple[Annotation, int]:
    """An :class:`Annotation` with its boxes clipped and the degenerate ones dropped.

    boxes: float [M, 4] xyxy pixels; labels: int [M]; difficult, crowd: bool [M] or None.
    Returns the annotation and how many boxes were dropped, so that the caller warns once per
    file (``source``) rather than once per box.
    """
    clipped, keep = clip_boxes(boxes, width, height, source)
    count = len(clipped)
    flags = [np.zeros(count, bool) if f is None else np.asarray(f, bool) for f in (difficult, crowd)]
    annotation = Annotation(
        image_id=image_id,
        path=path,
        width=width,
        height=height,
        boxes=clipped[keep],
        labels=np.asarray(labels, dtype=np.int64).reshape(count)[keep],
        difficult=flags[0][keep],
        crowd=flags[1][keep],
    )
    return annotation, int(count - keep.sum())


Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]


class DetectionDataset(torch.utils.data.Dataset):
    """Images and their training targets.

    ``dataset[i]`` is ``(image, target)``: image a ``tv_tensors.Image`` uint8 [3, H, W] (RGB),
    target a dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels, float32 [M, 4]),
    ``labels`` (int64 [M]), ``difficult`` (bool [M]) and ``image_id`` (int). Crowd boxes are
    left out here (they are for evaluation). ``transform(image, target)``, when given, is applied
    last (torchvision.transforms.v2 style).

    ``category_ids[i]`` is the id that class ``i`` has in COCO-format files (results, ground
    truth for pycocotools): the original ids for a COCO dataset, ``1..len(classes)`` otherwise.

    ``skipped``: ``(file, why)`` for what the loader left out (a label file with no image, boxes
    of no area); ``notes``: what it assumed (images without a label file taken as background).
    Both are for the summary said when the dataset opens (:mod:`model.data.summary`).
    """

    def __init__(
        self,
        annotations: Sequence[Annotation],
        classes: Sequence[str],
        transform: Transform | None = None,
        *,
        category_ids: Sequence[int] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        notes: Sequence[str] = (),
    ) -> None:
        self.annotations = list(annotations)
        self.classes = list(classes)
        self.transform = transform
        self.skipped = list(skipped)
        self.notes = list(notes)
        self.category_ids = (
            list(category_ids) if category_ids is not None else list(range(1, len(self.classes) + 1))
        )
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.category_ids)} category ids")

    def __len__(self) -> int:
        return len(self.annotations)

    def load_image(self, index: int) -> Image.Image:
        ann = self.annotations[index]
        try:
            with Image.open(ann.path) as image:
                rgb = image.convert("RGB")
        # PIL raises these for corrupt files; DecompressionBombError is none of them.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{ann.path}: cannot read the image ({exc})") from exc
        if rgb.size != (ann.width, ann.height):
            raise DatasetError(
                f"{ann.path}: the image is {rgb.size[0]}x{rgb.size[1]}, "
                f"the annotation says {ann.width}x{ann.height}"
            )
        return rgb

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        ann = self.annotations[index]
        image = tv_tensors.Image(TF.pil_to_tensor(self.load_image(index)))
        keep = ~ann.crowd
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(ann.boxes[keep]), format="XYXY", canvas_size=(ann.height, ann.width)
            ),
            "labels": torch.from_numpy(ann.labels[keep]),
            "difficult": torch.from_numpy(ann.difficult[keep]),
            "image_id": ann.image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target
