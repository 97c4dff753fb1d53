"""The whole detector as one module, from uint8 pixels to padded detections: what is exported.

    images uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] -> SSD (normalises inside)
    -> softmax, decoding against the default boxes -> select_detections (top-k, NMS, top K)

``raw=True`` stops after decoding and returns boxes [B, N, 4] and class scores [B, N, C], for
runtimes that bring their own NMS (TensorRT's EfficientNMS plugin takes exactly these).
"""

from __future__ import annotations

import ast

import onnx
import torch
from torch import Tensor, nn

from model.postprocess import PostprocessConfig, decode_outputs
from model.ssd import SSD

from . import nms  # noqa: F401 - registers torch.ops.ssd.select_detections


class DetectionGraph(nn.Module):
    def __init__(self, model: SSD, config: PostprocessConfig, raw: bool = False) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.raw = raw

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """
        Args:
            images: uint8 [B, H, W, 3], RGB, (H, W) = the model's input size.

        Returns:
            num_detections int64 [B], boxes float [B, K, 4] (xyxy in [0, 1]), scores float [B, K],
            labels int64 [B, K]; or with ``raw``: boxes [B, N, 4] and scores [B, N, C].
        """
        pixels = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        cls_logits, bbox_regression = self.model(pixels)
        scores, boxes = decode_outputs(cls_logits, bbox_regression, self.model.priors)
        if self.raw:
            return boxes, scores
        c = self.config
        return torch.ops.ssd.select_detections(
            scores,
            boxes,
            c.score_threshold,
            c.iou_threshold,
            c.topk_candidates,
            c.max_detections,
            c.class_agnostic,
        )


def module_path(node: onnx.NodeProto) -> list[str]:
    """The module path the dynamo exporter recorded for ``node``, outermost first, e.g.
    ``['', 'model', 'model.backbone', ..., 'conv2d_3']``; the network's nodes have ``'model'``
    (``DetectionGraph.model``) second."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
    return ast.literal_eval(scopes)
