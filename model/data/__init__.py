"""Datasets on disk (Pascal VOC, COCO, YOLO), detected from what is there, and the built-in
synthetic dataset (:mod:`model.data.synth`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .base import Annotation, DatasetError, DetectionDataset, Transform
from .coco import coco_splits, find_coco_files, load_coco
from .voc import load_voc, voc_splits
from .yolo import find_yaml, load_yolo, yolo_splits

Format = Literal["voc", "coco", "yolo"]

LAYOUTS = (
    "a Pascal VOC root (Annotations/, JPEGImages/, ImageSets/Main/*.txt), "
    "a COCO instances JSON file (images, annotations, categories) or a folder holding "
    "annotations/instances_*.json, "
    "a YOLO dataset (a yaml file with names and train/val, such as data.yaml, or the folder holding it)"
)


def detect_format(path: Path | str) -> Format:
    """Which format ``path`` is in, from what is on disk.

    VOC: a folder with ``Annotations/`` and ``JPEGImages/``. YOLO: a ``.yaml`` file, or a folder
    with ``data.yaml``/``dataset.yaml`` or another yaml file that describes a dataset. COCO: a
    ``.json`` file (its keys are checked when it is loaded, so that a large file is parsed once),
    or a folder with instances JSON files in it or in its ``annotations/``. Anything else is a
    :class:`DatasetError` listing what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder; expected {LAYOUTS}")
    if path.is_file():
        if find_yaml(path) is not None:
            return "yolo"
        if path.suffix == ".json":
            return "coco"
    else:
        if (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir():
            return "voc"
        if find_yaml(path) is not None:
            return "yolo"
        if find_coco_files(path):
            return "coco"
    raise DatasetError(f"{path}: not a dataset; expected {LAYOUTS}")


def splits(path: Path | str) -> list[str]:
    """The split names the dataset at ``path`` has on disk, sorted; "" stands for data that is
    named for no split (a COCO file such as Label Studio's ``result.json``), which opens under
    any split name."""
    fmt = detect_format(path)
    if fmt == "coco":
        return coco_splits(path)
    return voc_splits(path) if fmt == "voc" else yolo_splits(path)


def open_dataset(
    path: Path | str,
    split: str = "train",
    images_dir: Path | str | None = None,
    transform: Transform | None = None,
) -> DetectionDataset:
    """The ``split`` of the dataset at ``path``, in whichever format it is, fully validated.

    ``images_dir`` is where a COCO file's images are (by default found beside it, see
    :func:`model.data.coco.image_folder`); other formats say where their images are themselves.
    """
    fmt = detect_format(path)
    if fmt == "coco":
        return load_coco(path, split, images_dir, transform)
    if images_dir is not None:
        raise DatasetError(f"{path}: an images folder is only for COCO files; this is a {fmt} dataset")
    if fmt == "voc":
        return load_voc(path, split, transform)
    return load_yolo(path, split, transform)


__all__ = ["Annotation", "DatasetError", "DetectionDataset", "detect_format", "open_dataset", "splits"]
