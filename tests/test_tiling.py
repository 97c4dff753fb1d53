"""Tiled inference (service/tiling.py): the grid, the merge, and an object cut by a tile edge
ending as one box, through the service with the demo model."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_service import serving, settings

from service.errors import APIError
from service.tiling import Tiling, count, merge, to_image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
SCENE = ROOT / "docs" / "images" / "demo_scene.jpg"


def parse(tile: str | None, overlap: float | None = None) -> Tiling | None:
    return Tiling.parse(tile, overlap, "off", 0.2)


def test_the_grid_covers_the_image_with_whole_tiles_flush_with_its_edges():
    rects = parse("auto").grid(1920, 1080, (320, 320), 64)
    xs, ys = sorted({r[0] for r in rects}), sorted({r[1] for r in rects})
    assert xs == [0, 256, 512, 768, 1024, 1280, 1536, 1600]  # every 256 (20% overlap), the last flush
    assert ys == [0, 256, 512, 760]
    assert all(x1 - x0 == 320 and y1 - y0 == 320 for x0, y0, x1, y1 in rects)
    assert len(rects) == 32 and count(1920, 1080, parse("auto"), (320, 320), 64) == 33
    # Smaller than one tile: not cut (the whole-image pass sees it at full resolution); thinner
    # than a tile in one direction: tiles as tall as the image.
    assert parse("auto").grid(300, 200, (320, 320), 64) == []
    assert {r[3] - r[1] for r in parse("auto").grid(1000, 200, (320, 320), 64)} == {200}
    assert parse(None) is None and parse("off") is None and count(1920, 1080, None, (320, 320), 8) == 1


def test_auto_grows_its_tiles_to_the_cap_and_an_explicit_grid_past_it_is_refused():
    grown = parse("auto").grid(4000, 3000, (320, 320), 32)
    assert 0 < len(grown) <= 32 and grown[0][2] - grown[0][0] > 320
    assert len(parse("auto").grid(4000, 3000, (320, 320), 256)) > 32
    with pytest.raises(APIError, match=r"into 192 tiles; the most is 32 \(SSD_MAX_TILES_PER_IMAGE\)"):
        parse("320x320").grid(4000, 3000, (320, 320), 32)
    for bad, words in [("big", "WIDTHxHEIGHT"), ("10x10", "at least 32"), ("auto", "tile_overlap")]:
        with pytest.raises(APIError, match=words):
            parse(bad, 1.0 if bad == "auto" else None)


def test_an_object_cut_by_a_tile_edge_merges_into_one_box():
    """The whole object from the whole-image pass and from the tile that holds most of it, and
    the sliver a tile edge leaves in the tile next to it: one box of the class, near the object;
    a box of another class stays apart; per-class NMS (IoU 0.45) would have kept the sliver."""
    whole = np.array([[230.0, 100.0, 330.0, 200.0]])
    left_part = np.array([[300.0, 102.0, 320.0, 199.0]])  # the sliver left of the first tile's edge, 320
    right_part = np.array([[256.0, 101.0, 331.0, 200.0]])  # the tile from 256 holds most of it
    other = np.array([[235.0, 105.0, 325.0, 195.0]])
    no, yes = np.array([False]), np.array([True])
    boxes, scores, labels = merge([
        (whole, np.array([0.6]), np.array([2]), no),
        (left_part, np.array([0.9]), np.array([2]), yes),  # touches its tile's inner edge
        (right_part, np.array([0.8]), np.array([2]), yes),
        (other, np.array([0.7]), np.array([4]), no),
    ])  # fmt: skip
    assert labels.tolist() == [2, 4] and scores.tolist() == pytest.approx([0.9, 0.7])
    assert boxes[0].tolist() == [230.0, 100.0, 331.0, 200.0]  # the union, with the best score

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    assert iou(boxes[0], whole[0]) >= 0.5
    assert iou(left_part[0], whole[0]) < 0.45  # NMS would keep the sliver: two objects for one
    nms = merge(
        [(whole, np.array([0.6]), np.array([2]), no), (left_part, np.array([0.9]), np.array([2]), yes)], "nms"
    )
    assert len(nms[0]) == 2


def test_a_large_box_does_not_swallow_the_objects_inside_it():
    """Greedy merging of every nested box (SAHI's) lets a large box take the small ones inside
    it; only a cut part merges here: whole small boxes stay, as NMS keeps them."""
    big = np.array([[0.0, 0.0, 300.0, 300.0]])
    small = np.array([[10.0, 10.0, 60.0, 60.0], [200.0, 200.0, 260.0, 250.0]])
    no = np.zeros(1, bool)
    parts = [
        (big, np.array([0.9]), np.array([1]), no),
        (small, np.array([0.8, 0.7]), np.array([1, 1]), no.repeat(2)),
    ]
    assert len(merge(parts)[0]) == 3
    assert len(merge(parts, "nmm")[0]) == 1


def test_a_tiles_boxes_map_back_to_the_image():
    boxes = np.array([[0.0, 0.0, 1.0, 0.5]], np.float32)
    assert to_image(boxes, (256, 512, 576, 832), 1920, 1080).tolist() == [[256.0, 512.0, 576.0, 672.0]]
    assert to_image(boxes, None, 1920, 1080).tolist() == [[0.0, 0.0, 1920.0, 540.0]]


def _boxes(answer: dict, label: str) -> list[list[float]]:
    return [d["box"] for d in answer["results"][0]["detections"] if d["label"] == label]


def test_through_the_service_shapes_cut_by_tile_edges_stay_one_box_each():
    """The demo scene at 3x (1920x1440): tiles of 320 cut most shapes. Each shape the untiled
    answer finds is one box of its class in the tiled answer, IoU >= 0.5, with no other box of
    its class inside it (intersection over the smaller >= 0.5)."""
    image = Image.open(SCENE).convert("RGB")
    large = image.resize((image.width * 3, image.height * 3), Image.Resampling.BICUBIC)
    data = io.BytesIO()
    large.save(data, "JPEG", quality=95)

    async def ask() -> tuple[dict, dict]:
        async with serving(settings(DEMO)) as client:
            headers = {"Content-Type": "image/jpeg"}
            plain = await client.post("/detect", content=data.getvalue(), headers=headers)
            tiled = await client.post("/detect?tile=auto", content=data.getvalue(), headers=headers)
            return plain.json(), tiled.json()

    plain, tiled = asyncio.run(ask())
    rects = tiled["results"][0]["tiles"]
    assert len(rects) == 30  # 8 x 6 tiles of 320 would be 48: tile=auto grew them to fit 32

    def overlap(a: list[float], b: list[float], smaller: bool) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        inter = w * h
        return inter / (min(area(a), area(b)) if smaller else area(a) + area(b) - inter)

    found = plain["results"][0]["detections"]
    assert found, "the demo model finds the shapes of its own scene"
    cut = 0
    for shape in found:
        box = shape["box"]
        cut += any(x0 < box[0] < x1 < box[2] or x0 < box[1] < y1 < box[3] for x0, y0, x1, y1 in rects)
        same = _boxes(tiled, shape["label"])
        near = [b for b in same if overlap(b, box, smaller=False) >= 0.5]
        assert len(near) == 1, (shape, same)
        inside = [b for b in same if b is not near[0] and overlap(b, near[0], smaller=True) >= 0.5]
        assert not inside, (shape, inside)
    assert cut >= 2  # the test is about cut shapes: some are


# --- Answers drawn ------------------------------------------------------------------------------


def test_labels_stay_inside_the_image_and_colours_follow_the_class():
    from service.drawing import PALETTE, draw

    image = Image.new("RGB", (200, 100), (0, 0, 0))
    at_top = {"label": "circle", "class_id": 0, "score": 0.9, "box": [10.0, 0.0, 60.0, 40.0]}
    at_right = {"label": "a-long-label-name", "class_id": 3, "score": 0.5, "box": [170.0, 50.0, 199.0, 90.0]}
    drawn = np.asarray(draw(image, [at_top, at_right]))
    # The box touching the top edge has its label just inside its top edge, in its class's colour.
    assert (drawn[:12, 12:40] == PALETTE[0]).all(axis=-1).mean() > 0.3
    # The label of a box at the right edge is moved left to fit, not cut off.
    assert (drawn[30:50, 100:170] == PALETTE[3]).all(axis=-1).any()


def test_detect_draws_its_answer_when_asked_for_an_image():
    photo = SCENE.read_bytes()

    async def ask() -> list:
        async with serving(settings(DEMO)) as client:
            answers = []
            for accept in ("image/png", "image/jpeg", "application/json, image/png", "*/*"):
                headers = {"Content-Type": "image/jpeg", "Accept": accept}
                answers.append(await client.post("/detect?tile=auto", content=photo, headers=headers))
            files = [("file", ("a.jpg", photo, "image/jpeg")), ("file", ("b.jpg", photo, "image/jpeg"))]
            answers.append(await client.post("/detect", files=files, headers={"Accept": "image/png"}))
            return answers

    png, jpeg, json_first, anything, two = asyncio.run(ask())
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png.content)).size == (640, 480)  # the photo's own size, under the cap
    assert int(png.headers["x-detections"]) > 0 and png.headers["x-model"] == "ssdlite320_mobilenet_v3_large"
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content.startswith(b"\xff\xd8")
    assert len(json_first.json()["results"][0]["tiles"]) == 6 and anything.json()["results"]
    assert two.status_code == 422 and "draws one image" in two.json()["error"]["message"]


def test_predict_tiles_and_draws(tmp_path, capsys):
    import argparse
    import json

    from service import predict

    image = Image.open(SCENE).convert("RGB")
    large = tmp_path / "large.jpg"
    image.resize((1920, 1440)).save(large, quality=95)
    parser = argparse.ArgumentParser()
    predict.configure(parser)
    args = parser.parse_args([str(DEMO), str(large), "--tile", "auto", "--out", str(tmp_path / "out")])
    assert predict.run(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = report["results"][0]
    assert len(result["tiles"]) == 30 and result["detections"]
    drawn = Image.open(tmp_path / "out" / "large.jpg")
    assert drawn.size == (1920, 1440)
    args = parser.parse_args([str(DEMO), str(large), "--tile", "nope"])
    assert predict.run(args) == 2 and "--tile: auto, off" in capsys.readouterr().err


def test_a_thin_overlap_is_counted_not_built():
    """tile_overlap 0.99 asks for a tile every few pixels: the grid is counted before it is made
    (arithmetic, not a list of a million tiles), so a 6000x4000 photo gets a bounded grid or 422."""
    from service.tiling import _count, _grid

    rects = parse("auto", 0.99).grid(6000, 4000, (320, 320), 32)
    assert 0 < len(rects) <= 32
    with pytest.raises(APIError, match="SSD_MAX_TILES_PER_IMAGE"):
        parse("320x320", 0.99).grid(6000, 4000, (320, 320), 32)
    cases = [
        (1920, 1080, (320, 320), 0.2),
        (1000, 200, (320, 320), 0.5),
        (5000, 333, (640, 480), 0.9),
        (321, 320, (320, 320), 0.0),
    ]
    for width, height, size, overlap in cases:
        assert _count(width, height, size, overlap) == len(_grid(width, height, size, overlap))
