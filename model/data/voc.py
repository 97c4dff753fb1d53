"""Pascal VOC: ``ImageSets/Main/{split}.txt``, ``Annotations/{id}.xml``, ``JPEGImages/{id}.jpg``.

Coordinates: VOC boxes are 1-based and inclusive (a box covering only the top-left pixel is
``1 1 1 1``). They are converted to the pixel-edge xyxy convention used everywhere else here
(that pixel is ``[0, 0, 1, 1]``) as ``x_min - 1, y_min - 1, x_max, y_max``, then clipped. This is
the ``- 1`` of the original SSD and py-faster-rcnn code, for both corners' start; torchvision's
``VOCDetection`` returns the raw numbers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

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
    reading,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CLASS_FILES = ("labels.txt", "classes.txt")


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line (blank lines skipped); duplicates are an error naming the file."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: no class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: duplicate class names {duplicates}")
    return names


def voc_classes(root: Path) -> list[str]:
    """The root's ``labels.txt`` or ``classes.txt`` where there is one, else the 20 VOC classes."""
    for name in CLASS_FILES:
        if (root / name).is_file():
            return read_class_file(root / name)
    return list(VOC_CLASSES)


def voc_splits(root: Path | str) -> list[str]:
    """The split names of a VOC root (``ImageSets/Main/{split}.txt``)."""
    return _splits(Path(root), voc_classes(Path(root)))


def _splits(root: Path, classes: Sequence[str]) -> list[str]:
    """The split names under ImageSets/Main, leaving out VOC's per-class ``{class}_{split}.txt``."""
    folder = root / "ImageSets" / "Main"
    stems = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    return [s for s in stems if not any(s.startswith(f"{c}_") for c in classes)]


def _text(element: ET.Element, tag: str, xml_path: Path) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{xml_path}: <{element.tag}> has no <{tag}>")
    return child.text.strip()


def _number(element: ET.Element, tag: str, xml_path: Path) -> float:
    text = _text(element, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml_path}: <{tag}> is {text!r}, not a number") from None


def parse_voc_xml(
    xml_path: Path, classes: Sequence[str]
) -> tuple[str | None, tuple[int, int] | None, np.ndarray, np.ndarray, np.ndarray]:
    """One annotation file: ``(filename, (width, height) or None, boxes, labels, difficult)``.

    boxes: float32 [M, 4] xyxy pixel edges (converted from VOC's 1-based inclusive numbers, not
    clipped yet); labels: int64 [M]; difficult: bool [M]. The size is None where ``<size>`` is
    absent, incomplete or zero (some VOC files have it so), and is then read from the image.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: not valid XML ({exc})") from None
    index = {name: i for i, name in enumerate(classes)}
    filename = root.findtext("filename")
    size = None
    size_element = root.find("size")
    if size_element is not None and all(size_element.findtext(t, "").strip() for t in ("width", "height")):
        width = int(_number(size_element, "width", xml_path))
        height = int(_number(size_element, "height", xml_path))
        size = (width, height) if width > 0 and height > 0 else None
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", xml_path)
        if name not in index:
            raise DatasetError(
                f"{xml_path}: unknown class name {name!r} (classes: {', '.join(classes)}). A VOC "
                f"dataset with classes of its own lists them, one name per line, in "
                f"{xml_path.parent.parent / CLASS_FILES[0]}"
            )
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{xml_path}: object {name!r} has no <bndbox>")
        x_min, y_min, x_max, y_max = (_number(box, tag, xml_path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x_min - 1, y_min - 1, x_max, y_max))
        labels.append(index[name])
        flag = obj.findtext("difficult")
        difficult.append(bool(int(float(flag))) if flag and flag.strip() else False)
    return (
        filename.strip() if filename else None,
        size,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def load_voc(root: Path | str, split: str = "train", transform: Transform | None = None) -> DetectionDataset:
    """The images listed in ``ImageSets/Main/{split}.txt``, every annotation file parsed and every
    image header read now, so that bad data is reported here naming the file."""
    root = Path(root)
    classes = voc_classes(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        found = _splits(root, classes)
        raise DatasetError(
            f"{split_file}: no such split file; splits here: {', '.join(found) if found else 'none'}"
        )
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{split_file}: lists no images")
    annotations: list[Annotation] = []
    skipped: list[tuple[str, str]] = []
    for image_id, name in enumerate(reading(ids, f"reading {split}")):
        xml_path = root / "Annotations" / f"{name}.xml"
        filename, size, boxes, labels, difficult = parse_voc_xml(xml_path, classes)
        image_path = root / "JPEGImages" / f"{name}.jpg"
        # The XML's <filename> is the fallback for images stored under another extension.
        if not image_path.exists() and filename and (root / "JPEGImages" / filename).exists():
            image_path = root / "JPEGImages" / filename
        header_size = read_image_size(image_path)
        if size is not None and size != header_size:
            raise DatasetError(
                f"{xml_path}: <size> says {size[0]}x{size[1]}, the image {image_path.name} is "
                f"{header_size[0]}x{header_size[1]}"
            )
        width, height = header_size
        annotation, dropped = make_annotation(
            image_id, image_path, width, height, boxes, labels, xml_path, difficult=difficult
        )
        if dropped:
            skipped.append((str(xml_path), f"{dropped} box(es) of zero or negative area inside the image"))
        annotations.append(annotation)
    return DetectionDataset(annotations, classes, transform, skipped=skipped)


class VocWriter:
    """Writes a VOC dataset, the layout :func:`load_voc` reads, with its ``labels.txt``.

    ``add`` each image, then ``finish`` (the split lists and the class file)."""

    def __init__(self, root: Path, classes: Sequence[str], quality: int = 90) -> None:
        self.root, self.classes, self.quality = root, list(classes), quality
        self.ids: dict[str, list[str]] = defaultdict(list)
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, name: str, image: Image.Image, objects: Sequence[LabelledBox]) -> None:
        image.save(self.root / "JPEGImages" / f"{name}.jpg", quality=self.quality)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "JPEGImages"
        ET.SubElement(ann, "filename").text = f"{name}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        ET.SubElement(ann, "segmented").text = "0"
        for item in objects:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = self.classes[item.label]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = str(int(item.truncated))
            ET.SubElement(obj, "difficult").text = "0"
            bndbox = ET.SubElement(obj, "bndbox")
            x_min, y_min, x_max, y_max = (int(v) for v in item.box)
            # VOC is 1-based and inclusive: the pixel edges [x_min, x_max) are pixels x_min+1..x_max.
            for tag, value in (("xmin", x_min + 1), ("ymin", y_min + 1), ("xmax", x_max), ("ymax", y_max)):
                ET.SubElement(bndbox, tag).text = str(value)
        ET.indent(ann)
        ET.ElementTree(ann).write(self.root / "Annotations" / f"{name}.xml", encoding="utf-8")
        self.ids[split].append(name)

    def finish(self) -> None:
        for split, ids in self.ids.items():
            (self.root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (self.root / "labels.txt").write_text("".join(f"{c}\n" for c in self.classes))
