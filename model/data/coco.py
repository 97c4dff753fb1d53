"""COCO instances JSON (``images``, ``annotations``, ``categories``; boxes ``[x, y, w, h]`` pixels).

Classes are the categories sorted by id, as 0-based indices; ``dataset.category_ids[i]`` gives
back the original id of class ``i`` (COCO's 80 ids run from 1 to 90 with gaps), which results in
COCO format need. Images without annotations are kept, with no boxes (as torchvision's
``CocoDetection`` and pycocotools do).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .base import (
    Annotation,
    DatasetError,
    DetectionDataset,
    LabelledBox,
    Transform,
    make_annotation,
    read_image_size,
)

SPLIT_WORDS = ("train", "val", "test")
REQUIRED_KEYS = ("images", "annotations", "categories")


def _split_word(name: str) -> re.Match[str] | None:
    """The first word of a file name (runs of letters) that is a split name: ``val`` in
    ``instances_val2017.json``; ``trainval`` is none of them."""
    for match in re.finditer(r"[A-Za-z]+", name):
        if match.group().lower() in SPLIT_WORDS:
            return match
    return None


def is_instances_file(path: Path) -> bool:
    """Whether a JSON file holds COCO instances. ``instances_*.json`` is taken on its name; any other
    is parsed, which a directory scan does rarely."""
    if path.name.startswith("instances_"):
        return True
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in REQUIRED_KEYS)


def find_coco_files(folder: Path) -> list[Path]:
    """The instances JSON files in ``folder`` and ``folder/annotations``."""
    candidates = sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
    return [p for p in candidates if is_instances_file(p)]


def resolve_coco_json(path: Path, split: str) -> Path:
    """The JSON file for ``split``.

    A file whose name has a split word (``instances_train.json``) gives its sibling for another
    split (``instances_val.json``), which must exist; a file without one is used as it is. A
    directory picks, among its instances files (and those in ``annotations/``), the one whose
    name has the split word.
    """
    if path.is_dir():
        files = find_coco_files(path)
        chosen = [p for p in files if _split_of(p) == split]
        if chosen:
            return chosen[0]
        if len(files) == 1 and _split_of(files[0]) == "":
            return files[0]  # one file named for no split (Label Studio's result.json): the data
        named = [f"{_split_of(p)} ({p.name})" for p in files if _split_of(p)]
        raise DatasetError(
            f"{path}: no COCO instances file for split {split!r}; splits here: "
            f"{', '.join(named) if named else 'none'}"
            + (f"; ask for one of them (ssd evaluate --split {_split_of(files[0])})" if named else "")
        )
    match = _split_word(path.name)
    if match is None or match.group().lower() == split:
        return path
    sibling = resolve_sibling(path, split)
    if not sibling.is_file():
        raise DatasetError(
            f"{path}: split {split!r} asked for, but {sibling.name} is not beside it. To train and "
            f"validate on this one file, ask for its own split both times: --train-split "
            f"{match.group().lower()} --val-split {match.group().lower()}"
        )
    return sibling


def _split_of(path: Path) -> str:
    """The split a file is named for (``val`` for ``instances_val2017.json``), "" for none."""
    match = _split_word(path.stem)
    return match.group().lower() if match else ""


def coco_splits(path: Path | str) -> list[str]:
    """The splits of a COCO file or folder: the split words of its instances files (a file's
    siblings included), "" for one named for no split."""
    path = Path(path)
    if path.is_dir():
        return sorted({_split_of(p) for p in find_coco_files(path)})
    own = _split_of(path)
    if not own:
        return [""]
    return sorted({own} | {s for s in SPLIT_WORDS if s != own and resolve_sibling(path, s).is_file()})


def resolve_sibling(path: Path, split: str) -> Path:
    """``instances_train2017.json`` -> ``instances_val2017.json`` for ``val``."""
    match = _split_word(path.name)
    assert match is not None
    return path.with_name(path.name[: match.start()] + split + path.name[match.end() :])


def _split_folder(json_path: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``, the image folder of COCO's own layout."""
    stem = json_path.stem
    return stem.removeprefix("instances_")


def image_folder(json_path: Path, first_file: str, images_dir: Path | None) -> tuple[Path, bool]:
    """Where the images are, and whether they are found there by their base name alone:
    ``images_dir`` when given, else the first of ``json.parent``, ``json.parent/<split folder>``
    and ``json.parent.parent/<split folder>`` that holds the first image (COCO's
    ``annotations/instances_val2017.json`` beside ``val2017/``), else ``json.parent/images`` by
    base name: Label Studio's "COCO with images" export names each image by its path on the
    Label Studio server (``../../data/media/upload/1/x.jpg``) and packs it as ``images/x.jpg``."""
    if images_dir is not None:
        return Path(images_dir), False
    folder = _split_folder(json_path)
    candidates = [json_path.parent, json_path.parent / folder, json_path.parent.parent / folder]
    for candidate in candidates:
        if (candidate / first_file).exists():
            return candidate, False
    packed = json_path.parent / "images"
    if (packed / PurePosixPath(first_file).name).is_file():
        return packed, True
    raise DatasetError(
        f"{json_path}: image {first_file} not found in any of "
        f"{', '.join(str(c) for c in [*candidates, packed])} (give the folder with --images)"
    )


