"""model/evaluation.py: COCO metrics (pycocotools) and the VOC07 11-point mAP."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.evaluation import evaluate

PHOTOS = Path(__file__).resolve().parents[1] / "photos"  # COCO val2017 photos: photos/README.md


def gt(boxes, labels, **extra) -> dict:
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels),
        **extra,
    }


def pred(boxes, scores, labels) -> dict:
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def random_scene(rng: np.random.Generator, num_images: int, num_classes: int, size: float = 640.0):
    """Ground truth records with 0 to 6 boxes per image, sides 5% to 50% of the image."""
    records = []
    for _ in range(num_images):
        count = int(rng.integers(0, 7))
        wh = rng.uniform(0.05, 0.5, (count, 2)) * size
        xy = rng.uniform(0, 1, (count, 2)) * (size - wh)
        records.append(gt(np.concatenate([xy, xy + wh], axis=1), rng.integers(0, num_classes, count)))
    return records


def as_predictions(records, scores=None) -> list[dict]:
    return [
        pred(
            r["boxes"], np.ones(len(r["labels"])) if scores is None else scores(len(r["labels"])), r["labels"]
        )
        for r in records
    ]


def assert_json_clean(result: dict) -> None:
    json.dumps(result, allow_nan=False)  # no NaN, no numpy scalars
    assert all(type(result[key]) is float for key in ("map", "map50", "map75", "voc07_map"))


# --- perfect and hand-computed cases -----------------------------------------------------------


@pytest.mark.parametrize("scoring", ["ones", "varied"])
def test_ground_truth_as_predictions_scores_one(scoring):
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "unused"]
    records = random_scene(rng, 12, 3)
    scores = None if scoring == "ones" else (lambda n: rng.uniform(0.05, 1.0, n))
    result = evaluate(records, as_predictions(records, scores), classes)
    assert_json_clean(result)
    assert (result["map"], result["map50"], result["map75"], result["voc07_map"]) == (1.0, 1.0, 1.0, 1.0)
    for name in "abc":
        entry = result["per_class"][name]
        assert (entry["ap"], entry["ap50"], entry["voc07_ap"]) == (1.0, 1.0, 1.0)
        assert entry["num_gt"] == sum(int((r["labels"] == "abc".index(name)).sum()) for r in records) > 0
    # A class without ground truth has no AP and stays out of the means.
    assert result["per_class"]["unused"] == {
        "ap": None, "ap50": None, "voc07_ap": None, "num_gt": 0, "num_detections": 0
    }  # fmt: skip


def hand_case():
    """One class, 3 ground truths in two images, 5 detections whose outcomes in score order are
    TP, FP (duplicate), TP (IoU exactly 0.5), FP (IoU 0.4), FP (image without ground truth)."""
    ground_truth = [
        gt([[0, 0, 10, 10], [100, 100, 120, 120]], [0, 0]),
        gt([[50, 50, 70, 70]], [0]),
        gt(np.zeros((0, 4)), []),
    ]
    predictions = [
        pred([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]),  # [100, 100, 120, 120] is missed
        # [50, 50, 70, 60] covers half of the box: IoU 0.5. [50, 50, 70, 58]: IoU 160/400 = 0.4.
        pred([[50, 50, 70, 60], [50, 50, 70, 58]], [0.7, 0.6], [0, 0]),
        pred([[0, 0, 5, 5]], [0.5], [0]),
    ]
    return ground_truth, predictions


def test_voc07_hand_computed():
    ground_truth, predictions = hand_case()
    result = evaluate(ground_truth, predictions, ["thing"])
    # recall    1/3, 1/3, 2/3, 2/3, 2/3
    # precision 1,   1/2, 2/3, 1/2, 2/5
    # thresholds 0, .1, .2, .3 -> max precision at recall >= t is 1; .4, .5, .6 -> 2/3; .7 to 1 -> 0.
    assert result["voc07_map"] == pytest.approx((4 * 1 + 3 * 2 / 3) / 11, abs=1e-12)
    # COCO at IoU .5 (the IoU 0.5 detection matches there too), 101 recall points: recall
    # .00-.33 -> 1 (34 points), .34-.66 -> 2/3 (33 points), the rest 0.
    assert result["map50"] == pytest.approx((34 + 33 * 2 / 3) / 101, abs=1e-12)
    assert result["per_class"]["thing"]["num_gt"] == 3


def test_voc07_threshold_is_inclusive_and_scores_break_ties_stably():
    # A single detection at IoU exactly 0.5 is a match (voc_eval's "> 0.5" would make it a miss).
    result = evaluate([gt([[50, 50, 70, 70]], [0])], [pred([[50, 50, 70, 60]], [0.5], [0])], ["x"])
    assert result["voc07_map"] == 1.0
    # The recall thresholds are exactly t/10: three of ten boxes found reach recall 0.3, so
    # t = 0, .1, .2, .3 count (np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 and would not).
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
    result = evaluate([gt(boxes, [0] * 10)], [pred(boxes[:3], [0.9, 0.8, 0.7], [0, 0, 0])], ["x"])
    assert result["voc07_map"] == pytest.approx(4 / 11, abs=1e-12)
    # Equal scores keep input order: FP first then TP gives precision 1/2 at full recall.
    result = evaluate(
        [gt([[0, 0, 10, 10]], [0])], [pred([[200, 200, 210, 210], [0, 0, 10, 10]], [0.5, 0.5], [0, 0])], ["x"]
    )
    assert result["voc07_map"] == pytest.approx(0.5)


def test_a_detection_whose_best_box_is_taken_is_a_duplicate_for_voc_but_not_for_coco():
    # Two overlapping boxes of one class; both detections overlap A best, the second also B
    # (IoU 80/95). The VOC devkit calls the second a duplicate: precision 1, 1/2 at recall 1/2,
    # B never found: 6 of 11 thresholds reached. COCO falls back to B: AP 1.
    ground_truth = [gt([[0, 0, 10, 10], [0, 0, 10, 8]], [0, 0])]
    predictions = [pred([[0, 0, 10, 10], [0, 0, 10, 9.5]], [0.9, 0.8], [0, 0])]
    result = evaluate(ground_truth, predictions, ["x"])
    assert result["voc07_map"] == pytest.approx(6 / 11)
    assert result["map50"] == pytest.approx(1.0)


@pytest.mark.parametrize("flag", ["difficult", "crowd"])
def test_ignored_ground_truth(flag):
    boxes = [[0, 0, 10, 10], [20, 20, 40, 40], [100, 100, 150, 150]]  # the last one is ignored
    ground_truth = [gt(boxes, [0, 0, 0], **{flag: np.array([False, False, True])})]
    found_regular = pred(boxes[:2], [0.9, 0.8], [0, 0])
    result = evaluate(ground_truth, [found_regular], ["x"])
    # A missed ignored box does not lower recall.
    assert (result["map"], result["voc07_map"]) == (1.0, 1.0)
    assert result["per_class"]["x"]["num_gt"] == 2

    # A detection on the ignored box, even the best-scored one, changes nothing.
    on_ignored = pred([[101, 101, 150, 150], *boxes[:2]], [0.95, 0.9, 0.8], [0, 0, 0])
    with_it = evaluate(ground_truth, [on_ignored], ["x"])
    assert with_it["per_class"]["x"].pop("num_detections") == 3  # counted, but scored as nothing
    result["per_class"]["x"].pop("num_detections")
    assert with_it == result

    # An ignored box identical to a regular one does not take the regular one's detection.
    twins = [gt([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], **{flag: np.array([True, False])})]
    assert evaluate(twins, [pred([[0, 0, 10, 10]], [0.9], [0])], ["x"])["voc07_map"] == 1.0

    # Without the flag the same data is not perfect, so the flag is what made the difference.
    plain = evaluate([gt(boxes, [0, 0, 0])], [found_regular], ["x"])
    assert plain["voc07_map"] < 1.0 and plain["map"] < 1.0
    assert plain["per_class"]["x"]["num_gt"] == 3


def test_class_with_only_ignored_boxes_has_no_ap():
    ground_truth = [gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1], crowd=[False, True])]
    predictions = [pred([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.9], [0, 1])]
    result = evaluate(ground_truth, predictions, ["a", "b"])
    assert result["per_class"]["b"] == {
        "ap": None, "ap50": None, "voc07_ap": None, "num_gt": 0, "num_detections": 1
    }  # fmt: skip
    # pycocotools' precision is tp / (tp + fp + eps): one lone true positive scores 1 - 2e-16.
    assert result["map"] == pytest.approx(1.0, abs=1e-12) and result["voc07_map"] == 1.0


def test_boxes_shifted_to_iou_between_050_and_055():
    rng = np.random.default_rng(1)
    records = [r for r in random_scene(rng, 10, 2) if len(r["labels"])]
    iou = 0.52
    predictions = []
    for r in records:
        boxes = r["boxes"].copy()
        width = boxes[:, 2] - boxes[:, 0]
        # Same height, shifted by d along x: IoU = (w - d) / (w + d).
        shift = width * (1 - iou) / (1 + iou)
        boxes[:, [0, 2]] += shift[:, None]
        predictions.append(pred(boxes, np.linspace(1, 0.5, len(boxes)), r["labels"]))
    result = evaluate(records, predictions, ["a", "b"])
    assert result["map50"] == 1.0
    assert result["map75"] == 0.0
    # Perfect at IoU .5 and nothing at .55 to .95: one threshold in ten.
    assert result["map"] == pytest.approx(0.1, abs=1e-12)
    assert result["voc07_map"] == 1.0


def test_coco_counts_only_the_best_100_detections_per_image_and_class():
    ground_truth = [gt([[0, 0, 10, 10]], [0])]
    misses = [[200 + 3 * i, 200, 202 + 3 * i, 202] for i in range(100)]
    predictions = [pred([*misses, [0, 0, 10, 10]], [*np.linspace(0.9, 0.5, 100), 0.1], [0] * 101)]
    result = evaluate(ground_truth, predictions, ["x"])
    assert result["map50"] == 0.0  # the hit is the 101st
    assert result["voc07_map"] == pytest.approx(1 / 101)  # VOC sees all: precision 1/101 at recall 1


# --- edge cases --------------------------------------------------------------------------------


def test_no_predictions_at_all():
    records = random_scene(np.random.default_rng(2), 5, 2)
    result = evaluate(records, [pred(np.zeros((0, 4)), [], []) for _ in records], ["a", "b", "c"])
    assert_json_clean(result)
    assert (result["map"], result["map50"], result["map75"], result["voc07_map"]) == (0.0, 0.0, 0.0, 0.0)
    assert result["per_class"]["a"]["ap"] == 0.0 and result["per_class"]["a"]["voc07_ap"] == 0.0
    assert result["per_class"]["c"]["ap"] is None


def test_class_without_predictions_scores_zero_and_halves_the_mean():
    records = [gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])]
    result = evaluate(records, [pred([[0, 0, 10, 10]], [0.9], [0])], ["a", "b"])
    assert result["per_class"]["b"]["ap"] == 0.0 and result["per_class"]["b"]["voc07_ap"] == 0.0
    assert result["map"] == pytest.approx(0.5, abs=1e-12) and result["voc07_map"] == 0.5


def test_empty_inputs():
    result = evaluate([], [], ["a", "b"])
    assert_json_clean(result)
    assert (result["map"], result["map50"], result["map75"], result["voc07_map"]) == (0.0, 0.0, 0.0, 0.0)
    assert result["per_class"]["a"] == {
        "ap": None, "ap50": None, "voc07_ap": None, "num_gt": 0, "num_detections": 0
    }  # fmt: skip
    # Predictions but no ground truth anywhere: still nothing to measure, and no crash.
    result = evaluate([gt(np.zeros((0, 4)), [])], [pred([[0, 0, 1, 1]], [0.5], [1])], ["a", "b"])
    assert result["map"] == 0.0 and result["per_class"]["b"]["ap"] is None


def test_images_without_ground_truth_or_predictions_change_nothing():
    records = random_scene(np.random.default_rng(3), 6, 2)
    rng = np.random.default_rng(4)
    predictions = [
        pred(
            r["boxes"] + rng.normal(0, 4, r["boxes"].shape), rng.uniform(0, 1, len(r["labels"])), r["labels"]
        )
        for r in records
    ]
    base = evaluate(records, predictions, ["a", "b"])
    assert 0.0 < base["map"] < 1.0  # the noise makes it interesting
    padded = evaluate(
        [gt(np.zeros((0, 4)), []), *records, gt(np.zeros((0, 4)), [])],
        [pred(np.zeros((0, 4)), [], []), *predictions, pred(np.zeros((0, 4)), [], [])],
        ["a", "b"],
    )
    assert padded == base


def test_length_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match=r"one record per image.*got 2 and 1"):
        evaluate([gt([[0, 0, 1, 1]], [0])] * 2, [pred([[0, 0, 1, 1]], [1.0], [0])], ["a"])


@pytest.mark.parametrize(
    ("ground_truth", "prediction", "message"),
    [
        (gt([[0, 0, 1, 1]], [3]), pred(np.zeros((0, 4)), [], []), "labels must be in"),
        (gt([[0, 0, 1, 1]], [0]), pred([[0, 0, 1, 1]], [1.0, 0.5], [0]), "expected 1 values"),
        (gt([[5, 0, 1, 1]], [0]), pred(np.zeros((0, 4)), [], []), "x_max >= x_min"),
        ({"boxes": np.zeros((2, 3)), "labels": [0, 0]}, pred(np.zeros((0, 4)), [], []), r"\[N, 4\]"),
    ],
)
def test_malformed_records_are_value_errors(ground_truth, prediction, message):
    with pytest.raises(ValueError, match=message):
        evaluate([ground_truth], [prediction], ["a"])


def test_torch_tensors_give_the_same_result():
    records = random_scene(np.random.default_rng(5), 6, 2)
    rng = np.random.default_rng(6)
    predictions = [
        pred(
            r["boxes"] + rng.normal(0, 4, r["boxes"].shape), rng.uniform(0, 1, len(r["labels"])), r["labels"]
        )
        for r in records
    ]
    tensors = lambda record: {key: torch.as_tensor(value) for key, value in record.items()}  # noqa: E731
    expected = evaluate(records, predictions, ["a", "b"])
    got = evaluate([tensors(r) for r in records], [tensors(p) for p in predictions], ["a", "b"])
    assert got == expected


# --- against pycocotools run the usual way, from files ------------------------------------------


def coco_from_files(tmp_path: Path, records, predictions, category_ids, image_ids) -> COCOeval:
    """pycocotools on a COCO instances JSON and a results JSON, with its own ids."""
    categories = [{"id": cid, "name": f"c{cid}"} for cid in category_ids]
    images, annotations, results = [], [], []
    for image_id, r, p in zip(image_ids, records, predictions, strict=True):
        images.append({"id": image_id, "width": 640, "height": 640, "file_name": f"{image_id}.jpg"})
        crowd = r.get("crowd", np.zeros(len(r["labels"]), dtype=bool))
        for box, label, is_crowd in zip(
            r["boxes"].tolist(), r["labels"].tolist(), crowd.tolist(), strict=True
        ):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(is_crowd),
                }
            )
        for box, score, label in zip(
            p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "results.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_agrees_with_pycocotools_on_json_files(tmp_path):
    rng = np.random.default_rng(7)
    num_classes = 4
    records = random_scene(rng, 15, num_classes)
    for r in records:
        r["crowd"] = rng.uniform(0, 1, len(r["labels"])) < 0.15
    predictions = []
    for r in records:
        keep = rng.uniform(0, 1, len(r["labels"])) < 0.8  # some misses
        boxes = r["boxes"][keep] + rng.normal(0, 8, (int(keep.sum()), 4))
        extra = rng.uniform(0, 600, (3, 2))  # some false positives
        boxes = np.concatenate([boxes, np.concatenate([extra, extra + 40], axis=1)])
        labels = np.concatenate([r["labels"][keep], rng.integers(0, num_classes, 3)])
        predictions.append(pred(boxes, rng.uniform(0, 1, len(boxes)), labels))

    # Sparse category ids and image ids, as in COCO: our 0-based conversion must not matter.
    category_ids = [1, 3, 18, 90]
    reference = coco_from_files(
        tmp_path, records, predictions, category_ids, [7 * i + 100 for i in range(15)]
    )
    result = evaluate(records, predictions, ["a", "b", "c", "d"])

    assert 0.2 < result["map"] < 0.9  # neither trivial nor broken
    assert [result["map"], result["map50"], result["map75"]] == reference.stats[:3].tolist()
    precision = reference.eval["precision"][:, :, :, 0, -1]  # area "all", 100 detections
    for k, name in enumerate("abcd"):
        assert result["per_class"][name]["ap"] == pytest.approx(precision[:, :, k].mean(), abs=1e-12)
        assert result["per_class"][name]["ap50"] == pytest.approx(precision[0, :, k].mean(), abs=1e-12)
    per_class_mean = np.mean([result["per_class"][name]["ap"] for name in "abcd"])
    assert result["map"] == pytest.approx(per_class_mean, abs=1e-12)


# --- real COCO annotations (photos/) -------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_photos():
    path = PHOTOS / "instances_val2017.json"
    data = json.loads(path.read_text())
    category_ids = sorted(c["id"] for c in data["categories"])
    index = {cid: k for k, cid in enumerate(category_ids)}
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    records = []
    for image in data["images"]:
        anns = by_image[image["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        records.append(
            {
                "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                "labels": np.array([index[a["category_id"]] for a in anns], dtype=np.int64),
                "crowd": np.array([bool(a["iscrowd"]) for a in anns]),
                "width": image["width"],
                "height": image["height"],
            }
        )
    return records, [names[cid] for cid in category_ids]


def test_coco_photos_ground_truth_as_predictions(coco_photos):
    records, classes = coco_photos
    assert len(records) == 10 and sum(len(r["labels"]) for r in records) == 121 and len(classes) == 80
    assert sum(int(r["crowd"].sum()) for r in records) == 2
    result = evaluate(records, as_predictions(records), classes)
    assert_json_clean(result)
    assert (result["map"], result["map50"], result["map75"], result["voc07_map"]) == (1.0, 1.0, 1.0, 1.0)
    assert sum(entry["num_gt"] for entry in result["per_class"].values()) == 121 - 2


def test_coco_photos_dropping_one_class(coco_photos):
    records, classes = coco_photos
    dropped = classes.index("person")
    predictions = []
    for r in records:
        keep = r["labels"] != dropped
        predictions.append(pred(r["boxes"][keep], np.ones(int(keep.sum())), r["labels"][keep]))
    result = evaluate(records, predictions, classes)
    measured = [name for name, entry in result["per_class"].items() if entry["num_gt"] > 0]
    assert "person" in measured and len(measured) < len(classes)  # some classes have no (non-crowd) boxes
    assert result["per_class"]["person"]["ap"] == 0.0 and result["per_class"]["person"]["voc07_ap"] == 0.0
    expected = 1 - 1 / len(measured)
    assert result["map"] == pytest.approx(expected, abs=1e-12)
    assert result["map50"] == pytest.approx(expected, abs=1e-12)
    assert result["voc07_map"] == pytest.approx(expected, abs=1e-12)
    assert result["map75"] == pytest.approx(expected, abs=1e-12)
