"""Training on one's own data as a new user meets it: one-split exports, a subset of classes, the
defaults in --help, the closing summary, and the messages of evaluate, promote and predict."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_data import Img, coco_dict, save_image, write_coco

from model import defaults
from model import train as training
from model.data import DatasetError, open_dataset, splits
from model.data.subsets import (
    class_difference,
    hold_out,
    open_evaluation_split,
    open_training_splits,
    select_classes,
)
from model.data.summary import Summary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"


@pytest.fixture(scope="module")
def one_split(tmp_path_factory) -> Path:
    """Label Studio's "COCO with images" export: result.json beside images/, one split, named for
    none, each image named by its path on the Label Studio server (as Label Studio 1.23 writes
    them: tests/test_labelstudio_live.py exports a real one) and packed in images/ by its base
    name. Synthetic shapes, so that a run learns something."""
    from model.data.synth import generate

    made = generate(
        tmp_path_factory.mktemp("synth"), "coco", images=20, val_images=1, seed=5, image_size=(160, 160)
    )
    out = tmp_path_factory.mktemp("label-studio")
    shutil.copytree(made / "train", out / "images")
    data = json.loads((made / "annotations" / "instances_train.json").read_text())
    for image in data["images"]:
        # A path on that server, up from its export folder (os.pardir: not a path of ours).
        image["file_name"] = "/".join(
            [os.pardir, os.pardir, "label-studio/data/media/upload/1", image["file_name"]]
        )
    (out / "result.json").write_text(json.dumps(data))
    return out


def test_a_folder_holding_one_export_is_one_split_and_holds_out_a_seeded_share(one_split):
    assert splits(one_split) == [""]  # named for no split
    assert len(open_dataset(one_split, "train")) == 20  # the folder opens as the file does
    chosen = open_training_splits(one_split, None, None, val_fraction=0.1, seed=0)
    assert (len(chosen.train), len(chosen.val)) == (18, 2)
    assert chosen.validation == "2 images held out of the data (--val-fraction 0.1, --seed 0)"
    held = {a.path for a in chosen.val.annotations}
    assert not held & {a.path for a in chosen.train.annotations}
    # The same seed, the same share, in training and in evaluation; another seed, another one.
    again = open_evaluation_split(one_split, "val", val_fraction=0.1, seed=0)
    assert {a.path for a in again.annotations} == held
    assert hold_out(20, 0.1, 1) != hold_out(20, 0.1, 0)
    with pytest.raises(DatasetError, match="between 0 and 1"):
        hold_out(20, 1.5, 0)


def test_a_coco_folder_with_only_a_val_file_trains_on_it(tmp_path):
    write_coco(tmp_path, [Img(f"v{i}", objects=[(0, 1, 1, 30, 30)]) for i in range(10)], split="val")
    assert splits(tmp_path) == ["val"]
    chosen = open_training_splits(tmp_path, None, None, val_fraction=0.2, seed=0)
    assert (chosen.train_split, len(chosen.train), len(chosen.val)) == ("val", 8, 2)
    # Asked for a split it lacks: the splits it has, and how to evaluate what a run held out.
    with pytest.raises(DatasetError, match=r"one split, 'val'.*--val-fraction and --seed"):
        open_evaluation_split(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"splits here: val \(instances_val\.json\)"):
        open_dataset(tmp_path, "train")


def test_a_val_split_on_disk_is_used_and_a_missing_named_one_is_an_error(tmp_path):
    write_coco(tmp_path, [Img(f"t{i}", objects=[(0, 1, 1, 30, 30)]) for i in range(4)], split="train")
    write_coco(tmp_path, [Img("v0", objects=[(1, 1, 1, 30, 30)])], split="val")
    chosen = open_training_splits(tmp_path, None, None, val_fraction=0.1, seed=0)
    assert (len(chosen.train), len(chosen.val), chosen.validation) == (4, 1, "split 'val'")
    with pytest.raises(DatasetError, match="no split 'test' to validate on; splits here: train, val"):
        open_training_splits(tmp_path, None, "test", val_fraction=0.1, seed=0)


def test_a_subset_of_classes_in_the_order_given(tmp_path):
    images = [
        Img("a", objects=[(0, 1, 1, 20, 20), (2, 5, 5, 40, 40), (1, 2, 2, 9, 9)]),
        Img("b", objects=[(0, 3, 3, 9, 9)]),
    ]
    (tmp_path / "data.json").write_text(json.dumps(coco_dict(images)))
    for i, img in enumerate(images):
        save_image(tmp_path / f"{img.name}.jpg", img.width, img.height, seed=i)
    full = open_dataset(tmp_path / "data.json")
    assert full.classes == ["cat", "dog", "bird"]
    chosen, dropped = select_classes(full, ["bird", "cat"])
    assert chosen.classes == ["bird", "cat"]
    assert chosen.category_ids == [full.category_ids[2], full.category_ids[0]]
    assert chosen.annotations[0].labels.tolist() == [1, 0]  # cat -> 1, bird -> 0; the dog dropped
    assert chosen.annotations[1].labels.tolist() == [1]
    assert dict(dropped) == {"dog": 1}
    with pytest.raises(
        DatasetError, match="classes horse are not in the dataset; its classes: cat, dog, bird"
    ):
        select_classes(full, ["horse"])


def test_a_class_without_objects_cannot_be_evaluated_on_a_validation_split(tmp_path):
    path = write_coco(tmp_path, [Img("a", objects=[(0, 1, 1, 30, 30)])], split="val")
    dataset = open_dataset(path, "val")  # cat has an object; dog and bird none
    trained = Summary.of(dataset, "t", "train").lines()
    validated = Summary.of(dataset, "v", "val").lines()
    assert sum("dog" in line and "cannot be learnt from this split" in line for line in trained) == 1
    assert sum("bird" in line and "cannot be evaluated on this split" in line for line in validated) == 1
    assert not any("learnt" in line for line in validated)


def test_train_help_takes_each_default_from_where_the_run_takes_it(monkeypatch, capsys):
    """One source per default: change it in model/defaults.py, and --help says the new value."""
    import argparse

    for name, value in [
        ("PRECISE_BN_IMAGES", 1234),
        ("MAX_AUTO_BATCH", 48),
        ("MAX_WARMUP", 777),
        ("PRETRAINED_BELOW", 5555),
    ]:
        monkeypatch.setattr(defaults, name, value)
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "make 1234 images" in text and "default 48" in text and "at most 777" in text and "5,555" in text
    # No architecture given: the default, and the help says which and why.
    args = parser.parse_args(["--data", "somewhere"])
    assert training.config_from_args(args).model == defaults.MODEL == "ssdlite320_mobilenet_v3_large"
    assert "default ssdlite320_mobilenet_v3_large: the smallest and fastest" in text


def test_a_one_split_export_trains_as_it_comes_and_ends_with_a_summary(one_split, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, "ssd.train")
    run = tmp_path / "run"
    config = training.TrainConfig(
        data=str(one_split), out=str(run), epochs=1, batch_size=6, workers=0, device="cpu",
        backbone_weights="none", classes="circle,square",
    )  # fmt: skip
    training.train(config)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    assert settings["classes"] == ["circle", "square"] and settings["val_fraction_effective"] == 0.1
    assert (settings["train_images"], settings["val_images"]) == (18, 2)
    assert settings["validation"] == "2 images held out of the data (--val-fraction 0.1, --seed 0)"
    left_out = sum(settings["objects_left_out"].values())
    assert left_out > 0
    assert f"left out by --classes: {left_out} objects" in caplog.text
    summary = capsys.readouterr().out
    assert "ssd train: done in" in summary and "best epoch 1 of 1: mAP@0.5" in summary
    assert f"{left_out} objects of other classes left out" in summary
    assert f"ssd export --checkpoint {run / 'best.pt'} --out {run / 'model.onnx'}" in summary
    assert f"--data {one_split} --val-fraction 0.1 --seed 0" in summary


def test_evaluate_prints_a_table_and_follows_the_runs_classes_and_share(one_split, tmp_path, capsys):
    """The checkpoint of a run on two classes, evaluated as the summary says: on the share it held
    out, on its two classes of the data's, with a table per class on stderr and JSON on stdout."""
    import cli

    run = tmp_path / "run"
    training.train(training.TrainConfig(
        data=str(one_split), out=str(run), epochs=1, batch_size=6, workers=0, device="cpu",
        backbone_weights="none", classes="square,circle",
    ))  # fmt: skip
    capsys.readouterr()
    argv = [
        "evaluate",
        "--checkpoint",
        str(run / "best.pt"),
        "--data",
        str(one_split),
        "--val-fraction",
        "0.1",
    ]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err[-2000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert list(metrics["per_class"]) == ["square", "circle"]
    assert "detects 2 of the data's" in err
    header = next(line for line in err.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "AP", "AP50", "objects", "detections"]
    rows = {
        line.split()[0]: line.split()
        for line in err.splitlines()
        if line.split()[:1] in (["square"], ["circle"])
    }
    assert rows["square"][3] == str(metrics["per_class"]["square"]["num_gt"])
    assert sum(metrics["per_class"][c]["num_gt"] for c in ("square", "circle")) > 0


def test_class_lists_differ_briefly():
    many = [f"class{i}" for i in range(80)]
    said = class_difference(many[:3], many, "the candidate", "the served model")
    assert said == (
        "the served model has 77 classes (class3, class4, class5, class6, class7, and 72 more) that "
        "the candidate lacks"
    )
    said = class_difference(["b", "a"], ["a", "b"], "the candidate", "the data")
    assert said == "the same 2 classes in another order (class 0 is 'b' in the candidate, 'a' in the data)"


def test_promote_compares_classes_before_evaluating_anything(tmp_path, monkeypatch, capsys):
    """A candidate of other classes than the served model's is refused at once, in a line."""
    import onnx

    import release.evaluate
    from release import promote

    monkeypatch.setattr(release.evaluate, "evaluate_detector", lambda *a, **k: pytest.fail("evaluated"))
    model = onnx.load(str(DEMO))
    names = json.loads(next(p.value for p in model.metadata_props if p.key == "classes"))
    reordered = tmp_path / "candidate.onnx"
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(list(reversed(names)))
    onnx.save(model, str(reordered))
    data = tmp_path / "data"
    write_coco(data, [Img("v", objects=[(0, 1, 1, 30, 30)])], split="val", classes=list(reversed(names)))
    served = tmp_path / "served.onnx"
    shutil.copy(DEMO, served)
    decision = promote.decide(reordered, served, open_dataset(data, "val"))
    assert not decision.promoted
    assert decision.reason.startswith("the same 6 classes in another order (class 0 is")
    assert served.read_bytes() == DEMO.read_bytes()


def test_predict_given_a_checkpoint_says_to_export_it(tmp_path, capsys):
    import torch

    from service import predict

    checkpoint = tmp_path / "best.pt"
    torch.save({"model": {}}, checkpoint)
    parser = __import__("argparse").ArgumentParser()
    predict.configure(parser)
    code = predict.run(parser.parse_args([str(checkpoint), str(ROOT / "docs" / "images" / "demo_scene.jpg")]))
    err = capsys.readouterr().err
    assert code == 2
    assert "is a PyTorch checkpoint" in err and f"ssd export --checkpoint {checkpoint}" in err


def test_the_batch_norm_recompute_shows_progress(one_split, monkeypatch, capsys):
    """The phase after each epoch's bar that took a minute in silence has a bar of its own (shown
    once it has lasted PROGRESS_AFTER_S; here at once)."""
    import torch

    from model.build import build_model

    monkeypatch.setattr(training, "PROGRESS_AFTER_S", 0.0)
    config = training.TrainConfig(data=str(one_split), workers=0)
    dataset = open_dataset(one_split)
    model = build_model("ssdlite320_mobilenet_v3_large", len(dataset.classes) + 1)
    from model.registry import MODELS
    from model.transforms import train_transforms

    spec = MODELS["ssdlite320_mobilenet_v3_large"]
    dataset.transform = train_transforms(
        spec.input_size, photometric=False, zoom_out=False, fill=spec.image_mean
    )
    training._recompute_statistics(model, dataset, 4, 2, config, 0, torch.device("cpu"))
    assert "batch-norm statistics" in capsys.readouterr().err


def test_classes_may_be_an_artifacts_so_that_the_model_trained_can_replace_it(tmp_path):
    from model.data.subsets import parse_classes

    assert parse_classes(str(DEMO)) == ["circle", "square", "triangle", "star", "hexagon", "cross"]
    with pytest.raises(DatasetError, match="no such artifact"):
        parse_classes(str(tmp_path / "gone.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DatasetError, match="not an artifact with its classes"):
        parse_classes(str(tmp_path / "junk.onnx"))
