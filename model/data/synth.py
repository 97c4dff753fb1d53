"""The built-in synthetic dataset: coloured shapes on cluttered backgrounds, written to disk in a
real format (VOC, COCO or YOLO) so that it goes through the same loaders as any other dataset.

Six classes (:data:`CLASSES`), drawn as filled polygons (the circle is a 64-gon) stretched to an
aspect ratio between 0.7 and 1.4 and rotated, 1 to 10 per image, sides from 3% to 80% of the
image's, uniformly. (Log-uniform sizes put half of the objects under 14% of the side, below what
SSDlite320's smallest default box, 64 px, can match at IoU 0.5: a benchmark of the dataset more
than of the detector. Uniform sizes keep small objects, one in seven, without making them most.)
Objects are drawn in order and may hide
each other: an object more than 70% hidden (by later ones or by the image border) is left out of
the annotations; otherwise its box is the tight box of all its drawn pixels, hidden ones included
(what an annotator would draw for a partly occluded object), computed from its mask. Backgrounds
mix a gradient, soft colour blobs, grain, and lines, arcs and zigzags that belong to no class.

Everything comes from ``numpy.random.default_rng([seed, split, index])``: an image depends only on
the seed, its split and its index, so the same seed writes the same bytes, and a larger dataset
starts with the images of a smaller one.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .base import LabelledBox
from .coco import CocoWriter
from .voc import VocWriter
from .yolo import YoloWriter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
FORMATS = ("voc", "coco", "yolo")
SPLITS = ("train", "val")

MIN_SIZE, MAX_SIZE = 0.03, 0.8  # object extent, as a fraction of the image's shorter side
MAX_OBJECTS = 10
MAX_HIDDEN = 0.7  # an object hidden more than this is not annotated
MIN_BACKGROUND_DISTANCE = 100.0  # RGB distance of an object's colour to the background under it
MIN_OBJECT_DISTANCE = 80.0  # ... and to the colours of the objects it overlaps
JPEG_QUALITY = 90


def _unit_polygon(label: int) -> np.ndarray:
    """float [V, 2]: class ``label``'s outline in about [-1, 1]², y down, counter-clockwise on screen."""
    name = CLASSES[label]
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if name in ("triangle", "hexagon"):
        sides = 3 if name == "triangle" else 6
        t = -np.pi / 2 + np.arange(sides) * 2 * np.pi / sides
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    a = 0.32  # cross: half the arm's thickness
    return np.array(
        [
            [-a, -1],
            [a, -1],
            [a, -a],
            [1, -a],
            [1, a],
            [a, a],
            [a, 1],
            [-a, 1],
            [-a, a],
            [-1, a],
            [-1, -a],
            [-a, -a],
        ]
    )


def shape_vertices(
    label: int, centre: tuple[float, float], size: float, aspect: float = 1.0, angle: float = 0.0
) -> np.ndarray:
    """float [V, 2] x, y pixels: the outline of a ``size``-pixel shape stretched to ``aspect``
    (width / height, area kept), rotated by ``angle`` radians about ``centre``."""
    points = _unit_polygon(label) * (size / 2) * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return rotated + np.asarray(centre, dtype=float)


