"""What an artifact is verified against: the same network and post-processing run by PyTorch.

A ``Reference`` gives, for uint8 NHWC batches, the final padded detections (``detect``) and the
stage before the selection (``raw``: class scores and decoded boxes), so that a failed check
can say where the two pipelines part (diagnose.py).

- ``eager_reference``: our own eager code path, the export graph run by PyTorch (our models, the
  class-agnostic variant).
- ``torchvision_reference``: torchvision's own SSD with the same state dict and our thresholds:
  the yardstick for ``ssd export --torchvision``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.config import PostprocessConfig
from model.postprocess import decode_outputs
from model.registry import get_spec
from model.ssd import SSD

from .graph import DetectionGraph
from .verify import Outputs

Raw = tuple[np.ndarray, np.ndarray]  # scores float32 [B, N, C] (no background), boxes [B, N, 4]


@dataclass(frozen=True)
class Reference:
    name: str  # says whose pipeline it is, in messages
    detect: Callable[[np.ndarray], Outputs]  # uint8 [B, H, W, 3] -> padded detections
    raw: Callable[[np.ndarray], Raw]  # uint8 [B, H, W, 3] -> scores and boxes before selection

    def __call__(self, images: np.ndarray) -> Outputs:
        return self.detect(images)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def eager_reference(model: SSD, config: PostprocessConfig) -> Reference:
    graph = DetectionGraph(model.eval(), config).eval()

    @torch.no_grad()
    def detect(images: np.ndarray) -> Outputs:
        return Outputs(*(t.numpy() for t in graph(torch.from_numpy(images))))

    @torch.no_grad()
    def raw(images: np.ndarray) -> Raw:
        scores, boxes = decode_outputs(*model(_pixels(images)), model.priors)
        return scores.numpy(), boxes.numpy()

    return Reference("PyTorch (eager export graph)", detect, raw)


def torchvision_reference(
    name: str, num_classes: int, state_dict: dict[str, torch.Tensor], config: PostprocessConfig
) -> Reference:
    """torchvision's ``name`` with ``state_dict`` and our thresholds, as padded, normalised outputs."""
    from torchvision.models import detection
    from torchvision.ops import boxes as box_ops

    tv: nn.Module = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)
    tv.load_state_dict(state_dict)
    tv.eval()
    tv.score_thresh = config.score_threshold
    tv.nms_thresh = config.iou_threshold
    tv.topk_candidates = config.topk_candidates
    # torchvision cuts to K before anything else could drop a box, and keeps boxes that clipping
    # flattened to zero area; the artifact drops those before its cut at K. So let torchvision
    # keep every NMS survivor (at most topk_candidates per class), drop the empty boxes, and cut
    # at K here. Empty boxes overlap nothing (IoU 0), so they never changed which boxes NMS kept.
    tv.detections_per_img = (num_classes - 1) * config.topk_candidates
    height, width = get_spec(name).input_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    k = config.max_detections

    @torch.no_grad()
    def detect(images: np.ndarray) -> Outputs:
        results = tv(list(_pixels(images)))
        out = Outputs(
            np.zeros(len(images), np.int64),
            np.zeros((len(images), k, 4), np.float32),
            np.zeros((len(images), k), np.float32),
            np.full((len(images), k), -1, np.int64),
        )
        for i, r in enumerate(results):
            boxes = r["boxes"] / scale
            keep = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)[:k]
            n = len(keep)
            out.num_detections[i] = n
            out.boxes[i, :n] = boxes[keep].numpy()
            out.scores[i, :n] = r["scores"][keep].numpy()
            out.labels[i, :n] = r["labels"][keep].numpy() - 1  # torchvision counts the background
        return out

    @torch.no_grad()
    def raw(images: np.ndarray) -> Raw:
        """What torchvision's ``postprocess_detections`` starts from, step for step."""
        batch, _ = tv.transform(list(_pixels(images)))
        features = list(tv.backbone(batch.tensors).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(batch, features)
        scores = torch.softmax(head["cls_logits"], dim=-1)[:, :, 1:]
        boxes = torch.stack(
            [
                box_ops.clip_boxes_to_image(tv.box_coder.decode_single(regression, anchor), size)
                for regression, anchor, size in zip(
                    head["bbox_regression"], anchors, batch.image_sizes, strict=True
                )
            ]
        )
        return scores.numpy(), (boxes / scale).numpy()

    return Reference(f"torchvision's {name}", detect, raw)
