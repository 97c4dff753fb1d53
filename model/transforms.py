"""Data augmentation (section 2.2 and 3.6 of the paper) and batching, with torchvision.transforms.v2.

Training: photometric distortion, zoom out (expand) up to 4x, the min-IoU random crop, horizontal
flip, resize to the network input. torchvision's RandomIoUCrop accepts a crop when ANY box meets
the sampled IoU, as in the Caffe original (several PyTorch ports demanded all boxes). Boxes left
without area by a crop are removed by SanitizeBoundingBoxes, with their labels and flags.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from .matching import pad_targets


def _per_box_fields(inputs: Any) -> tuple[Tensor, ...]:
    """What SanitizeBoundingBoxes must filter along with the boxes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[key] for key in ("labels", "difficult") if key in target)


def train_transforms(
    size: tuple[int, int],
    *,
    photometric: bool = True,
    zoom_out: bool = True,
    max_zoom: float = 4.0,
    fill: tuple[float, float, float] = (0.485, 0.456, 0.406),
) -> v2.Compose:
    """The paper's training augmentation, ending in float [0, 1] images of ``size`` (H, W).

    ``fill`` is the colour of the canvas around a zoomed-out image, as a fraction of 255: the mean
    pixel, as in the paper. SSDlite's recipe in torchvision leaves out the photometric distortion
    and the zoom out; both are options here.
    """
    steps: list[v2.Transform] = []
    if photometric:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if zoom_out:
        steps.append(v2.RandomZoomOut(fill=[round(255 * c) for c in fill], side_range=(1.0, max_zoom), p=0.5))
    steps += [
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize(size, antialias=True),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_box_fields),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def eval_transforms(size: tuple[int, int]) -> v2.Compose:
    """Resize to the network input and scale to [0, 1]: what evaluation and the exported graph see."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])


def collate(
    batch: list[tuple[Tensor, dict[str, Any]]],
) -> tuple[Tensor, Tensor, Tensor, list[dict[str, Any]]]:
    """Stack transformed samples for the network and the loss.

    Returns:
        images float [B, 3, H, W]; boxes float [B, M, 4] xyxy normalised to [0, 1] (padding 0);
        labels int64 [B, M] (padding -1); and the targets as given (image ids, sizes).
    """
    images = torch.stack([image.as_subclass(Tensor) for image, _ in batch])
    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = [target["boxes"].as_subclass(Tensor).float() / scale for _, target in batch]
    labels = [target["labels"] for _, target in batch]
    padded_boxes, padded_labels = pad_targets(boxes, labels)
    return images, padded_boxes, padded_labels, [target for _, target in batch]