def polygon_area(vertices: np.ndarray) -> float:
    """Area of a simple polygon, vertices float [V, 2] (shoelace formula)."""
    x, y = vertices[:, 0], vertices[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def shape_mask(vertices: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """The pixels a filled polygon covers in an image of ``height`` x ``width``.

    Returns ``(mask, x0, y0)``: bool [h, w], the crop of the image starting at column ``x0`` and
    row ``y0`` that holds the polygon (empty when it is wholly outside). Drawn with PIL at an
    integer offset, so these are exactly the pixels ``ImageDraw.polygon`` fills in the full image.
    """
    x0 = max(0, math.floor(vertices[:, 0].min()))
    y0 = max(0, math.floor(vertices[:, 1].min()))
    x1 = min(width, math.ceil(vertices[:, 0].max()) + 1)
    y1 = min(height, math.ceil(vertices[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), dtype=bool), 0, 0
    canvas = Image.new("1", (x1 - x0, y1 - y0))
    ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in vertices], fill=1)
    return np.asarray(canvas, dtype=bool), x0, y0


@dataclass
class Shape:
    """One drawn object. vertices: float [V, 2] x, y pixels; box: float32 [4] xyxy pixel edges,
    the tight box of all its drawn pixels; pixels: how many it covers in the image, visible:
    how many are still seen at the end."""

    label: int
    vertices: np.ndarray
    colour: tuple[int, int, int]
    box: np.ndarray
    pixels: int
    visible: int
    truncated: bool


@dataclass
class Sample:
    """One rendered image: image RGB ``height`` x ``width``; boxes float32 [M, 4] xyxy pixel
    edges and labels int64 [M] of the annotated shapes (``shapes``, same order); ``dropped``: the
    drawn shapes left out, being more than :data:`MAX_HIDDEN` hidden."""

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    shapes: list[Shape]
    dropped: list[Shape]

    def objects(self) -> list[LabelledBox]:
        """The annotated shapes as the format writers take them."""
        return [
            LabelledBox(s.label, tuple(float(v) for v in s.box), s.truncated, s.visible) for s in self.shapes
        ]


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A gradient between two colours, soft colour blobs and grain, then clutter lines."""
    c1, c2 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.arange(width, dtype=np.float32)[None, :] * math.cos(theta) + np.arange(
        height, dtype=np.float32
    )[:, None] * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = c1 + (c2 - c1) * ramp[..., None]

    cells = int(rng.integers(2, 7))
    blobs = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    mix = rng.uniform(0.2, 0.6)
    image = image * (1 - mix) + np.asarray(blobs, dtype=np.float32) * mix

    step = int(rng.choice([1, 2, 4]))
    grain = rng.standard_normal((height // step + 1, width // step + 1), dtype=np.float32)
    grain = np.asarray(Image.fromarray(grain, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    image += grain[..., None] * rng.uniform(4, 20)

    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)

    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    def point() -> tuple[float, float]:
        return float(rng.uniform(0, width)), float(rng.uniform(0, height))

    for _ in range(int(rng.integers(0, 8))):
        draw.line([point(), point()], fill=colour(), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = point()
        r = rng.uniform(0.05, 0.4) * side
        start = rng.uniform(0, 360)
        # Less than three quarters of a turn, so that an arc never reads as a circle.
        draw.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start,
            start + rng.uniform(40, 260),
            fill=colour(),
            width=int(rng.integers(1, 4)),
        )
    for _ in range(int(rng.integers(0, 3))):
        draw.line(
            [point() for _ in range(int(rng.integers(3, 7)))], fill=colour(), width=int(rng.integers(1, 3))
        )
    return canvas


def _pick_colour(
    rng: np.random.Generator, under: np.ndarray, overlapped: list[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """A colour far from ``under`` (float [3], the mean background beneath the object) and from the
    colours of the objects it overlaps; the best of the candidates where none is far enough."""
    candidates = rng.integers(0, 256, (32, 3)).astype(np.float32)
    score = np.linalg.norm(candidates - under, axis=1) - MIN_BACKGROUND_DISTANCE
    if overlapped:
        others = np.asarray(overlapped, dtype=np.float32)
        nearest = np.linalg.norm(candidates[:, None] - others[None], axis=2).min(axis=1)
        score = np.minimum(score, nearest - MIN_OBJECT_DISTANCE)
    good = np.flatnonzero(score >= 0)
    best = good[0] if len(good) else int(score.argmax())
    return tuple(int(c) for c in candidates[best])


def render(
    rng: np.random.Generator,
    image_size: tuple[int, int] = (320, 320),
    max_objects: int = MAX_OBJECTS,
    plain: bool = False,
    background: Image.Image | None = None,
    sizes: tuple[float, float] = (MIN_SIZE, MAX_SIZE),
    classes: int = len(CLASSES),
) -> Sample:
    """One synthetic image (``image_size`` = height, width) and its annotations.

    ``plain`` draws flat-coloured shapes on a flat background without clutter, shading or grain,
    so that the pixels of each object can be told apart (for tests). ``background``: draw on this
    picture (resized to ``image_size``) instead of a generated one. ``sizes``: the range of object
    extents, as fractions of the shorter side; ``classes``: draw only the first that many of
    :data:`CLASSES`.
    """
    height, width = image_size
    side = min(height, width)
    if background is not None:
        canvas = background.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    elif plain:
        background_colour = rng.integers(0, 256, 3)
        canvas = Image.new("RGB", (width, height), tuple(int(c) for c in background_colour))
    else:
        canvas = _background(rng, height, width)
    pixels = np.array(canvas, dtype=np.float32)  # [H, W, 3], objects are painted into it
    background = pixels.copy()
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the shape seen at each pixel
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(classes))
        size = side * rng.uniform(*sizes)
        # Up to a quarter of the shape may lie outside the image: truncated objects, as in photos.
        margin = min(size / 4, side / 2)
        centre = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
        vertices = shape_vertices(label, centre, size, rng.uniform(0.7, 1.4), rng.uniform(0, 2 * np.pi))
        mask, x0, y0 = shape_mask(vertices, height, width)
        if not mask.any():
            continue
        h, w = mask.shape
        region = (slice(y0, y0 + h), slice(x0, x0 + w))
        under = background[region][mask].mean(axis=0)
        overlapped = sorted({int(i) for i in np.unique(owner[region][mask]) if i >= 0})
        colour = _pick_colour(rng, under, [shapes[i].colour for i in overlapped])
        fill = np.asarray(colour, dtype=np.float32)
        if not plain:
            # A linear shading across the object, so that colour alone is not the whole cue.
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            direction = rng.uniform(0, 2 * np.pi)
            ramp = (xx - w / 2) * math.cos(direction) + (yy - h / 2) * math.sin(direction)
            fill = fill * (1 + rng.uniform(0, 0.25) * ramp / max(h, w))[mask][:, None]
        pixels[region][mask] = fill
        owner[region][mask] = len(shapes)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float32)
        truncated = bool(vertices.min() < 0 or vertices[:, 0].max() > width or vertices[:, 1].max() > height)
        shapes.append(Shape(label, vertices, colour, box, int(mask.sum()), 0, truncated))

    visible = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]
    kept, dropped = [], []
    for shape, seen in zip(shapes, visible, strict=True):
        shape.visible = int(seen)
        # The polygon's own area counts what the image border cuts off as hidden too.
        whole = max(polygon_area(shape.vertices), shape.pixels)
        (kept if seen >= (1 - MAX_HIDDEN) * whole else dropped).append(shape)

    if not plain:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(1, 6)
    image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    return Sample(
        image=image,
        boxes=np.array([s.box for s in kept], dtype=np.float32).reshape(-1, 4),
        labels=np.array([s.label for s in kept], dtype=np.int64),
        shapes=kept,
        dropped=dropped,
    )


WRITERS = {"voc": VocWriter, "coco": CocoWriter, "yolo": YoloWriter}


def generate(
    out: Path | str,
    format: str = "voc",
    images: int = 2000,
    val_images: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 320),
) -> Path:
    """Write ``images`` training and ``val_images`` (default 15% of ``images``, at least 1)
    validation images of ``image_size`` (height, width) to ``out`` in ``format`` and return ``out``.

    Layouts: ``voc``: Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt, labels.txt;
    ``coco``: annotations/instances_{train,val}.json, train/, val/; ``yolo``: data.yaml,
    images/{train,val}/, labels/{train,val}/. ``out`` must not exist or be empty. The dataset is
    written to a temporary folder beside it and renamed into place, so that an interrupted run
    leaves no half dataset behind.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if val_images is None:
        val_images = max(1, round(0.15 * images))
    if images < 1 or val_images < 1:
        raise ValueError(f"need at least one image per split, got {images} train and {val_images} val")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = WRITERS[format](tmp, CLASSES, quality=JPEG_QUALITY)
        with tqdm(total=images + val_images, desc=f"synthetic {format}", unit="img") as bar:
            for code, (split, count) in enumerate(((SPLITS[0], images), (SPLITS[1], val_images))):
                for index in range(count):
                    sample = render(np.random.default_rng([seed, code, index]), image_size)
                    writer.add(split, f"{split}_{index:06d}", sample.image, sample.objects())
                    bar.update()
        writer.finish()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
