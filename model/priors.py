"""Default boxes (priors) of SSD, section 2.2 of the paper.

Our own generator rather than torchvision's ``DefaultBoxGenerator`` because we need the boxes as a
constant before any image is seen: for the loss, for the exported graph and for the service. Ours
is a pure function of the input size and the feature-map sizes, computed once in float64 and
kept in normalised ``(cx, cy, w, h)``. It gives the same boxes as torchvision's for the same
configuration (tested), including for non-square inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .box_coding import cxcywh_to_xyxy
from .config import PriorConfig


def default_boxes(
    config: PriorConfig, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]]
) -> Tensor:
    """All default boxes for one input size.

    Args:
        config: the layout.
        image_size: (H, W) of the network input.
        feature_sizes: (h, w) of each feature map, in head order.

    Returns:
        float32 [N, 4] boxes as (cx, cy, w, h), normalised to [0, 1] of the input. Ordered map by
        map, then row-major over cells, then box shape: the order of the heads' outputs.
    """
    if len(feature_sizes) != len(config.aspect_ratios):
        raise ValueError(
            f"{len(feature_sizes)} feature maps but {len(config.aspect_ratios)} aspect ratio sets"
        )
    height, width = image_size
    per_map = []
    for k, (rows, cols) in enumerate(feature_sizes):
        if config.steps is not None:
            # Cell centres at (j + 0.5) * step pixels: x over the width, y over the height.
            cells_x, cells_y = width / config.steps[k], height / config.steps[k]
        else:
            cells_x, cells_y = cols, rows
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cells_x
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / cells_y
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # [rows*cols, 2]
        shapes = torch.tensor(config.box_shapes(k), dtype=torch.float64)  # [A, 2]
        a = shapes.shape[0]
        boxes = torch.cat(
            [centres[:, None, :].expand(-1, a, -1), shapes[None, :, :].expand(rows * cols, -1, -1)], dim=-1
        )
        per_map.append(boxes.reshape(-1, 4))
    return torch.cat(per_map).to(torch.float32)


class PriorGrid:
    """Default boxes together with their grid layout, for fast IoU against ground truth.

    On one feature map, the box at (row i, column j, shape a) spans x in [x0(j, a), x1(j, a)] and
    y in [y0(i, a), y1(i, a)]: its overlap with a ground-truth box is an outer product of a
    width over (j, a) and a height over (i, a). The IoU of G boxes with all N default boxes then
    takes three passes over [G, N] instead of the dozen of a general IoU over box pairs, with
    the same floating-point operations in the same order as ``torchvision.ops.box_iou``, so the
    same values to the bit (tested).

    Args:
        boxes: [N, 4] default boxes, (cx, cy, w, h), as :func:`default_boxes` lays them out.
        feature_sizes: (h, w) of each feature map.
        boxes_per_location: box shapes per cell of each map.
    """

    def __init__(
        self, boxes: Tensor, feature_sizes: Sequence[tuple[int, int]], boxes_per_location: Sequence[int]
    ) -> None:
        self.boxes = boxes
        corners = cxcywh_to_xyxy(boxes)  # the very corners the general path gives box_iou
        self.maps: list[tuple[Tensor, Tensor, Tensor]] = []
        self.area_range: list[tuple[Tensor, Tensor]] = []  # per map: smallest, largest area of each shape
        start = 0
        for (rows, cols), shapes in zip(feature_sizes, boxes_per_location, strict=True):
            block = corners[start : start + rows * cols * shapes].view(rows, cols, shapes, 4)
            x = block[0, :, :, 0::2].contiguous()  # [cols, A, 2]: x0, x1 of each column and shape
            y = block[:, 0, :, 1::2].contiguous()  # [rows, A, 2]: y0, y1 of each row and shape
            if not (
                torch.equal(block[..., 0::2], x.expand(rows, -1, -1, -1))
                and torch.equal(block[..., 1::2], y[:, None].expand(-1, cols, -1, -1))
            ):
                raise ValueError("these default boxes are not laid out on a grid as default_boxes makes them")
            area = (x[None, :, :, 1] - x[None, :, :, 0]) * (
                y[:, None, :, 1] - y[:, None, :, 0]
            )  # [rows, cols, A]
            self.maps.append((x, y, area))
            flat = area.reshape(-1, shapes)
            self.area_range.append((flat.amin(dim=0), flat.amax(dim=0)))
            start += rows * cols * shapes
        if start != len(boxes):
            raise ValueError(f"the feature maps hold {start} default boxes, not {len(boxes)}")

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: torch.device | str) -> PriorGrid:
        moved = PriorGrid.__new__(PriorGrid)
        moved.boxes = self.boxes.to(device)
        moved.maps = [tuple(t.to(device) for t in m) for m in self.maps]
        moved.area_range = [tuple(t.to(device) for t in r) for r in self.area_range]
        return moved

    def map_size(self, k: int) -> int:
        return self.maps[k][2].numel()

    def map_iou(self, boxes: Tensor, k: int, out: Tensor | None = None) -> Tensor:
        """IoU of ``boxes`` (float [G, 4], xyxy) with the default boxes of map k: [G, rows*cols*A]."""
        x, y, prior_area = self.maps[k]
        rows, cols, shapes = prior_area.shape
        count = boxes.shape[0]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        gx = boxes[:, None, None, 0::2]  # [G, 1, 1, 2]
        gy = boxes[:, None, None, 1::2]
        width = (torch.minimum(gx[..., 1], x[..., 1]) - torch.maximum(gx[..., 0], x[..., 0])).clamp(min=0)
        height = (torch.minimum(gy[..., 1], y[..., 1]) - torch.maximum(gy[..., 0], y[..., 0])).clamp(min=0)
        inter = height[:, :, None, :] * width[:, None, :, :]  # [G, rows, cols, A]
        union = (area[:, None, None, None] + prior_area) - inter
        if out is None:
            out = boxes.new_empty(count, rows * cols * shapes)
        torch.div(inter, union, out=out.view(count, rows, cols, shapes))
        return out

    def iou(self, boxes: Tensor) -> Tensor:
        """IoU of ``boxes`` (float [G, 4], xyxy) with every default box: [G, N]."""
        out = boxes.new_empty(boxes.shape[0], len(self.boxes))
        start = 0
        for k in range(len(self.maps)):
            n = self.map_size(k)
            self.map_iou(boxes, k, out=out[:, start : start + n])
            start += n
        return out
