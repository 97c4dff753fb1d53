"""Matching ground truth to default boxes, for a whole batch at once.

The rule of the paper (section 2.2): every ground-truth box gets the default box it overlaps
most, then every default box whose IoU with some ground truth is >= the threshold is positive.

The first step has a classic bug: when two ground-truth boxes share the same best default box,
the later one overwrites the earlier, which is then left with no default box at all if it
overlaps nothing else by 0.5 (amdegroot/ssd.pytorch #193, #354; torchvision's SSDMatcher does
the same through a scatter). We resolve such conflicts: the ground truth with the higher IoU
keeps the default box and the other takes its best free one, repeated until no conflict is
left. Conflicts are rare, so the loop seldom runs a second round; it never loops over images.

Speed (`ssd bench loss`): with a :class:`PriorGrid`, IoU is computed map by map and only
where it can matter. IoU(g, p) <= min(area) / max(area), so a feature map whose boxes are all
more than 1/threshold times larger or smaller than a ground truth cannot make it a positive
there: big objects skip the 38x38 map, two thirds of SSD300's boxes. The result is exact: a
ground truth whose best default box might lie in a skipped map gets its full row computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .box_coding import cxcywh_to_xyxy
from .priors import PriorGrid

_BOUND_MARGIN = 1e-5  # float rounding: a computed IoU may exceed its area bound by an ulp or two


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


class _Overlaps(NamedTuple):
    prior_iou: (
        Tensor  # [B, N] best IoU of each default box with a truth of its image; exact where >= threshold
    )
    prior_truth: Tensor  # int64 [B, N] which truth (index into M)
    truth_iou: Tensor  # [G] best IoU of each real truth with any default box (exact)
    truth_prior: Tensor  # int64 [G] which default box
    rows: Callable[[Tensor], Tensor]  # full IoU rows [P, N] of some truths (indices into G)


def _dense_overlaps(gt_boxes: Tensor, valid: Tensor, priors: Tensor) -> _Overlaps:
    iou = box_iou(gt_boxes.float(), cxcywh_to_xyxy(priors.float())).masked_fill(~valid[:, :, None], -1.0)
    prior_iou, prior_truth = iou.max(dim=1)
    flat = iou[valid]  # [G, N]
    truth_iou, truth_prior = flat.max(dim=1)
    return _Overlaps(prior_iou, prior_truth, truth_iou, truth_prior, lambda index: flat[index])


def _grid_overlaps(gt_boxes: Tensor, valid: Tensor, grid: PriorGrid, threshold: float) -> _Overlaps:
    batch = valid.shape[0]
    num_priors = len(grid)
    device = gt_boxes.device
    image, slot = valid.nonzero(as_tuple=True)  # [G], grouped by image
    boxes = gt_boxes[image, slot].float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    count = len(boxes)

    truth_iou = torch.full((count,), -1.0, device=device)
    truth_prior = torch.zeros(count, dtype=torch.int64, device=device)
    skipped_bound = torch.zeros(count, device=device)  # best IoU any skipped map could offer
    pair_truth, pair_prior, pair_iou = [], [], []  # every (truth, default box) with IoU >= threshold
    start = 0
    for k in range(len(grid.maps)):
        low, high = grid.area_range[k]  # [A] smallest and largest area of each box shape
        bound = (torch.minimum(area[:, None], high) / torch.maximum(area[:, None], low)).amax(dim=1)
        bound = bound + _BOUND_MARGIN
        use = bound >= threshold
        skipped_bound = torch.where(use, skipped_bound, torch.maximum(skipped_bound, bound))
        chosen = use.nonzero()[:, 0]
        if len(chosen):
            iou = grid.map_iou(boxes[chosen], k)  # [G_k, n_k]
            best, where = iou.max(dim=1)
            better = best > truth_iou[chosen]  # strict: the earlier map wins ties, as a full argmax would
            truth_iou[chosen[better]] = best[better]
            truth_prior[chosen[better]] = where[better] + start
            row, column = (iou >= threshold).nonzero(as_tuple=True)
            pair_truth.append(chosen[row])
            pair_prior.append(column + start)
            pair_iou.append(iou[row, column])
        start += grid.map_size(k)

    # Best truth of each default box, among the pairs over the threshold: highest IoU, then
    # the lowest truth index, as an argmax over all truths of the image would give.
    if pair_truth:
        pair_truth, pair_prior, pair_iou = torch.cat(pair_truth), torch.cat(pair_prior), torch.cat(pair_iou)
    else:  # no object overlaps any default box by the threshold (or there is no object at all)
        pair_truth = pair_prior = torch.zeros(0, dtype=torch.int64, device=device)
        pair_iou = torch.zeros(0, device=device)
    key = image[pair_truth] * num_priors + pair_prior
    prior_iou = torch.full((batch * num_priors,), -1.0, device=device).scatter_reduce(
        0, key, pair_iou, "amax"
    )
    top = pair_iou == prior_iou[key]
    prior_truth = torch.zeros(batch * num_priors, dtype=torch.int64, device=device).scatter_reduce(
        0, key[top], slot[pair_truth[top]], "amin", include_self=False
    )

    # Truths whose best default box might lie in a skipped map: compute their whole row.
    unsure = (truth_iou <= skipped_bound).nonzero()[:, 0]
    if len(unsure):
        truth_iou[unsure], truth_prior[unsure] = grid.iou(boxes[unsure]).max(dim=1)
    return _Overlaps(
        prior_iou.view(batch, num_priors),
        prior_truth.view(batch, num_priors),
        truth_iou,
        truth_prior,
        lambda index: grid.iou(boxes[index]),
    )


def _resolve_shared_best(overlaps: _Overlaps, image: Tensor, num_priors: int) -> Tensor:
    """Each truth's own default box: its best, unless a truth with a higher IoU wants it too.

    Args:
        overlaps: see _Overlaps; G real truths.
        image: int64 [G] the image of each truth.

    Returns:
        int64 [G]: a default box per truth, -1 for truths that overlap no default box at all.
        Within an image, no default box appears twice.
    """
    count = len(image)
    device = image.device
    assigned = torch.full((count,), -1, dtype=torch.int64, device=device)
    best_iou, best = overlaps.truth_iou.clone(), overlaps.truth_prior.clone()
    pending = best_iou > 0
    index = torch.arange(count, device=device)
    slots = len(image) and int(image.max() + 1) * num_priors
    while bool(pending.any()):
        wanted = image[pending] * num_priors + best[pending]  # which (image, default box) each wants
        iou_wanted = best_iou[pending]
        # Highest IoU wins a contested default box; on equal IoU, the lowest index.
        top = torch.full((slots,), -1.0, device=device).scatter_reduce(0, wanted, iou_wanted, "amax")
        contenders = iou_wanted == top[wanted]
        first = torch.full((slots,), count, device=device).scatter_reduce(
            0, wanted[contenders], index[pending][contenders], "amin"
        )
        winners = index[pending][contenders & (index[pending] == first[wanted])]
        assigned[winners] = best[winners]
        pending[winners] = False
        if not bool(pending.any()):
            break
        # Losers look again, among the default boxes nobody in their image has taken yet.
        losers = pending.nonzero()[:, 0]
        taken = torch.zeros(slots, dtype=torch.bool, device=device)
        mine = assigned >= 0
        taken[image[mine] * num_priors + assigned[mine]] = True
        taken = taken.view(-1, num_priors)[image[losers]]
        best_iou[losers], best[losers] = overlaps.rows(losers).masked_fill(taken, -1.0).max(dim=1)
        pending &= best_iou > 0
    return assigned


def match(
    gt_boxes: Tensor, gt_labels: Tensor, priors: Tensor | PriorGrid, iou_threshold: float = 0.5
) -> Tensor:
    """Assign each default box a ground truth (or background), for a batch.

    Args:
        gt_boxes: [B, M, 4] padded ground-truth boxes, xyxy, same frame as the priors.
        gt_labels: int64 [B, M], -1 marks padding.
        priors: [N, 4] default boxes, (cx, cy, w, h), or the same as a PriorGrid (much faster).
        iou_threshold: IoU from which a default box is positive.

    Returns:
        int64 [B, N]: index into M of the matched ground truth, -1 for background.
    """
    valid = gt_labels >= 0
    if isinstance(priors, PriorGrid):
        overlaps = _grid_overlaps(gt_boxes, valid, priors, iou_threshold)
        num_priors = len(priors)
    else:
        overlaps = _dense_overlaps(gt_boxes, valid, priors)
        num_priors = priors.shape[0]
    matched = torch.where(overlaps.prior_iou >= iou_threshold, overlaps.prior_truth, -1)

    image, slot = valid.nonzero(as_tuple=True)
    forced = _resolve_shared_best(overlaps, image, num_priors)
    keep = forced >= 0
    matched[image[keep], forced[keep]] = slot[keep]
    return matched
