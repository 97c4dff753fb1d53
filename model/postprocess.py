"""Eager post-processing: scores and decoded boxes to final detections, for a whole batch.

Per class: keep the top ``topk_candidates`` default boxes, drop scores at or below
``score_threshold`` and empty boxes, run NMS, then keep the best ``max_detections`` per image.
With ``class_agnostic``, each default box competes only with its best class, in one NMS. The same
detections as torchvision's ``SSD.postprocess_detections`` (tested), with one top-k for the whole
batch. The output is padded like the exported ONNX graph's (docs/reference.md, "The model
artifact"), and NMS sees the same float32 box coordinates as the graph's (``class_offsets``),
so the two can be compared tensor for tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from .box_coding import decode
from .config import PostprocessConfig


class Detections(NamedTuple):
    num_detections: Tensor  # int64 [B]
    boxes: Tensor  # float32 [B, K, 4], xyxy normalised to [0, 1]; padding 0
    scores: Tensor  # float32 [B, K], descending per image; padding 0
    labels: Tensor  # int64 [B, K], 0-based class id (no background); padding -1

    def per_image(self) -> list[dict[str, Tensor]]:
        """Unpadded detections, one dict of boxes, scores and labels per image."""
        return [
            {"boxes": self.boxes[i, :n], "scores": self.scores[i, :n], "labels": self.labels[i, :n]}
            for i, n in enumerate(self.num_detections.tolist())
        ]


@torch.no_grad()
def postprocess(
    cls_logits: Tensor, bbox_regression: Tensor, priors: Tensor, config: PostprocessConfig | None = None
) -> Detections:
    """
    Args:
        cls_logits: [B, N, C] logits, index 0 = background.
        bbox_regression: [B, N, 4] offsets.
        priors: [N, 4] default boxes, (cx, cy, w, h), normalised.
    """
    scores, boxes = decode_outputs(cls_logits, bbox_regression, priors)
    return select_detections(scores, boxes, config)


def decode_outputs(cls_logits: Tensor, bbox_regression: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
    """Network outputs to class scores [B, N, C-1] (background dropped) and boxes [B, N, 4]
    (xyxy, normalised, clipped to [0, 1])."""
    scores = F.softmax(cls_logits.float(), dim=-1)[:, :, 1:]
    boxes = decode(bbox_regression.float(), priors.float()).clamp(0.0, 1.0)
    return scores, boxes


def class_offsets(num_classes: int) -> Tensor:
    """[C, 4] float32 shifts that move each class's boxes (inside [0, 1]) to its own cell of a
    square grid, 2 units apart: boxes of different classes can then never overlap, so one NMS over
    all classes is per-class NMS. The exported graph relies on it: one NMS per image that stops
    after K boxes is ~100x cheaper than 90 per-class NMS runs of 400 candidates each, and it
    selects the same boxes. The square grid keeps coordinates below ~2*sqrt(C): float32 then
    rounds shifted coordinates to ~1e-6, where a line of 90 classes (up to 180) would give 1e-5."""
    grid = math.ceil(math.sqrt(num_classes))
    index = torch.arange(num_classes)
    x = (index % grid).to(torch.float32) * 2.0
    y = (index // grid).to(torch.float32) * 2.0
    return torch.stack([x, y, x, y], dim=1)


def _nms_by_group(boxes: Tensor, scores: Tensor, sizes: list[int], iou_threshold: float) -> Tensor:
    """Indices kept by NMS within each group, sorted by score, descending (equal scores: in group
    order, then in NMS's order). The groups are consecutive runs of ``sizes`` boxes.

    Runs, because finding each group's members by comparison would cost a pass over all of the
    batch's candidates per (image, class): billions of comparisons at batch 32 with 90 classes.
    Not one NMS per image over the class-shifted boxes, though it would keep the same boxes:
    torchvision's CPU NMS compares each kept box with every later one, so with thousands of
    survivors among an image's 36,000 candidates (an untrained model, 90 classes) it is ~40x
    slower than 90 runs of 400 (docs/benchmarks.md, "Evaluation (eager post-processing)")."""
    kept, start = [], 0
    for size in sizes:
        if size:
            kept.append(nms(boxes[start : start + size], scores[start : start + size], iou_threshold) + start)
        start += size
    if not kept:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept_all = torch.cat(kept)
    return kept_all[torch.sort(scores[kept_all], descending=True, stable=True).indices]


@torch.no_grad()
def select_detections(scores: Tensor, boxes: Tensor, config: PostprocessConfig | None = None) -> Detections:
    """
    Args:
        scores: [B, N, C-1] class probabilities without the background.
        boxes: [B, N, 4] decoded boxes, xyxy.
    """
    config = config or PostprocessConfig()
    if config.class_agnostic:
        # One candidate per default box: its best class, as ssd_keras' decode_detections_fast.
        best, best_label = scores.max(dim=-1, keepdim=True)  # [B, N, 1]
        return _select(best, boxes, config, best_label)
    return _select(scores, boxes, config)


def _select(
    scores: Tensor, boxes: Tensor, config: PostprocessConfig, labels: Tensor | None = None
) -> Detections:
    """NMS within each (image, column of ``scores``) group; ``labels`` [B, N, 1] names the class
    of each box when there is one column for all classes."""
    batch, num_priors, num_groups = scores.shape
    k = min(config.topk_candidates, num_priors)
    top_scores, top_prior = scores.topk(k, dim=1)  # [B, k, G]
    # Candidates in (image, column, rank) order: each NMS group is then one run of them.
    top_scores, top_prior = top_scores.transpose(1, 2), top_prior.transpose(1, 2)  # [B, G, k]
    keep = top_scores > config.score_threshold
    image, group, rank = keep.nonzero(as_tuple=True)
    prior = top_prior[image, group, rank]
    cand_scores = top_scores[image, group, rank]
    cand_boxes = boxes[image, prior]
    label = group if labels is None else labels[image, prior, 0]
    if config.remove_empty:
        nonempty = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
        image, group, label, cand_scores, cand_boxes = (
            t[nonempty] for t in (image, group, label, cand_scores, cand_boxes)
        )

    # NMS within each (image, column) group, on the class-shifted boxes the exported graph's NMS
    # sees, so that both compute their IoUs from the same float32 numbers.
    shifted = cand_boxes + class_offsets(num_groups).to(cand_boxes.device)[group]
    sizes = torch.bincount(image * num_groups + group).tolist()
    kept = _nms_by_group(shifted, cand_scores, sizes, config.iou_threshold)
    kept = kept[torch.sort(image[kept], stable=True).indices]  # group by image, scores still descending
    kept_image = image[kept]
    counts = torch.bincount(kept_image, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(kept), device=kept.device) - starts[kept_image]
    within = slot < config.max_detections
    kept, kept_image, slot = kept[within], kept_image[within], slot[within]

    out_k = config.max_detections
    out_boxes = boxes.new_zeros(batch, out_k, 4)
    out_scores = scores.new_zeros(batch, out_k)
    out_labels = torch.full((batch, out_k), -1, dtype=torch.int64, device=boxes.device)
    out_boxes[kept_image, slot] = cand_boxes[kept]
    out_scores[kept_image, slot] = cand_scores[kept]
    out_labels[kept_image, slot] = label[kept]
    return Detections(counts.clamp(max=out_k), out_boxes, out_scores, out_labels)
