"""Tiled inference: small objects in large photos.

An SSD sees a photo at its input size (320x320 for SSDlite): a 1920x1080 frame shrinks 6x across,
and an object of 60 px becomes 10 px, below what the network finds. Tiling runs the model on
overlapping crops at full resolution (tiles of the input size by default, 20% overlap) plus the
whole image at the model's size ("full + sliced", as the SAHI library does it, so that large
objects are not cut up), maps each tile's boxes back to the photo's pixels and merges them.

Merging, per class (``merge``): a box a tile edge cut (touching its tile's inner edge) that
lies mostly inside another box of its class (intersection over the smaller) is part of that
object, and merges into it; other overlaps are NMS's (IoU). NMS alone keeps the sliver a tile
edge leaves beside the whole object (its IoU with it is small), and SAHI's greedy merging of
every nested box lets a large box swallow the objects inside it: ``merge`` says the figures.

The grid comes from the image's header, before any pixel is decoded, so that admission counts a
tiled image as what it costs: its tiles plus the whole image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .artifact import Detections
from .errors import APIError

MERGE_IOS = 0.5  # SAHI's default match threshold for greedy merging
NMS_IOU = 0.45  # the artifacts' own NMS threshold (the SSD paper's)
AUTO_GROWTH = 1.25  # tile=auto grows its tiles by this factor until the grid fits the cap

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the oriented image


@dataclass(frozen=True)
class Tiling:
    """What a request asks: ``size`` None with ``auto`` for the model's input size, grown to fit
    ``SSD_MAX_TILES_PER_IMAGE``; ``(width, height)`` for a grid of its own; ``off`` is no Tiling."""

    auto: bool
    size: tuple[int, int] | None
    overlap: float

    @classmethod
    def parse(
        cls, tile: str | None, overlap: float | None, default: str, default_overlap: float
    ) -> Tiling | None:
        """``tile`` = ``auto``, ``off`` or ``WxH`` (a query parameter, an OIP parameter or the
        settings' default); 422 naming the parameter for anything else."""
        text = (tile if tile is not None else default).strip().lower()
        share = default_overlap if overlap is None else overlap
        if not (isinstance(share, int | float) and 0.0 <= share < 1.0):
            raise APIError(422, "tile_overlap: from 0 to less than 1", "invalid_parameters")
        if text == "off":
            return None
        if text == "auto":
            return cls(True, None, float(share))
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text)
        if match is None:
            raise APIError(422, "tile: auto, off, or WIDTHxHEIGHT in pixels (640x640)", "invalid_parameters")
        width, height = int(match.group(1)), int(match.group(2))
        if min(width, height) < 32:
            raise APIError(422, "tile: each side at least 32 pixels", "invalid_parameters")
        return cls(False, (width, height), float(share))

    def grid(self, width: int, height: int, input_size: tuple[int, int], max_tiles: int) -> list[Rect]:
        """The tiles of a ``width`` x ``height`` image (after EXIF orientation); [] when the image
        fits in one tile (the whole-image pass sees it at full resolution already). ``auto``
        grows its tiles until the grid has at most ``max_tiles``; an explicit size past it is 422."""
        if self.size is not None:
            tiles = _count(width, height, self.size, self.overlap)
            if tiles > max_tiles:
                raise APIError(
                    422,
                    f"tile {self.size[0]}x{self.size[1]} cuts this {width}x{height} image into "
                    f"{tiles} tiles; the most is {max_tiles} (SSD_MAX_TILES_PER_IMAGE)",
                    "invalid_parameters",
                )
            return _grid(width, height, self.size, self.overlap)
        tile_h, tile_w = input_size
        scale, size = 1.0, (tile_w, tile_h)
        # Counted before any list is made: a thin overlap (0.99) asks for a tile every pixel.
        while _count(width, height, size, self.overlap) > max_tiles:
            scale *= AUTO_GROWTH
            size = (math.ceil(tile_w * scale), math.ceil(tile_h * scale))
        return _grid(width, height, size, self.overlap)


def count(width: int, height: int, tiling: Tiling | None, input_size: tuple[int, int], max_tiles: int) -> int:
    """How many model inputs an image costs: its tiles plus the whole image (1 untiled)."""
    return 1 + (len(tiling.grid(width, height, input_size, max_tiles)) if tiling else 0)


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where tiles of ``tile`` pixels start along ``length``: every ``tile * (1 - overlap)``,
    the last one flush with the end (so every tile is whole and none leaves the image)."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _along(length: int, tile: int, overlap: float) -> int:
    """How many tiles ``_starts`` places along ``length``, without placing them."""
    if length <= tile:
        return 1
    step = max(1, int(tile * (1.0 - overlap)))
    return math.ceil((length - tile) / step) + 1


def _count(width: int, height: int, size: tuple[int, int], overlap: float) -> int:
    tile_w, tile_h = min(size[0], width), min(size[1], height)
    if tile_w >= width and tile_h >= height:
        return 0
    return _along(width, tile_w, overlap) * _along(height, tile_h, overlap)


def _grid(width: int, height: int, size: tuple[int, int], overlap: float) -> list[Rect]:
    tile_w, tile_h = min(size[0], width), min(size[1], height)
    if tile_w >= width and tile_h >= height:
        return []
    return [
        (x, y, x + tile_w, y + tile_h)
        for y in _starts(height, tile_h, overlap)
        for x in _starts(width, tile_w, overlap)
    ]


