"""The committed demo model keeps the quickstart's promise: validation mAP@0.5 >= 0.8, recorded in
its metadata, and measured again here on the artifact itself, run by ONNX Runtime as the service
runs it, over the validation set that `make demo-model` generates."""

import re
from pathlib import Path

import numpy as np
import pytest

from model.data import open_dataset
from model.data.synth import generate
from model.evaluation import evaluate
from model.inference import ground_truth
from service.artifact import Detector
from service.predict import detect_files

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"


def recipe_validation_set() -> tuple[int, int]:
    """(validation images, seed) of the `ssd data synth` call in the Makefile's demo-model recipe."""
    found = re.search(r"ssd data synth .*--val-images (\d+) --seed (\d+)", (ROOT / "Makefile").read_text())
    assert found, "the Makefile's demo-model recipe no longer generates the synthetic set"
    return int(found.group(1)), int(found.group(2))


def test_demo_model_records_the_quickstart_map():
    assert Detector(DEMO).info.describe()["metrics"]["map50"] >= 0.8


@pytest.mark.slow
def test_demo_artifact_scores_its_recorded_map_on_the_validation_set(tmp_path: Path):
    val_images, seed = recipe_validation_set()
    # Every image depends only on (seed, split, index): one training image is enough to
    # regenerate the recipe's validation images byte for byte.
    data = generate(tmp_path / "synth", images=1, val_images=val_images, seed=seed)
    dataset = open_dataset(data, "val")
    detector = Detector(DEMO, intra_op_threads=2)
    # `ssd predict`'s path: every detection the artifact keeps, in pixels of the image.
    answers = detect_files(detector, [ann.path for ann in dataset.annotations], score_threshold=0.0)
    predictions = []
    for answer in answers:
        assert "error" not in answer, answer
        found = answer["detections"]
        predictions.append(
            {
                "boxes": np.array([d["box"] for d in found], dtype=np.float32).reshape(-1, 4),
                "scores": np.array([d["score"] for d in found], dtype=np.float32),
                "labels": np.array([d["class_id"] for d in found], dtype=np.int64),
            }
        )

    measured = evaluate(ground_truth(dataset), predictions, dataset.classes)
    recorded = detector.info.describe()["metrics"]
    assert measured["map50"] >= 0.8
    # PyTorch measured the recorded figure on the same images; only float rounding differs.
    assert measured["map50"] == pytest.approx(recorded["map50"], abs=2e-3)
    assert measured["map"] == pytest.approx(recorded["map"], abs=2e-3)
