"""Matching ground truth to default boxes, for a whole batch at once.

The rule of the paper (section 2.2): every ground-truth box gets the default box it overlaps
most, then every default box whose IoU with some ground truth is >= the threshold is positive.

The first step has a classic bug: when two ground-truth boxes share the same best default box,
the later one overwrites the earlier, which is then left with no default box at all if it
overlaps nothing else by 0.5 (amdegroot/ssd.pytorch #193, #354; torchvision's SSDMatcher does
the same through a scatter). We resolve such conflicts: the ground truth with the higher IoU
keeps the default box and the other takes its best free one, repeated until no conflict is
left. Conflicts are rare, so the loop almost never runs a second round; it never loops over
images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .box_coding import cxcywh_to_xyxy


def pad_targets(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Stack per-image targets into padded batch tensors.

    Args:
        boxes: per image, float [M_i, 4] xyxy boxes.
        labels: per image, int64 [M_i] class ids (0-based, background excluded).

    Returns:
        boxes [B, M, 4] (padding zeros) and labels int64 [B, M] (padding -1), M = max M_i (at least 1).
    """
    batch = len(boxes)
    most = max([1, *(len(b) for b in boxes)])
    device = device or (boxes[0].device if batch else None)
    padded_boxes = torch.zeros(batch, most, 4, device=device)
    padded_labels = torch.full((batch, most), -1, dtype=torch.int64, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        padded_boxes[i, : len(b)] = b
        padded_labels[i, : len(lab)] = lab
    return padded_boxes, padded_labels


def _best_prior_per_truth(iou: Tensor, valid: Tensor) -> Tensor:
    """For each ground truth, its own default box: the best one no other ground truth claims.

    Args:
        iou: [B, M, N] IoU of each ground truth with each default box.
        valid: [B, M] which ground truths are real (not padding).

    Returns:
        int64 [B, M]: the default box of each ground truth, -1 for padding and for boxes that
        overlap no default box at all. Within an image, no default box appears twice.
    """
    batch, truths, priors = iou.shape
    assigned = torch.full((batch, truths), -1, dtype=torch.int64, device=iou.device)
    candidates = iou
    best_iou, best = candidates.max(dim=2)
    pending = valid & (best_iou > 0)
    truth_index = torch.arange(truths, device=iou.device).expand(batch, truths)
    image_offset = (torch.arange(batch, device=iou.device) * priors)[:, None]
    while bool(pending.any()):
        slot = (image_offset + best)[pending]  # which (image, default box) each pending truth wants
        iou_wanted = best_iou[pending]
        # Highest IoU wins a contested default box; on equal IoU, the lowest index.
        top = torch.full((batch * priors,), -1.0, device=iou.device).scatter_reduce(
            0, slot, iou_wanted, "amax"
        )
        contenders = iou_wanted == top[slot]
        first = torch.full((batch * priors,), truths, device=iou.device).scatter_reduce(
            0, slot[contenders], truth_index[pending][contenders], "amin"
        )
        wins = contenders & (truth_index[pending] == first[slot])
        winners = pending.nonzero()[wins]  # [W, 2] (image, truth)
        assigned[winners[:, 0], winners[:, 1]] = best[winners[:, 0], winners[:, 1]]
        pending[winners[:, 0], winners[:, 1]] = False
        if not bool(pending.any()):
            break
        # Losers look again, among the default boxes nobody has taken yet.
        taken = torch.zeros(batch, priors, dtype=torch.bool, device=iou.device)
        taken_rows, taken_truths = (assigned >= 0).nonzero(as_tuple=True)
        taken[taken_rows, assigned[taken_rows, taken_truths]] = True
        candidates = iou.masked_fill(taken[:, None, :], -1.0)
        best_iou, best = candidates.max(dim=2)
        pending &= best_iou > 0
    return assigned


def match(gt_boxes: Tensor, gt_labels: Tensor, priors: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Assign each default box a ground truth (or background), for a batch.

    Args:
        gt_boxes: [B, M, 4] padded ground-truth boxes, xyxy, same frame as the priors.
        gt_labels: int64 [B, M], -1 marks padding.
        priors: [N, 4] default boxes, (cx, cy, w, h).
        iou_threshold: IoU from which a default box is positive.

    Returns:
        int64 [B, N]: index into M of the matched ground truth, -1 for background.
    """
    batch, truths = gt_labels.shape
    valid = gt_labels >= 0
    iou = box_iou(gt_boxes.float(), cxcywh_to_xyxy(priors.float()))  # [B, M, N]
    iou = iou.masked_fill(~valid[:, :, None], -1.0)
    best_iou, best_truth = iou.max(dim=1)  # [B, N]
    matched = torch.where(best_iou >= iou_threshold, best_truth, -1)

    forced = _best_prior_per_truth(iou, valid)
    rows, truth = (forced >= 0).nonzero(as_tuple=True)
    matched[rows, forced[rows, truth]] = truth
    return matched
