"""The built-in synthetic dataset: written in each format and read back through the loaders,
reproducible, and with boxes that really are the tight boxes of the drawn shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import open_dataset
from model.data.synth import CLASSES, MAX_HIDDEN, generate, polygon_area, render, shape_mask

SIZE = (72, 96)  # height, width: not square, so that a swapped axis shows
FORMATS = ("voc", "coco", "yolo")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same small dataset (seed 3) in the three formats."""
    base = tmp_path_factory.mktemp("synth")
    return {
        fmt: generate(base / fmt, fmt, images=4, val_images=2, seed=3, image_size=SIZE) for fmt in FORMATS
    }


def _opened(written, fmt, split):
    path = written[fmt] / "annotations" / "instances_train.json" if fmt == "coco" else written[fmt]
    return open_dataset(path, split=split)


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_format_reads_back_the_same_annotations(written, split):
    expected = [
        render(np.random.default_rng([3, ("train", "val").index(split), i]), SIZE)
        for i in range(4 if split == "train" else 2)
    ]
    assert sum(len(s.boxes) for s in expected) > 0
    for fmt in FORMATS:
        dataset = _opened(written, fmt, split)
        assert dataset.classes == list(CLASSES), fmt
        assert len(dataset) == len(expected), fmt
        for ann, sample in zip(dataset.annotations, expected, strict=True):
            assert (ann.height, ann.width) == SIZE, fmt
            assert ann.labels.tolist() == sample.labels.tolist(), fmt
            np.testing.assert_allclose(ann.boxes, sample.boxes, atol=1 if fmt == "yolo" else 0, err_msg=fmt)
        image, target = dataset[0]
        assert tuple(image.shape) == (3, *SIZE) and image.dtype == torch.uint8
        assert target["labels"].tolist() == expected[0].labels.tolist()


def test_layouts_on_disk(written):
    voc, coco, yolo = written["voc"], written["coco"], written["yolo"]
    assert (voc / "ImageSets/Main/train.txt").read_text().split() == [f"train_{i:06d}" for i in range(4)]
    assert (voc / "labels.txt").read_text().split() == list(CLASSES)
    assert (
        len(list((voc / "JPEGImages").glob("*.jpg"))) == 6 == len(list((voc / "Annotations").glob("*.xml")))
    )
    assert sorted(p.name for p in (coco / "annotations").iterdir()) == [
        "instances_train.json",
        "instances_val.json",
    ]
    assert len(list((coco / "train").glob("*.jpg"))) == 4 and len(list((coco / "val").glob("*.jpg"))) == 2
    assert len(open_dataset(coco, split="val")) == 2  # the folder, as `ssd train --data DIR` gives it
    assert len(open_dataset(coco / "annotations/instances_val.json", split="train")) == 4
    assert len(list((yolo / "labels/val").glob("*.txt"))) == 2 and (yolo / "data.yaml").is_file()
    with Image.open(voc / "JPEGImages/train_000000.jpg") as image:
        assert image.format == "JPEG" and image.size == (SIZE[1], SIZE[0])


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(generate(tmp_path / "a", "yolo", images=3, val_images=1, seed=7, image_size=SIZE))
    b = files(generate(tmp_path / "b", "yolo", images=3, val_images=1, seed=7, image_size=SIZE))
    c = files(generate(tmp_path / "c", "yolo", images=3, val_images=1, seed=8, image_size=SIZE))
    assert len(a) == 2 * 4 + 1  # images, labels, data.yaml
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.suffix == ".jpg")


def test_default_val_count_and_refusals(tmp_path):
    (tmp_path / "d").mkdir()  # an existing empty folder is fine
    out = generate(tmp_path / "d", "coco", images=10, image_size=SIZE)  # 15% of 10, rounded
    assert out == tmp_path / "d" and oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert len(open_dataset(out, split="train")) == 10 and len(open_dataset(out, split="val")) == 2
    with pytest.raises(FileExistsError, match="not an empty folder"):
        generate(out, "coco", images=1)
    with pytest.raises(ValueError, match="unknown format"):
        generate(tmp_path / "e", "pascal")
    with pytest.raises(ValueError, match="at least one image"):
        generate(tmp_path / "e", images=0)
    assert not (tmp_path / "e").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_boxes_inside_non_degenerate_varied():
    samples = [render(np.random.default_rng([11, 0, i]), (160, 200)) for i in range(40)]
    boxes = np.concatenate([s.boxes for s in samples])
    labels = np.concatenate([s.labels for s in samples])
    assert all(1 <= len(s.shapes) + len(s.dropped) <= 10 for s in samples)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 160).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 160
    assert sides.min() < 0.08 and sides.max() > 0.5  # small and large objects both


def test_box_is_the_tight_box_of_the_drawn_pixels():
    checked = 0
    for i in range(40):
        sample = render(np.random.default_rng([5, 0, i]), (64, 80), max_objects=1, plain=True)
        assert len(sample.shapes) + len(sample.dropped) == 1
        if not sample.shapes:  # more than MAX_HIDDEN of it outside the image
            continue
        pixels = np.asarray(sample.image).reshape(-1, 3)
        colours = [tuple(int(v) for v in c) for c in np.unique(pixels, axis=0)]
        assert len(colours) == 2 and sample.shapes[0].colour in colours  # the background and the shape
        background = next(c for c in colours if c != sample.shapes[0].colour)
        drawn = (np.asarray(sample.image) != background).any(axis=2)
        rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
        np.testing.assert_array_equal(sample.boxes[0], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        checked += 1
    assert checked >= 35


def test_box_survives_jpeg_within_two_pixels(tmp_path):
    sample = render(np.random.default_rng([5, 0, 1]), (64, 80), max_objects=1, plain=True)
    sample.image.save(tmp_path / "x.jpg", quality=90)
    pixels = np.asarray(Image.open(tmp_path / "x.jpg")).astype(int)
    drawn = (np.abs(pixels - pixels[0, 0]).sum(axis=2)) > 60
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    np.testing.assert_allclose(sample.boxes[0], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], atol=2)


def test_occlusion_keeps_full_boxes_and_drops_hidden_objects():
    kept_occluded = dropped = 0
    for i in range(30):
        sample = render(np.random.default_rng([9, 0, i]), (96, 96), plain=True)
        pixels = np.asarray(sample.image)
        for shape, box in zip(sample.shapes, sample.boxes, strict=True):
            mask, x0, y0 = shape_mask(shape.vertices, 96, 96)
            region = pixels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            seen = int(((region == shape.colour).all(axis=2) & mask).sum())
            whole = max(polygon_area(shape.vertices), mask.sum())
            assert seen >= (1 - MAX_HIDDEN) * whole - 1
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            # The box is that of the whole shape, hidden parts included.
            np.testing.assert_array_equal(
                box, [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]
            )
            kept_occluded += seen < mask.sum()
        for shape in sample.dropped:
            mask, x0, y0 = shape_mask(shape.vertices, 96, 96)
            region = pixels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            seen = int(((region == shape.colour).all(axis=2) & mask).sum()) if mask.size else 0
            assert seen < (1 - MAX_HIDDEN) * max(polygon_area(shape.vertices), mask.sum())
            dropped += 1
    assert kept_occluded > 0 and dropped > 0  # both cases happened
