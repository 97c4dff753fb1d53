"""YOLO (Ultralytics) layout: a ``data.yaml`` with ``names`` and ``train``/``val``/``test``.

``path`` in the yaml is the dataset root, relative to the yaml's folder (the folder itself when
absent); each split is an image folder (searched recursively) or a ``.txt`` list of image paths
(relative ones are relative to the list's folder), or a list of those. The label file of
``.../images/x.jpg`` is ``.../labels/x.txt`` (the last ``images`` path component replaced, as
Ultralytics does; beside the image where the path has none), one ``class cx cy w h`` line per
object, normalised to [0, 1]. A missing or empty label file is an image without objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .base import (
    Annotation,
    DatasetError,
    DetectionDataset,
    LabelledBox,
    Transform,
    make_annotation,
    read_image_size,
    reading,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
YAML_NAMES = ("data.yaml", "dataset.yaml")
SPLITS = ("train", "val", "test")
# Coordinates a little outside [0, 1] are rounding in exporters; beyond that they are not
# normalised at all (pixels), and clipping them would give plausible but wrong boxes.
COORD_TOLERANCE = 0.01


def find_yaml(path: Path) -> Path | None:
    """``path`` itself when it is a yaml file; in a folder, its ``data.yaml``/``dataset.yaml``,
    else the one yaml file there that describes a dataset (``names`` and ``train`` or ``val``:
    LightlyTrain's ``config.yaml``, a file named after the dataset), else None. Any yaml would
    not do: a run folder holds a ``config.yaml`` too. Several that do are a DatasetError."""
    if path.is_file():
        return path if path.suffix in {".yaml", ".yml"} else None
    for name in YAML_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(
        p for p in (*path.glob("*.yaml"), *path.glob("*.yml")) if p.is_file() and _describes_dataset(p)
    )
    if len(found) > 1:
        raise DatasetError(
            f"{path}: {', '.join(p.name for p in found)} all describe a dataset; give the one to use"
        )
    return found[0] if found else None


def _describes_dataset(path: Path) -> bool:
    """A yaml mapping with ``names`` and a ``train`` or ``val`` split."""
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "names" in config and any(config.get(s) for s in ("train", "val"))


def _names(config: dict[str, Any], yaml_path: Path) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' keys must be class ids") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{yaml_path}: 'names' ids must be 0..{len(ids) - 1}, got {ids}")
        by_id = {int(k): v for k, v in names.items()}
        names = [by_id[i] for i in ids]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{yaml_path}: 'names' must be a non-empty list or {{id: name}} mapping")
    if "nc" in config and config["nc"] != len(names):
        raise DatasetError(f"{yaml_path}: nc is {config['nc']} but there are {len(names)} names")
    return [str(n) for n in names]


def _images_of(entry: Path, yaml_path: Path) -> list[Path]:
    """The image files of a split entry: a folder (recursive) or a .txt list of paths."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if entry.is_file() and entry.suffix == ".txt":
        lines = [line.strip() for line in entry.read_text().splitlines() if line.strip()]
        return [p if p.is_absolute() else entry.parent / p for p in map(Path, lines)]
    raise DatasetError(f"{yaml_path}: {entry} is neither an image folder nor a .txt list of images")


def label_path(image: Path) -> Path:
    """``.../images/a/x.jpg`` -> ``.../labels/a/x.txt`` (the last ``images`` component)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def parse_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels int64 [M], boxes float32 [M, 4] cx, cy, w, h normalised)``; a missing file is no
    objects. A line that is not 5 numbers, a class id that is not an integer in range, or a
    coordinate outside [0, 1] is a DatasetError naming the file and line."""
    if not path.is_file():
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    labels, boxes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != 5 or not np.isfinite(values).all():
            raise DatasetError(
                f"{path}:{number}: expected 'class cx cy w h' (5 numbers), got {line.strip()!r}"
            )
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DatasetError(f"{path}:{number}: class id {fields[0]} out of range 0..{num_classes - 1}")
        if any(not -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE for v in values[1:]):
            raise DatasetError(f"{path}:{number}: coordinates {fields[1:]} are not normalised to [0, 1]")
        labels.append(int(cls))
        boxes.append(values[1:])
    return np.asarray(labels, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def yolo_splits(path: Path | str) -> list[str]:
    """The splits a YOLO dataset's yaml names (``train``, ``val``, ``test``)."""
    yaml_path = find_yaml(Path(path))
    try:
        config = yaml.safe_load(yaml_path.read_text()) if yaml_path else None
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return []  # load_yolo says what is wrong with it
    return [s for s in SPLITS if isinstance(config, dict) and config.get(s)]


def load_yolo(path: Path | str, split: str = "train", transform: Transform | None = None) -> DetectionDataset:
    """The images of ``split`` in a YOLO dataset (``path``: the yaml file or the folder holding
    it); every label file is parsed and every image header read now."""
    path = Path(path)
    yaml_path = find_yaml(path)
    if yaml_path is None:
        raise DatasetError(
            f"{path}: no {' or '.join(YAML_NAMES)}, nor another yaml file with names and train/val"
        )
    try:
        config = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{yaml_path}: not a mapping")
    classes = _names(config, yaml_path)
    root = yaml_path.parent / config["path"] if config.get("path") else yaml_path.parent
    entries = config.get(split)
    if not entries:
        present = [s for s in SPLITS if config.get(s)]
        raise DatasetError(f"{yaml_path}: no split {split!r}; splits here: {', '.join(present) or 'none'}")
    images: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        images += _images_of(root / str(entry), yaml_path)
    if not images:
        raise DatasetError(f"{yaml_path}: split {split!r} has no images")

    annotations: list[Annotation] = []
    skipped: list[tuple[str, str]] = []
    unlabelled = 0
    for image_id, image_path in enumerate(reading(images, f"reading {split}")):
        width, height = read_image_size(image_path)
        labels_file = label_path(image_path)
        unlabelled += not labels_file.is_file()
        labels, cxcywh = parse_label_file(labels_file, len(classes))
        scale = np.asarray([width, height, width, height], np.float32)
        boxes = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
        annotation, dropped = make_annotation(
            image_id, image_path, width, height, boxes * scale, labels, labels_file
        )
        if dropped:
            skipped.append((str(labels_file), f"{dropped} box(es) of zero or negative area inside the image"))
        annotations.append(annotation)
    skipped += [(str(p), "a label file with no image beside it in this split") for p in _orphans(images)]
    notes = (
        [f"{unlabelled} images have no label file: taken as background (no objects)"] if unlabelled else []
    )
    return DetectionDataset(annotations, classes, transform, skipped=skipped, notes=notes)


def _orphans(images: list[Path]) -> list[Path]:
    """Label files in the label folders of ``images`` that belong to none of them (an image
    deleted, renamed or given another extension)."""
    expected = {label_path(p) for p in images}
    folders = {p.parent for p in expected if p.parent.is_dir()}
    return sorted(p for folder in folders for p in folder.glob("*.txt") if p not in expected)


class YoloWriter:
    """Writes a YOLO dataset, the layout :func:`load_yolo` reads: ``data.yaml``, ``images/SPLIT/``
    and ``labels/SPLIT/`` (one normalised ``class cx cy w h`` line per object).

    ``add`` each image, then ``finish`` (the yaml)."""

    def __init__(self, root: Path, classes: Sequence[str], quality: int = 90) -> None:
        self.root, self.classes, self.quality = root, list(classes), quality
        self.splits: list[str] = []

    def add(self, split: str, name: str, image: Image.Image, objects: Sequence[LabelledBox]) -> None:
        if split not in self.splits:
            (self.root / "images" / split).mkdir(parents=True, exist_ok=True)
            (self.root / "labels" / split).mkdir(parents=True, exist_ok=True)
            self.splits.append(split)
        image.save(self.root / "images" / split / f"{name}.jpg", quality=self.quality)
        width, height = image.size
        lines = []
        for item in objects:
            x_min, y_min, x_max, y_max = item.box
            cx, cy = (x_min + x_max) / 2 / width, (y_min + y_max) / 2 / height
            w, h = (x_max - x_min) / width, (y_max - y_min) / height
            lines.append(f"{item.label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        (self.root / "labels" / split / f"{name}.txt").write_text("".join(lines))

    def finish(self) -> None:
        config = {"path": ".", **{split: f"images/{split}" for split in self.splits}, "names": self.classes}
        (self.root / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
