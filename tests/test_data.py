"""Dataset loaders (VOC, COCO, YOLO) on small datasets written here, bad data included, and format
detection. One spec (:class:`Img`) is written in each format, so the same checks run on all three."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model.data import DatasetError, detect_format, open_dataset
from model.data.voc import VOC_CLASSES
from model.data.yolo import label_path

FORMATS = ["voc", "coco", "yolo"]
CLASSES = ["cat", "dog", "bird"]
PHOTOS = Path(__file__).resolve().parents[1] / "photos"  # COCO val2017 photos: photos/README.md


@dataclass
class Img:
    """An image to write: objects are (class index, x_min, y_min, x_max, y_max) in pixel edges."""

    name: str
    width: int = 64
    height: int = 48
    objects: list[tuple[int, float, float, float, float]] = field(default_factory=list)


def save_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_voc(root: Path, images: list[Img], split: str = "train", classes: list[str] = CLASSES) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("\n".join(classes) + "\n")
    for i, img in enumerate(images):
        save_image(root / "JPEGImages" / f"{img.name}.jpg", img.width, img.height, seed=i)
        objects = "".join(
            f"<object><name>{classes[c] if c < len(classes) else 'unicorn'}</name><difficult>0</difficult>"
            # VOC's 1-based inclusive pixels
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
            "</object>"
            for c, x0, y0, x1, y1 in img.objects
        )
        (root / "Annotations" / f"{img.name}.xml").write_text(
            f"<annotation><filename>{img.name}.jpg</filename><size><width>{img.width}</width>"
            f"<height>{img.height}</height><depth>3</depth></size>{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{img.name}\n" for img in images))
    return root


def coco_dict(images: list[Img], classes: list[str] = CLASSES) -> dict:
    # Category ids with gaps, as COCO's own, listed out of order: class i has id 3 + 4 i.
    categories = [{"id": 3 + 4 * i, "name": name} for i, name in reversed(list(enumerate(classes)))]
    anns = [
        {
            "id": len(images) * 100 + k,
            "image_id": i + 1,
            "category_id": 3 + 4 * c if c < len(classes) else 99,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
        }
        for i, img in enumerate(images)
        for k, (c, x0, y0, x1, y1) in enumerate(img.objects)
    ]
    return {
        "images": [
            {"id": i + 1, "file_name": f"{img.name}.jpg", "width": img.width, "height": img.height}
            for i, img in enumerate(images)
        ],
        "annotations": anns,
        "categories": categories,
    }


def write_coco(root: Path, images: list[Img], split: str = "train", classes: list[str] = CLASSES) -> Path:
    """COCO's own layout: annotations/instances_{split}.json beside {split}/."""
    for i, img in enumerate(images):
        save_image(root / split / f"{img.name}.jpg", img.width, img.height, seed=i)
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_dict(images, classes)))
    return path


def write_yolo(root: Path, images: list[Img], split: str = "train", classes: list[str] = CLASSES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", split: f"images/{split}", "names": dict(enumerate(classes))})
    )
    for i, img in enumerate(images):
        save_image(root / "images" / split / f"{img.name}.jpg", img.width, img.height, seed=i)
        lines = "".join(
            f"{c} {(x0 + x1) / 2 / img.width} {(y0 + y1) / 2 / img.height} "
            f"{(x1 - x0) / img.width} {(y1 - y0) / img.height}\n"
            for c, x0, y0, x1, y1 in img.objects
        )
        label = root / "labels" / split / f"{img.name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(lines)
    return root


WRITERS = {"voc": write_voc, "coco": write_coco, "yolo": write_yolo}


def image_file(root: Path, fmt: str, name: str, split: str = "train") -> Path:
    return {
        "voc": root / "JPEGImages" / f"{name}.jpg",
        "coco": root / split / f"{name}.jpg",
        "yolo": root / "images" / split / f"{name}.jpg",
    }[fmt]


def annotation_file(root: Path, fmt: str, name: str, split: str = "train") -> Path:
    return {
        "voc": root / "Annotations" / f"{name}.xml",
        "coco": root / "annotations" / f"instances_{split}.json",
        "yolo": root / "labels" / split / f"{name}.txt",
    }[fmt]


# ---------------------------------------------------------------- the same checks in every format


