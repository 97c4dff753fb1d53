"""`ssd evaluate` end to end, and the real COCO photos through our loader and evaluator."""

import json
from pathlib import Path

import pytest
import torch

import cli
from model import build_model
from model.checkpoint import atomic_save
from model.data import open_dataset
from model.evaluation import evaluate
from model.inference import ground_truth, predict_dataset

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos"  # COCO val2017 photos: photos/README.md


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from model.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, "yolo", images=4, val_images=3, seed=5, image_size=(128, 96))
    return out


def _checkpoint(path, classes):
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", len(classes) + 1)
    state = {"model": model.state_dict(), "model_name": model.name, "num_classes": model.num_classes}
    atomic_save(state | {"classes": classes, "scale_set": None}, path)
    return model.eval()


def _ssd(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_ssd_evaluate_prints_the_metrics_as_its_last_line(synth, tmp_path, capsys):
    dataset = open_dataset(synth, "val")
    model = _checkpoint(tmp_path / "model.pt", dataset.classes)
    code, out, err = _ssd(
        capsys, "evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(synth)
    )
    assert code == 0, err[-2000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"map", "map50", "map75", "voc07_map", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]) <= set(dataset.classes)
    # The same numbers as evaluating the model directly.
    expected = evaluate(ground_truth(dataset), predict_dataset(model, dataset), dataset.classes)
    assert metrics["map"] == pytest.approx(expected["map"], abs=1e-6)


def test_ssd_evaluate_names_what_is_wrong(synth, tmp_path, capsys):
    code, _, err = _ssd(capsys, "evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(synth))
    assert code == 2 and "does not exist" in err
    _checkpoint(tmp_path / "other.pt", ["a", "b"])
    code, _, err = _ssd(capsys, "evaluate", "--checkpoint", str(tmp_path / "other.pt"), "--data", str(synth))
    assert code == 2 and "classes" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _ssd(
        capsys, "evaluate", "--checkpoint", str(tmp_path / "other.pt"), "--data", str(tmp_path / "empty")
    )
    assert code == 2 and "VOC" in err and "COCO" in err and "YOLO" in err


def test_real_photos_load_and_score_one_with_their_own_annotations():
    dataset = open_dataset(PHOTOS / "instances_val2017.json", "val")
    assert len(dataset) == 10 and len(dataset.classes) == 80
    truth = ground_truth(dataset)
    assert sum(len(t["boxes"]) for t in truth) == 121 and sum(int(t["crowd"].sum()) for t in truth) == 2
    as_predictions = [
        {"boxes": t["boxes"], "labels": t["labels"], "scores": [1.0] * len(t["boxes"])} for t in truth
    ]
    metrics = evaluate(truth, as_predictions, dataset.classes)
    assert metrics["map"] == pytest.approx(1.0) and metrics["voc07_map"] == pytest.approx(1.0)
    image, target = dataset[0]
    assert image.shape[0] == 3 and image.shape[1:] == (
        dataset.annotations[0].height,
        dataset.annotations[0].width,
    )
    assert len(target["boxes"]) == int((~dataset.annotations[0].crowd).sum())
