"""Answers drawn on their image: boxes, labels and scores, and the tiles of a tiled answer. One
module for ``ssd predict --out`` and ``/detect`` with ``Accept: image/jpeg`` or ``image/png``.

A fixed colour per class (Tableau 10, by class id), lines as wide as the image is large, and
labels kept inside the image: above the box where there is room, else inside its top edge.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Distinct, readable colours for class ids (Tableau 10).
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
TILE_COLOUR = (255, 255, 255)
# The longest side a drawn answer has: a 40-megapixel photo drawn at full size would be a 120 MB
# image to draw and encode; people look at it on a screen.
MAX_SIDE = 2048


def drawn_size(width: int, height: int, longest: int = MAX_SIDE) -> tuple[int, int]:
    """The size an answer for a ``width`` x ``height`` image is drawn at (never larger)."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw(
    image: Image.Image,
    detections: Sequence[dict[str, Any]],
    tiles: Sequence[Sequence[float]] = (),
    scale: float = 1.0,
) -> Image.Image:
    """``image`` (RGB) with the contract's detection objects drawn on it, and ``tiles`` as thin
    outlines; boxes and tiles are in pixels of the original, ``scale`` times that in ``image``."""
    pen = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = _font(max(10, round(max(image.size) / 60)))
    for x0, y0, x1, y1 in tiles:
        pen.rectangle(tuple(v * scale for v in (x0, y0, x1, y1)), outline=TILE_COLOUR, width=1)
    for d in detections:
        colour = PALETTE[d["class_id"] % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in d["box"])
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 4, bottom - top + 4
        # Above the box where it fits, else just inside its top edge; never past a side.
        y = y0 - text_h if y0 - text_h >= 0 else min(max(y0, 0), max(image.height - text_h, 0))
        x = min(max(x0, 0), max(image.width - text_w, 0))
        pen.rectangle((x, y, x + text_w, y + text_h), fill=colour)
        pen.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)
    return image


def encode(image: Image.Image, media_type: str) -> bytes:
    """``image`` as ``image/jpeg`` or ``image/png``."""
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, "PNG", optimize=False)
    else:
        image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow before 10.1 has one size
        return ImageFont.load_default()