@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_boxes_labels_and_images(tmp_path, fmt):
    images = [
        Img("a", 64, 48, [(0, 4, 6, 30, 40), (2, 10, 0, 64, 20)]),
        Img("b", 50, 70, [(1, 0, 0, 50, 70)]),
        Img("c", 32, 32, []),
    ]
    path = WRITERS[fmt](tmp_path, images)
    assert detect_format(path) == fmt
    dataset = open_dataset(path)
    assert dataset.classes == CLASSES
    assert len(dataset) == 3
    first, second, third = dataset.annotations
    np.testing.assert_allclose(first.boxes, [[4, 6, 30, 40], [10, 0, 64, 20]], atol=1e-4)
    assert first.labels.tolist() == [0, 2]
    assert (first.width, first.height, second.width, second.height) == (64, 48, 50, 70)
    np.testing.assert_allclose(second.boxes, [[0, 0, 50, 70]], atol=1e-4)
    assert second.labels.tolist() == [1]
    assert third.boxes.shape == (0, 4) and third.labels.shape == (0,)
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64

    image, target = dataset[1]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 70, 50)
    assert target["boxes"].canvas_size == (70, 50)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0, 50, 70]]))
    assert target["labels"].tolist() == [1]
    _, empty = dataset[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_image_is_an_error_at_open(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, [Img("a", objects=[(0, 1, 1, 9, 9)]), Img("b")])
    image_file(tmp_path, fmt, "b").unlink()
    if fmt == "yolo":  # a YOLO split is its image folder: list the images instead, to name one missing
        (tmp_path / "train.txt").write_text("images/train/a.jpg\nimages/train/b.jpg\n")
        (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": CLASSES}))
    with pytest.raises(DatasetError, match=r"b\.jpg"):
        open_dataset(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_image_header_is_an_error_at_open(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, [Img("a"), Img("b")])
    image_file(tmp_path, fmt, "b").write_bytes(b"this is not a JPEG file at all")
    with pytest.raises(DatasetError, match=r"b\.jpg.*cannot read"):
        open_dataset(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_image_data_is_an_error_when_read(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, [Img("a"), Img("b", 200, 150)])
    file = image_file(tmp_path, fmt, "b")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    dataset = open_dataset(path)  # the header is intact
    dataset[0]
    with pytest.raises(DatasetError, match=r"b\.jpg"):
        dataset[1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_boxes_partly_outside_are_clipped(tmp_path, fmt):
    # YOLO coordinates cannot leave [0, 1] by much, but a box whose centre is near the edge can.
    path = WRITERS[fmt](tmp_path, [Img("a", 64, 48, [(0, 50, 30, 80, 60), (1, -10, -5, 20, 10)])])
    if fmt == "yolo":
        (tmp_path / "labels/train/a.txt").write_text("0 0.95 0.9 0.3 0.4\n1 0.05 0.1 0.3 0.3\n")
        expected = [[0.8 * 64, 0.7 * 48, 64, 48], [0, 0, 0.2 * 64, 0.25 * 48]]
    else:
        expected = [[50, 30, 64, 48], [0, 0, 20, 10]]
    dataset = open_dataset(path)
    np.testing.assert_allclose(dataset.annotations[0].boxes, expected, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_degenerate_boxes_are_dropped_and_listed_once_per_file(tmp_path, fmt):
    objects = [
        (0, 5, 5, 20, 20),  # kept
        (1, 10, 10, 10, 30),  # zero width
        (2, 30, 12, 40, 12),  # zero height
    ]
    if fmt != "yolo":  # outside the image: empty after clipping (YOLO cannot say that)
        objects.append((1, 70, 10, 90, 20))
    path = WRITERS[fmt](tmp_path, [Img("a", 64, 48, objects), Img("b", objects=[(2, 1, 2, 3, 4)])])
    dataset = open_dataset(path)
    np.testing.assert_allclose(dataset.annotations[0].boxes, [[5, 5, 20, 20]], atol=1e-4)
    assert dataset.annotations[0].labels.tolist() == [0]
    assert dataset.annotations[1].labels.tolist() == [2]
    # Listed for the summary said when the dataset opens (model/data/summary.py), once per file.
    [(where, why)] = dataset.skipped
    assert str(annotation_file(tmp_path, fmt, "a")) in where
    assert why.startswith(f"{len(objects) - 1} box(es) of zero or negative area")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_class_is_an_error_naming_the_file(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, [Img("a", objects=[(0, 1, 1, 9, 9)]), Img("b", objects=[(3, 1, 1, 9, 9)])])
    with pytest.raises(DatasetError) as info:
        open_dataset(path)
    message = str(info.value)
    assert str(annotation_file(tmp_path, fmt, "b")) in message
    assert {"voc": "unicorn", "coco": "99", "yolo": "class id 3"}[fmt] in message


# ---------------------------------------------------------------- VOC


def test_voc_coordinates_classes_and_difficult(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    save_image(root / "JPEGImages" / "000001.jpg", 40, 30)
    (root / "Annotations" / "000001.xml").write_text(
        """<annotation><size><width>40</width><height>30</height></size>
        <object><name>dog</name><difficult>1</difficult>
          <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>1</xmax><ymax>1</ymax></bndbox></object>
        <object><name> tvmonitor </name>
          <bndbox><xmin>10.5</xmin><ymin>3</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
        </annotation>"""
    )
    (root / "ImageSets" / "Main" / "val.txt").write_text("000001\n\n")
    dataset = open_dataset(root, split="val")
    assert dataset.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    ann = dataset.annotations[0]
    # 1-based inclusive: the single top-left pixel is the box [0, 0, 1, 1].
    np.testing.assert_allclose(ann.boxes, [[0, 0, 1, 1], [9.5, 2, 40, 30]])
    assert ann.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("tvmonitor")]
    assert ann.difficult.tolist() == [True, False]
    _, target = dataset[0]
    assert target["difficult"].tolist() == [True, False]  # kept for training, flagged


def test_voc_classes_txt_and_size_from_image_when_absent(tmp_path):
    root = write_voc(tmp_path, [Img("x", 20, 10, [(1, 0, 0, 5, 5)])])
    (root / "labels.txt").unlink()
    (root / "classes.txt").write_text("dog\ncat\n")
    xml = root / "Annotations" / "x.xml"
    xml.write_text(xml.read_text().replace("<size><width>20</width><height>10</height>", "<size>"))
    ann = open_dataset(root).annotations[0]
    assert (ann.width, ann.height) == (20, 10)
    assert ann.labels.tolist() == [0]  # "dog" is index 0 of classes.txt


def test_voc_missing_split_lists_the_splits_there(tmp_path):
    root = write_voc(tmp_path, [Img("a")], split="trainval")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    (root / "ImageSets" / "Main" / "cat_trainval.txt").write_text("a 1\n")
    with pytest.raises(DatasetError, match=r"test\.txt.*splits here: trainval, val$"):
        open_dataset(root, split="test")


def test_voc_size_mismatch_names_the_file(tmp_path):
    root = write_voc(tmp_path, [Img("a", 64, 48)])
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>65</width>"))
    with pytest.raises(DatasetError, match=r"a\.xml.*65x48.*64x48"):
        open_dataset(root)


def test_voc_bad_xml_names_the_file(tmp_path):
    root = write_voc(tmp_path, [Img("a"), Img("b")])
    (root / "Annotations" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"b\.xml: not valid XML"):
        open_dataset(root)
    (root / "Annotations" / "b.xml").unlink()
    with pytest.raises(DatasetError, match=r"b\.xml: annotation file not found"):
        open_dataset(root)


# ---------------------------------------------------------------- COCO


def test_coco_categories_crowd_and_ids(tmp_path):
    path = write_coco(tmp_path, [Img("a", objects=[(2, 1, 2, 11, 22), (0, 0, 0, 64, 48)]), Img("b")])
    data = json.loads(path.read_text())
    data["annotations"][1]["iscrowd"] = 1
    data["images"][0]["id"] = 1234
    for ann in data["annotations"]:
        ann["image_id"] = 1234
    path.write_text(json.dumps(data))
    dataset = open_dataset(path)
    assert dataset.classes == CLASSES
    assert dataset.category_ids == [3, 7, 11]  # class index -> COCO category id
    ann = dataset.annotations[0]
    assert ann.image_id == 1234
    assert ann.crowd.tolist() == [False, True]
    np.testing.assert_allclose(ann.boxes, [[1, 2, 11, 22], [0, 0, 64, 48]])
    _, target = dataset[0]
    assert target["labels"].tolist() == [2] and target["image_id"] == 1234  # crowd left out of training


def test_coco_image_folder_rules(tmp_path):
    images = [Img("a", objects=[(0, 1, 1, 5, 5)]), Img("b")]
    # Beside the JSON.
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "data.json").write_text(json.dumps(coco_dict(images)))
    for img in images:
        save_image(beside / f"{img.name}.jpg", img.width, img.height)
    assert open_dataset(beside / "data.json").annotations[1].path == beside / "b.jpg"
    # json.parent / val2017, and json.parent.parent / val2017 (COCO's own layout).
    for json_dir in ("inner", "outer/annotations"):
        root = tmp_path / json_dir.split("/")[0]
        json_path = tmp_path / json_dir / "instances_val2017.json"
        json_path.parent.mkdir(parents=True)
        json_path.write_text(json.dumps(coco_dict(images)))
        folder = json_path.parent / "val2017" if json_dir == "inner" else root / "val2017"
        for img in images:
            save_image(folder / f"{img.name}.jpg", img.width, img.height)
        dataset = open_dataset(json_path, split="val")
        assert [a.path for a in dataset.annotations] == [folder / "a.jpg", folder / "b.jpg"]
    # --images wins, and a wrong one names the missing image.
    assert open_dataset(json_path, "val", images_dir=beside).annotations[0].path == beside / "a.jpg"
    with pytest.raises(DatasetError, match=r"a\.jpg: image file not found"):
        open_dataset(json_path, "val", images_dir=tmp_path)
    # No rule finds the first image.
    lonely = tmp_path / "lonely" / "instances_val.json"
    lonely.parent.mkdir()
    lonely.write_text(json.dumps(coco_dict(images)))
    with pytest.raises(DatasetError, match=r"instances_val\.json: image a\.jpg not found"):
        open_dataset(lonely, split="val")


def test_coco_split_picks_the_sibling_file(tmp_path):
    write_coco(tmp_path, [Img("t1"), Img("t2")], split="train")
    val = write_coco(tmp_path, [Img("v1")], split="val")
    train = tmp_path / "annotations" / "instances_train.json"
    assert len(open_dataset(train, split="val")) == 1
    assert len(open_dataset(val, split="train")) == 2
    assert len(open_dataset(tmp_path, split="val")) == 1  # a folder picks the file of the split
    assert len(open_dataset(tmp_path / "annotations", split="train")) == 2
    with pytest.raises(DatasetError, match=r"instances_test\.json is not beside it"):
        open_dataset(train, split="test")
    with pytest.raises(DatasetError, match=r"no COCO instances file for split 'test'.*instances_train\.json"):
        open_dataset(tmp_path, split="test")


def test_coco_structural_errors_name_the_file(tmp_path):
    path = write_coco(tmp_path, [Img("a", objects=[(0, 1, 1, 5, 5)])])
    good = json.loads(path.read_text())

    def expect(data: dict, pattern: str) -> None:
        path.write_text(json.dumps(data))
        with pytest.raises(DatasetError, match=pattern):
            open_dataset(path)

    expect({"images": [], "annotations": []}, r"instances_train\.json: not a COCO instances file.*categories")
    expect({**good, "images": []}, r"instances_train\.json: no images")
    expect({**good, "annotations": [{**good["annotations"][0], "image_id": 5}]}, r"unknown image 5")
    expect({**good, "annotations": [{**good["annotations"][0], "bbox": [1, 2, 3]}]}, r"not \[x, y, w, h\]")
    expect({**good, "images": [{**good["images"][0], "width": 63}]}, r"a\.jpg is 64x48, the file says 63x48")
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"instances_train\.json: not readable JSON"):
        open_dataset(path)


# ---------------------------------------------------------------- YOLO


def test_yolo_names_path_txt_lists_and_missing_labels(tmp_path):
    root = tmp_path / "ds"
    write_yolo(root, [Img("a", 100, 50, [(2, 10, 5, 30, 45)]), Img("b"), Img("c")])
    (root / "labels" / "train" / "b.txt").unlink()  # no label file: no objects
    (root / "labels" / "train" / "c.txt").write_text("\n  \n")  # blank: no objects
    (root / "val.txt").write_text("./images/train/b.jpg\nimages/train/a.jpg\n")
    config = {"path": "ds", "train": "images/train", "val": "val.txt", "names": ["x", "y", "z"], "nc": 3}
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(config))
    train = open_dataset(tmp_path / "dataset.yaml")
    assert train.classes == ["x", "y", "z"]
    assert [a.path.name for a in train.annotations] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_allclose(train.annotations[0].boxes, [[10, 5, 30, 45]], atol=1e-4)
    assert [len(a.boxes) for a in train.annotations] == [1, 0, 0]
    val = open_dataset(tmp_path, split="val")  # the folder holding dataset.yaml
    assert [a.path.name for a in val.annotations] == ["b.jpg", "a.jpg"]
    with pytest.raises(DatasetError, match=r"dataset\.yaml: no split 'test'; splits here: train, val"):
        open_dataset(tmp_path, split="test")


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("0 0.5 0.5 0.2", r"a\.txt:2: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.2 0.2 0.1", r"a\.txt:2: expected"),
        ("zero 0.5 0.5 0.2 0.2", r"a\.txt:2: expected"),
        ("-1 0.5 0.5 0.2 0.2", r"a\.txt:2: class id -1 out of range 0\.\.2"),
        ("1.5 0.5 0.5 0.2 0.2", r"a\.txt:2: class id 1\.5"),
        ("1 32 24 10 10", r"a\.txt:2: coordinates .* not normalised"),
        ("1 0.5 nan 0.2 0.2", r"a\.txt:2: expected"),
    ],
)
def test_yolo_malformed_line_names_file_and_line(tmp_path, line, pattern):
    root = write_yolo(tmp_path, [Img("a")])
    (root / "labels" / "train" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DatasetError, match=pattern):
        open_dataset(root)


def test_yolo_bad_yaml(tmp_path):
    root = write_yolo(tmp_path, [Img("a")])
    for config, pattern in [
        ({"train": "images/train"}, r"'names' must be"),
        ({"train": "images/train", "names": {0: "a", 2: "b"}}, r"ids must be 0\.\.1"),
        ({"train": "images/train", "names": ["a"], "nc": 2}, r"nc is 2 but there are 1 names"),
        ({"train": "nowhere", "names": ["a"]}, r"nowhere is neither an image folder"),
    ]:
        (root / "data.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(DatasetError, match=pattern):
            open_dataset(root)


def test_yolo_label_path_replaces_the_last_images_component():
    assert label_path(Path("/d/images/x/images/a.b.jpg")) == Path("/d/images/x/labels/a.b.txt")
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")


# ---------------------------------------------------------------- detection


def test_detect_format_and_unknown_layouts(tmp_path):
    voc = write_voc(tmp_path / "voc", [Img("a")])
    coco = write_coco(tmp_path / "coco", [Img("a")])
    yolo = write_yolo(tmp_path / "yolo", [Img("a")])
    assert detect_format(voc) == "voc"
    assert detect_format(coco) == "coco"
    assert detect_format(tmp_path / "coco") == "coco"  # annotations/instances_*.json
    assert detect_format(yolo) == "yolo"
    assert detect_format(yolo / "data.yaml") == "yolo"
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "absent"):
        with pytest.raises(DatasetError) as info:
            detect_format(path)
        message = str(info.value)
        assert str(path) in message
        assert all(layout in message for layout in ("Pascal VOC", "COCO", "YOLO", "data.yaml", "JPEGImages"))
    with pytest.raises(DatasetError, match="only for COCO"):
        open_dataset(voc, images_dir=tmp_path)


# ---------------------------------------------------------------- real COCO data


def test_real_coco_annotations():
    dataset = open_dataset(PHOTOS / "instances_val2017.json", split="val")
    assert len(dataset) == 10
    assert sum(len(a.boxes) for a in dataset.annotations) == 121
    assert sum(int(a.crowd.sum()) for a in dataset.annotations) == 2
    assert len(dataset.classes) == 80 and dataset.classes[0] == "person"
    assert dataset.category_ids[0] == 1 and dataset.category_ids[-1] == 90
    assert all(a.path.parent == PHOTOS / "val2017" for a in dataset.annotations)
    raw = json.loads((PHOTOS / "instances_val2017.json").read_text())
    first = next(a for a in raw["annotations"] if a["image_id"] == raw["images"][0]["id"])
    x, y, w, h = first["bbox"]
    ann = next(a for a in dataset.annotations if a.image_id == raw["images"][0]["id"])
    assert np.isclose(ann.boxes, [x, y, x + w, y + h], atol=1e-3).all(axis=1).any()
    image, target = dataset[0]
    assert tuple(image.shape) == (3, dataset.annotations[0].height, dataset.annotations[0].width)
    assert len(target["boxes"]) == int((~dataset.annotations[0].crowd).sum())
    assert len(open_dataset(PHOTOS, split="val")) == 10  # the folder, split picks the file


# ---------------------------------------------------------------- frictions of real datasets


def test_a_coco_file_alone_says_how_to_use_it_for_both_splits(tmp_path):
    # A lone instances_val2017.json (as photos/ has), given to `ssd train` with its default splits.
    path = write_coco(tmp_path, [Img("a", objects=[(0, 1, 1, 9, 9)])], split="val2017")
    (tmp_path / "annotations" / "instances_val2017.json").rename(tmp_path / "instances_val2017.json")
    lonely = tmp_path / "instances_val2017.json"
    assert not path.exists() and lonely.is_file()
    with pytest.raises(DatasetError, match=r"is not beside it\. .*--train-split val --val-split val"):
        open_dataset(lonely, split="train")
    assert len(open_dataset(lonely, split="val")) == 1


def test_voc_with_classes_of_its_own_is_told_of_labels_txt(tmp_path):
    root = write_voc(tmp_path, [Img("a", objects=[(0, 1, 1, 9, 9)])], classes=["dining table", "cup"])
    (root / "labels.txt").unlink(missing_ok=True)
    with pytest.raises(
        DatasetError, match=r"unknown class name 'dining table'.*one name per line.*labels\.txt"
    ):
        open_dataset(root)
    (root / "labels.txt").write_text("dining table\ncup\n")
    assert open_dataset(root).classes == ["dining table", "cup"]


def test_a_folder_with_a_dataset_yaml_of_another_name_is_a_dataset(tmp_path):
    # LightlyTrain's folders hold config.yaml; a run folder holds a config.yaml that is no dataset.
    root = write_yolo(tmp_path / "ds", [Img("a", objects=[(0, 1, 1, 9, 9)])])
    (root / "data.yaml").rename(root / "config.yaml")
    assert detect_format(root) == "yolo" and len(open_dataset(root)) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "ssd300_vgg16", "epochs": 3, "lr": 0.1}))
    with pytest.raises(DatasetError, match="not a dataset"):
        detect_format(run)
    (root / "other.yml").write_text((root / "config.yaml").read_text())
    with pytest.raises(DatasetError, match=r"config\.yaml, other\.yml all describe a dataset"):
        open_dataset(root)


