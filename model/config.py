"""Configuration that imports no torch: default box layouts, training recipes and
post-processing settings.

The ``ssd`` command builds every sub-command's parser up front, and ``ssd serve`` must not load
torch (tests/test_layout.py): so the model registry (registry.py) and the export command's
defaults are made of these plain dataclasses, and the torch code (priors.py, postprocess.py,
train.py) takes them as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Box scales s_k relative to the input side, one per feature map plus one more for the last
# map's extra ratio-1 box (s'_k = sqrt(s_k * s_k+1)). These are the Caffe SSD sets.
SSD300_COCO_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)  # 21, 45, 99, ... 315 px
SSD300_VOC_SCALES = (0.10, 0.20, 0.37, 0.54, 0.71, 0.88, 1.05)  # 30, 60, 111, ... 315 px
SSD512_COCO_SCALES = (0.04, 0.10, 0.26, 0.42, 0.58, 0.74, 0.90, 1.06)  # 20.48, 51.2, ... px
SSD512_VOC_SCALES = (0.07, 0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.05)  # 35.84, 76.8, ... px


def linear_scales(num_maps: int, min_ratio: float, max_ratio: float) -> tuple[float, ...]:
    """The paper's rule s_k = s_min + (s_max - s_min)(k - 1)/(m - 1), plus a final 1.0.

    torchvision's DefaultBoxGenerator appends 1.0 for the last map's extra box; so do we, so that
    SSDlite's boxes are the same as torchvision's.
    """
    if num_maps == 1:
        return (min_ratio, max_ratio)
    step = (max_ratio - min_ratio) / (num_maps - 1)
    return (*(min_ratio + step * k for k in range(num_maps)), 1.0)


@dataclass(frozen=True)
class PriorConfig:
    """How default boxes are laid over each feature map.

    aspect_ratios: per feature map, the ratios r beyond 1; each gives two boxes, r and 1/r.
    scales: s_k per feature map, plus one (len = maps + 1).
    steps: pixel stride of each map's cells, as in Caffe SSD; ``None`` spreads the cells evenly.
    clip: clamp widths and heights to [0, 1] (torchvision's default, and what its weights expect).
    """

    aspect_ratios: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]
    steps: tuple[int, ...] | None = None
    clip: bool = True

    def __post_init__(self) -> None:
        if len(self.scales) != len(self.aspect_ratios) + 1:
            raise ValueError(
                f"need one scale per feature map plus one: {len(self.aspect_ratios)} maps, "
                f"{len(self.scales)} scales"
            )
        if self.steps is not None and len(self.steps) != len(self.aspect_ratios):
            raise ValueError(
                f"need one step per feature map: {len(self.aspect_ratios)} maps, steps {self.steps}"
            )

    @property
    def boxes_per_location(self) -> list[int]:
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]

    def box_shapes(self, k: int) -> list[tuple[float, float]]:
        """The (w, h) pairs of map k, relative to the input's width and height, in head order."""
        s_k, s_next = self.scales[k], self.scales[k + 1]
        s_prime = math.sqrt(s_k * s_next)
        shapes = [(s_k, s_k), (s_prime, s_prime)]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            shapes += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
        if self.clip:
            shapes = [(min(max(w, 0.0), 1.0), min(max(h, 0.0), 1.0)) for w, h in shapes]
        return shapes


@dataclass(frozen=True)
class Recipe:
    """Per-model defaults, from the published recipes."""

    lr: float  # for ``reference_batch`` images per step
    reference_batch: int
    weight_decay: float
    schedule: str  # "cosine" or "multistep"
    milestones: tuple[float, ...] = ()  # multistep: fractions of the run at which the lr drops 10x
    backbone_weights: str | None = "imagenet"
    photometric: bool = True
    zoom_out: bool = True


@dataclass(frozen=True)
class PostprocessConfig:
    score_threshold: float = 0.01
    iou_threshold: float = 0.45
    topk_candidates: int = 400
    max_detections: int = 200
    remove_empty: bool = True  # drop boxes of zero width or height (clipping can produce them)
    class_agnostic: bool = False  # one NMS across classes, each box with its best class only

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if self.topk_candidates < 1 or self.max_detections < 1:
            raise ValueError("topk_candidates and max_detections must be at least 1")