def _get(record: dict[str, Any], key: str, json_path: Path, what: str) -> Any:
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DatasetError(f"{json_path}: {what} has no {key!r}: {str(record)[:200]}") from None


def load_coco(
    path: Path | str,
    split: str = "train",
    images_dir: Path | str | None = None,
    transform: Transform | None = None,
) -> DetectionDataset:
    """A COCO instances file (or a folder of them, picked by ``split``), validated now: every
    annotation's image and category must exist, every image's header is read."""
    json_path = resolve_coco_json(Path(path), split)
    try:
        data = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{json_path}: not readable JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{json_path}: not a COCO instances file, no list {missing}")

    categories = sorted(data["categories"], key=lambda c: _get(c, "id", json_path, "a category"))
    category_ids = [int(c["id"]) for c in categories]
    if len(set(category_ids)) != len(category_ids):
        raise DatasetError(f"{json_path}: duplicate category ids")
    classes = [str(_get(c, "name", json_path, "a category")) for c in categories]
    class_index = {cid: i for i, cid in enumerate(category_ids)}

    images = data["images"]
    if not images:
        raise DatasetError(f"{json_path}: no images")
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    image_ids = {_get(im, "id", json_path, "an image") for im in images}
    for ann in data["annotations"]:
        image_id = _get(ann, "image_id", json_path, "an annotation")
        if image_id not in image_ids:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} refers to unknown image {image_id}")
        category = _get(ann, "category_id", json_path, "an annotation")
        if category not in class_index:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} has unknown category id {category}")
        bbox = _get(ann, "bbox", json_path, "an annotation")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{json_path}: annotation {ann.get('id')} bbox is {bbox!r}, not [x, y, w, h]")
        by_image[image_id].append(ann)

    first = str(_get(images[0], "file_name", json_path, "an image"))
    folder, by_name = image_folder(json_path, first, images_dir)
    annotations: list[Annotation] = []
    skipped: list[tuple[str, str]] = []
    for im in images:
        file_name = str(_get(im, "file_name", json_path, "an image"))
        image_path = folder / (PurePosixPath(file_name).name if by_name else file_name)
        width, height = read_image_size(image_path)
        stated = (im.get("width"), im.get("height"))
        if stated != (None, None) and stated != (width, height):
            raise DatasetError(
                f"{json_path}: image {file_name} is {width}x{height}, the file says "
                f"{im.get('width')}x{im.get('height')}"
            )
        anns = by_image.get(im["id"], [])
        try:
            xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        except (TypeError, ValueError):
            raise DatasetError(f"{json_path}: image {file_name} has a bbox that is not 4 numbers") from None
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        labels = [class_index[a["category_id"]] for a in anns]
        crowd = [bool(a.get("iscrowd", 0)) for a in anns]
        annotation, dropped = make_annotation(
            int(im["id"]), image_path, width, height, boxes, labels, f"{json_path} ({file_name})", crowd=crowd
        )
        if dropped:
            skipped.append((f"{json_path} ({file_name})", f"{dropped} box(es) of zero or negative area"))
        annotations.append(annotation)
    return DetectionDataset(annotations, classes, transform, category_ids=category_ids, skipped=skipped)


class CocoWriter:
    """Writes a COCO dataset, the layout :func:`load_coco` reads: ``annotations/instances_SPLIT.json``
    and the images in ``SPLIT/``; category ids are the class indices plus one.

    ``add`` each image, then ``finish`` (the JSON files)."""

    def __init__(self, root: Path, classes: Sequence[str], quality: int = 90) -> None:
        self.root, self.classes, self.quality = root, list(classes), quality
        self.images: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.annotations: dict[str, list[dict[str, Any]]] = defaultdict(list)
        (root / "annotations").mkdir(parents=True, exist_ok=True)

    def add(self, split: str, name: str, image: Image.Image, objects: Sequence[LabelledBox]) -> None:
        (self.root / split).mkdir(exist_ok=True)
        image.save(self.root / split / f"{name}.jpg", quality=self.quality)
        image_id = len(self.images[split]) + 1
        self.images[split].append(
            {"id": image_id, "file_name": f"{name}.jpg", "width": image.width, "height": image.height}
        )
        for item in objects:
            x_min, y_min, x_max, y_max = (int(v) for v in item.box)
            area = (x_max - x_min) * (y_max - y_min) if item.area is None else item.area
            self.annotations[split].append(
                {
                    "id": len(self.annotations[split]) + 1,
                    "image_id": image_id,
                    "category_id": item.label + 1,
                    "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )

    def finish(self) -> None:
        categories = [
            {"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(self.classes)
        ]
        for split, images in self.images.items():
            data = {
                "info": {"description": "written by ssd-detector", "version": "1"},
                "licenses": [],
                "images": images,
                "annotations": self.annotations[split],
                "categories": categories,
            }
            (self.root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