def merge(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], how: str = "fragments"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The boxes of every pass as one answer, per class, in descending score.

    ``parts``: (boxes float [n, 4] xyxy in pixels of the whole image, scores [n], labels [n],
    cut bool [n]: the box touches an inner edge of its tile, so it may be part of an object) of
    each pass. ``how``:

    - ``fragments`` (the service's): each box, in score order, takes the boxes of its class that
      overlap it by IoU >= ``NMS_IOU`` (dropped, as NMS drops them) and those of which it or they
      are a cut part (intersection over the smaller >= ``MERGE_IOS``, the smaller box touching
      its tile's inner edge: merged, the union kept);
    - ``nmm``: SAHI's greedy non-maximum merging: every box of the class with intersection over
      the smaller >= ``MERGE_IOS`` merged, cut or not;
    - ``nms``: per-class NMS at IoU ``NMS_IOU``, nothing merged.

    ``ssd bench tiles`` measured the three on shapes pasted on photos (docs/benchmarks.md):
    NMS keeps the sliver a tile edge leaves beside the whole object (one object, two boxes);
    greedy merging lets a large box swallow the smaller objects inside it (recall of 64-96 px
    objects 0.78 against NMS's 0.96); merging only cut parts keeps both.
    """
    boxes = np.concatenate([p[0] for p in parts]).astype(np.float64).reshape(-1, 4)
    scores = np.concatenate([p[1] for p in parts]).astype(np.float32)
    labels = np.concatenate([p[2] for p in parts]).astype(np.int64)
    cut = np.concatenate([p[3] for p in parts]).astype(bool)
    out_boxes, out_scores, out_labels = [], [], []
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)
        mine = mine[np.argsort(-scores[mine], kind="stable")]
        b, c = boxes[mine], cut[mine]
        areas = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
        free = np.ones(len(mine), dtype=bool)
        for i in range(len(mine)):
            if not free[i]:
                continue
            rest = np.flatnonzero(free)
            width = np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])
            height = np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])
            inter = np.clip(width, 0, None) * np.clip(height, 0, None)
            smaller = np.minimum(areas[i], areas[rest])
            ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
            union_area = areas[i] + areas[rest] - inter
            iou = np.divide(inter, union_area, out=np.zeros_like(inter), where=union_area > 0)
            if how == "nms":
                merged, dropped = rest == i, iou >= NMS_IOU
            elif how == "nmm":
                merged, dropped = (ios >= MERGE_IOS) | (rest == i), np.zeros_like(ios, dtype=bool)
            else:
                part = np.where(areas[rest] <= areas[i], c[rest], c[i])  # the smaller one is cut
                merged = ((ios >= MERGE_IOS) & part) | (rest == i)
                dropped = iou >= NMS_IOU
            free[rest[merged | dropped]] = False
            group = b[rest[merged]]
            out_boxes.append([group[:, 0].min(), group[:, 1].min(), group[:, 2].max(), group[:, 3].max()])
            out_scores.append(scores[mine[i]])
            out_labels.append(label)
    if not out_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return (
        np.asarray(out_boxes, np.float32)[order],
        np.asarray(out_scores, np.float32)[order],
        np.asarray(out_labels, np.int64)[order],
    )


def cut_by(boxes: np.ndarray, rect: Rect | None, width: int, height: int, margin: float = 2.0) -> np.ndarray:
    """Which of a pass's boxes (normalised to its input) touch an inner edge of its tile, within
    ``margin`` pixels: what a tile edge may have cut. None of the whole-image pass's."""
    if rect is None or len(boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    x0, y0, x1, y1 = rect
    mx, my = margin / (x1 - x0), margin / (y1 - y0)
    return (
        ((boxes[:, 0] <= mx) & (x0 > 0))
        | ((boxes[:, 1] <= my) & (y0 > 0))
        | ((boxes[:, 2] >= 1 - mx) & (x1 < width))
        | ((boxes[:, 3] >= 1 - my) & (y1 < height))
    )


def to_image(boxes: np.ndarray, rect: Rect | None, width: int, height: int) -> np.ndarray:
    """A pass's boxes, normalised to its input, in pixels of the whole image: ``rect`` the tile's
    rectangle, None for the whole-image pass."""
    x0, y0, x1, y1 = rect if rect is not None else (0, 0, width, height)
    scale = np.asarray([x1 - x0, y1 - y0, x1 - x0, y1 - y0], np.float64)
    return boxes.astype(np.float64) * scale + np.asarray([x0, y0, x0, y0], np.float64)


def merge_passes(
    passes: list[Detections],
    rects: tuple[Rect, ...],
    width: int,
    height: int,
    threshold: float,
    how: str = "fragments",
) -> Detections:
    """One image's detections over its whole-image pass (first) and its tiles (``rects``, in
    order), merged; boxes normalised to the whole image as an untiled answer's are. Scores under
    ``threshold`` are left out first: the answer drops them anyway, and the merge is quadratic."""
    parts = []
    for rect, found in zip((None, *rects), passes, strict=True):
        keep = found.scores >= threshold
        boxes = found.boxes[keep]
        parts.append(
            (
                to_image(boxes, rect, width, height),
                found.scores[keep],
                found.labels[keep],
                cut_by(boxes, rect, width, height),
            )
        )
    boxes, scores, labels = merge(parts, how)
    scale = np.asarray([width, height, width, height], np.float32)
    return Detections(boxes / scale, scores, labels, passes[-1].model)
