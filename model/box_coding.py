"""Box encoding against default boxes, with the SSD variances.

Same arithmetic as torchvision's ``BoxCoder(weights=(10, 10, 5, 5))`` (weights are 1/variance),
but on priors kept in (cx, cy, w, h) and on whole batches [..., N, 4] at once: torchvision's
coder converts its xyxy anchors back to centre form on every call, once per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VARIANCES = (0.1, 0.1, 0.2, 0.2)
# exp() of a larger log-scale overflows float16 (max 65504) once multiplied by a prior's size;
# torchvision clamps at the same value.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def encode(boxes: Tensor, priors: Tensor, variances: tuple[float, float, float, float] = VARIANCES) -> Tensor:
    """Regression targets of ``boxes`` against ``priors``.

    Args:
        boxes: [..., N, 4] ground-truth boxes, xyxy.
        priors: [N, 4] default boxes, (cx, cy, w, h), same coordinate frame as ``boxes``.

    Returns:
        [..., N, 4] offsets (dx, dy, dw, dh) divided by the variances.
    """
    gt = xyxy_to_cxcywh(boxes)
    centre = (gt[..., :2] - priors[:, :2]) / (priors[:, 2:] * boxes.new_tensor(variances[:2]))
    size = torch.log(gt[..., 2:] / priors[:, 2:]) / boxes.new_tensor(variances[2:])
    return torch.cat([centre, size], dim=-1)


def decode(
    deltas: Tensor, priors: Tensor, variances: tuple[float, float, float, float] = VARIANCES
) -> Tensor:
    """Boxes from regression outputs; the inverse of :func:`encode`.

    Args:
        deltas: [..., N, 4] network outputs.
        priors: [N, 4] default boxes, (cx, cy, w, h).

    Returns:
        [..., N, 4] boxes, xyxy, in the priors' coordinate frame (unclipped).
    """
    centre = priors[:, :2] + deltas[..., :2] * deltas.new_tensor(variances[:2]) * priors[:, 2:]
    log_scale = (deltas[..., 2:] * deltas.new_tensor(variances[2:])).clamp(max=MAX_LOG_SCALE)
    size = priors[:, 2:] * torch.exp(log_scale)
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
