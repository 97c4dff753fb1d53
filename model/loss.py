"""MultiBox loss (section 2.2 of the paper), vectorised over the batch.

Smooth L1 on the positives' offsets plus softmax cross-entropy on the positives and on the
hardest negatives, ``neg_pos_ratio`` of them per positive in each image, both divided by the
number of positives N (at least 1, so a batch without objects gives a finite loss).

Equal to torchvision's ``SSD.compute_loss`` (tested), but several times faster
(`ssd bench loss`): one matching for the whole batch (see matching.py) instead of a Python
loop over images; the negatives picked with one top-k of size 3 x positives instead of two full
sorts of all default boxes; and the differentiable cross-entropy computed on the chosen rows
only (positives and mined negatives, a few percent of all), so that the backward pass does not
run a softmax gradient over every default box. The sum of the k largest losses does not depend
on how ties are ordered, so the result is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_coding import VARIANCES, encode
from .matching import match
from .priors import PriorGrid


class LossParts(NamedTuple):
    total: Tensor
    regression: Tensor
    classification: Tensor
    num_positives: Tensor  # int64 scalar, before the max(1, .) of the normaliser


class MultiBoxLoss(nn.Module):
    """SSD's training objective.

    Args:
        iou_threshold: IoU from which a default box is matched to a ground truth.
        neg_pos_ratio: hard negatives kept per positive, per image.
        min_negatives: hard negatives kept in an image with no positive. 0 is the paper's and
            torchvision's choice; more gives background-only images a say.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        min_negatives: int = 0,
        variances: tuple[float, float, float, float] = VARIANCES,
    ) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.min_negatives = min_negatives
        self.variances = variances

    def forward(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        priors: Tensor | PriorGrid,
        gt_boxes: Tensor,
        gt_labels: Tensor,
    ) -> LossParts:
        """
        Args:
            cls_logits: [B, N, C] class logits, index 0 = background.
            bbox_regression: [B, N, 4] box offsets.
            priors: [N, 4] default boxes, (cx, cy, w, h), normalised; or ``model.prior_grid``,
                the same boxes with their layout, which makes the matching several times faster.
            gt_boxes: [B, M, 4] padded ground truth, xyxy, normalised (see ``pad_targets``).
            gt_labels: int64 [B, M] class ids, 0-based without background; -1 is padding.
        """
        batch, num_priors, num_classes = cls_logits.shape
        with torch.no_grad():
            matched = match(gt_boxes, gt_labels, priors, self.iou_threshold)  # [B, N]
            positive = matched >= 0
            target_labels = torch.where(positive, gt_labels.gather(1, matched.clamp(min=0)) + 1, 0)  # [B, N]
            if bool((target_labels >= num_classes).any()):
                raise ValueError(f"a ground-truth class id is >= {num_classes - 1}, the model's class count")
            image, prior = positive.nonzero(as_tuple=True)  # row-major, the order of [positive] below
            prior_boxes = priors.boxes if isinstance(priors, PriorGrid) else priors
            target_offsets = encode(
                gt_boxes[image, matched[image, prior]], prior_boxes[prior], self.variances
            )

        num_positives = positive.sum()
        normaliser = num_positives.clamp(min=1).float()
        regression = F.smooth_l1_loss(
            bbox_regression[image, prior].float(), target_offsets.float(), reduction="sum"
        )

        with torch.no_grad():
            # Rank every negative by its loss, without a graph: only the chosen rows need one.
            ranking = F.cross_entropy(
                cls_logits.detach().reshape(-1, num_classes).float(),
                target_labels.reshape(-1),
                reduction="none",
            ).view(batch, num_priors)
            positives_per_image = positive.sum(dim=1)
            negatives_wanted = (positives_per_image * self.neg_pos_ratio).floor().long()
            negatives_wanted = negatives_wanted.clamp(min=self.min_negatives)
            negatives_wanted = torch.minimum(negatives_wanted, num_priors - positives_per_image)
            k = int(negatives_wanted.max())
            chosen_image, chosen_prior = image, prior
            if k > 0:
                hardest = ranking.masked_fill(positive, float("-inf")).topk(k, dim=1).indices  # [B, k]
                keep = torch.arange(k, device=hardest.device)[None, :] < negatives_wanted[:, None]
                rows = torch.arange(batch, device=hardest.device)[:, None].expand(-1, k)
                chosen_image = torch.cat([image, rows[keep]])
                chosen_prior = torch.cat([prior, hardest[keep]])
        classification = F.cross_entropy(
            cls_logits[chosen_image, chosen_prior].float(),
            target_labels[chosen_image, chosen_prior],
            reduction="sum",
        )

        regression = regression / normaliser
        classification = classification / normaliser
        return LossParts(regression + classification, regression, classification, num_positives)