def test_the_summary_counts_classes_sizes_and_lists_what_was_skipped(tmp_path):
    from model.data.summary import Summary

    images = [
        Img("a", 100, 100, [(0, 0, 0, 50, 50), (0, 10, 10, 13, 13), (1, 0, 0, 100, 100)]),
        Img("b", 100, 100, [(0, 5, 5, 25, 25)]),
        Img("c", 100, 100),
        Img("d", 100, 100),
    ]
    root = write_yolo(tmp_path, images)
    (root / "labels" / "train" / "c.txt").unlink()  # no label file: background, said so
    (root / "labels" / "train" / "gone.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # its image deleted
    (root / "labels" / "train" / "b.txt").write_text("0 0.15 0.15 0.2 0.2\n1 0.5 0.5 0.0 0.3\n")
    summary = Summary.of(open_dataset(root), "train")
    assert (summary.images, summary.without_objects) == (4, 2)
    assert summary.objects == {"cat": 3, "dog": 1, "bird": 0}
    assert summary.sizes == {"< 5%": 1, "5-10%": 0, "10-30%": 1, "30-60%": 1, ">= 60%": 1}
    assert summary.notes == ["1 images have no label file: taken as background (no objects)"]
    assert [(Path(p).name, why) for p, why in summary.skipped] == [
        ("b.txt", "1 box(es) of zero or negative area inside the image"),
        ("gone.txt", "a label file with no image beside it in this split"),
    ]
    text = "\n".join(summary.lines())
    assert "train: 4 images (2 without objects), 4 objects in 3 classes" in text
    assert "bird" in text and "no objects: this class cannot be learnt" in text
    assert "skipped: 2" in text and "gone.txt: a label file with no image" in text
