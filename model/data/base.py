"""What every dataset format loads into: per-image annotations, and a torch Dataset over them.

Formats (voc.py, coco.py, yolo.py) parse and validate their files into :class:`Annotation` lists
up front, so that bad data is reported when the dataset is opened, naming the file, and never
as a crash deep inside training. Images are decoded lazily in ``__getitem__``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF


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


Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]


class DetectionDataset(torch.utils.data.Dataset):
    """Images and their training targets.

    ``dataset[i]`` is ``(image, target)``: image a ``tv_tensors.Image`` uint8 [3, H, W] (RGB),
    target a dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels, float32 [M, 4]),
    ``labels`` (int64 [M]), ``difficult`` (bool [M]) and ``image_id`` (int). Crowd boxes are
    left out here (they are for evaluation). ``transform(image, target)``, when given, is applied
    last (torchvision.transforms.v2 style).
    """

    def __init__(
        self, annotations: Sequence[Annotation], classes: Sequence[str], transform: Transform | None = None
    ) -> None:
        self.annotations = list(annotations)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.annotations)

    def load_image(self, index: int) -> Image.Image:
        ann = self.annotations[index]
        try:
            with Image.open(ann.path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for corrupt files
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
