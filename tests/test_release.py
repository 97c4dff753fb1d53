"""release/: an artifact evaluated as the service runs it, and promoted only when not worse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_service import serving, settings

import cli
from model.data import open_dataset
from release.evaluate import evaluate_artifact, predict_artifact
from service.artifact import Detector

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Synthetic scenes of the demo model's classes, in sizes that are not its input's."""
    from model.data.synth import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, "yolo", images=2, val_images=12, seed=7, image_size=(240, 360))
    return out


def _ssd(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_artifact_detections_equal_the_services(served_artifact, shapes):
    import asyncio

    dataset = open_dataset(shapes, "val")
    found = predict_artifact(Detector(served_artifact), dataset, batch_size=5)
    assert sum(len(f["scores"]) for f in found) > 0

    async def ask() -> list[list[dict]]:
        async with serving(settings(served_artifact)) as client:
            answers = []
            for ann in dataset.annotations:
                response = await client.post(
                    "/detect?score_threshold=0.01",
                    content=ann.path.read_bytes(),
                    headers={"Content-Type": "image/jpeg"},
                )
                assert response.status_code == 200, response.text
                answers.append(response.json()["results"][0]["detections"])
            return answers

    for ours, theirs in zip(found, asyncio.run(ask()), strict=True):
        assert len(ours["scores"]) == len(theirs)
        np.testing.assert_allclose(ours["boxes"], [d["box"] for d in theirs], atol=0.006)
        np.testing.assert_allclose(ours["scores"], [d["score"] for d in theirs], atol=6e-6)
        assert ours["labels"].tolist() == [d["class_id"] for d in theirs]


def test_ssd_evaluate_model_scores_the_artifact(shapes, served_artifact, capsys):
    code, out, err = _ssd(capsys, "evaluate", "--model", DEMO, "--data", shapes)
    assert code == 0, err[-2000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["map50"] > 0.5  # the demo model knows these shapes
    assert metrics == evaluate_artifact(DEMO, open_dataset(shapes, "val"))
    # Other classes than the data's: a message, not a score.
    wrong = _with_classes(served_artifact, shapes.parent / "wrong.onnx", ["a", "b", "c", "d", "e", "f"])
    code, _, err = _ssd(capsys, "evaluate", "--model", wrong, "--data", shapes)
    assert code == 2 and "name other classes" in err
    assert "has 6 classes (a, b, c, d, e, and 1 more) that the data lacks" in err
    code, _, err = _ssd(capsys, "evaluate", "--model", shapes / "none.onnx", "--data", shapes)
    assert code == 2 and "none.onnx does not exist" in err


def _with_classes(artifact: Path, out: Path, classes: list[str]) -> Path:
    model = onnx.load(artifact)
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(classes)
    onnx.save(model, out)
    return out


def test_a_worse_candidate_is_not_promoted_unless_forced(shapes, served_artifact, tmp_path, capsys):
    served = tmp_path / "serving" / "model.onnx"
    served.parent.mkdir()
    shutil.copy(DEMO, served)
    code, out, err = _ssd(capsys, "promote", served_artifact, "--over", served, "--data", shapes)
    decision = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and not decision["promoted"], err
    assert decision["candidate"] < decision["served"] and "worse" in decision["reason"]
    assert served.read_bytes() == DEMO.read_bytes()  # kept, untouched
    assert "kept the served model" in err and "--force replaces it" in err

    code, out, _ = _ssd(capsys, "promote", served_artifact, "--over", served, "--data", shapes, "--force")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["promoted"]
    assert served.read_bytes() == served_artifact.read_bytes()
    assert list(served.parent.iterdir()) == [served]  # no temporary file left beside it


def test_a_better_or_equal_candidate_is_promoted(shapes, served_artifact, tmp_path, capsys):
    served = tmp_path / "model.onnx"
    shutil.copy(served_artifact, served)
    code, out, err = _ssd(capsys, "promote", DEMO, "--over", served, "--data", shapes, "--metric", "map50")
    decision = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and decision["promoted"] and decision["metric"] == "map50", err
    assert decision["candidate"] > decision["served"]
    assert served.read_bytes() == DEMO.read_bytes()
    # The same model again: not worse, so promoted; a margin lets a slightly worse one through.
    code, out, _ = _ssd(capsys, "promote", DEMO, "--over", served, "--data", shapes)
    assert code == 0
    served.write_bytes(DEMO.read_bytes())
    code, out, _ = _ssd(
        capsys, "promote", served_artifact, "--over", served, "--data", shapes, "--min-delta", "1"
    )
    assert code == 0 and served.read_bytes() == served_artifact.read_bytes()


def test_promotion_first_install_broken_served_and_other_classes(shapes, served_artifact, tmp_path, capsys):
    served = tmp_path / "models" / "model.onnx"
    code, out, _ = _ssd(capsys, "promote", DEMO, "--over", served, "--data", shapes)
    assert code == 0 and "nothing was served" in json.loads(out.strip().splitlines()[-1])["reason"]
    assert served.read_bytes() == DEMO.read_bytes()

    served.write_bytes(b"not onnx")
    code, out, _ = _ssd(capsys, "promote", DEMO, "--over", served, "--data", shapes)
    assert code == 0 and "not a loadable artifact" in json.loads(out.strip().splitlines()[-1])["reason"]

    other = _with_classes(served_artifact, tmp_path / "other.onnx", ["a", "b", "c", "d", "e", "f"])
    code, out, err = _ssd(capsys, "promote", other, "--over", served, "--data", shapes)
    assert code == 1 and "the data has 6 classes (circle, square" in err
    assert served.read_bytes() == DEMO.read_bytes()

    code, _, err = _ssd(capsys, "promote", tmp_path / "missing.onnx", "--over", served, "--data", shapes)
    assert code == 2 and "missing.onnx does not exist" in err
    code, _, err = _ssd(capsys, "promote", served, "--over", served, "--data", shapes)
    assert code == 2 and "is the served file itself" in err


def test_a_killed_promotes_leftovers_are_removed_by_the_next(shapes, tmp_path, capsys):
    """A promote killed mid-copy leaves its temporary file on the model volume; the next one
    removes those of its own pattern that no live writer could still hold, and says so."""
    import os

    from model.files import STALE_AFTER_S

    served = tmp_path / "model.onnx"
    shutil.copy(DEMO, served)
    stale = tmp_path / ".model.onnx.k1ll3d00.tmp"
    fresh = tmp_path / ".model.onnx.wr1t1ng0.tmp"  # another promote, still copying
    other = tmp_path / ".other.onnx.k1ll3d00.tmp"  # not this file's
    for leftover in (stale, fresh, other):
        leftover.write_bytes(b"half a model")
    old = os.stat(stale).st_mtime - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    code, _, err = _ssd(capsys, "promote", DEMO, "--over", served, "--data", shapes)
    assert code == 0
    assert not stale.exists() and fresh.exists() and other.exists()
    assert f"removed {stale}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [served.name, fresh.name, other.name]
    )  # and the promote's own temporary file is gone too


def test_a_failed_staged_write_leaves_nothing(tmp_path):
    from model.files import staged

    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), staged(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with staged(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_the_retrain_job_keeps_a_better_served_model(tmp_path):
    """The issue's case: one epoch on a tiny set must not replace the demo model."""
    import os
    import subprocess
    import sys

    from model.data.synth import generate

    data = generate(tmp_path / "data", "voc", images=8, val_images=6, seed=2, image_size=(160, 160))
    served = tmp_path / "models" / "model.onnx"
    served.parent.mkdir()
    shutil.copy(DEMO, served)
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SSD_TRAIN_DATA": str(data),
        "SSD_TRAIN_RUNS": str(tmp_path / "runs"),
        "SSD_MODEL_OUT": str(served),
        "SSD_TRAIN_EPOCHS": "1",
    }
    done = subprocess.run(
        [ROOT / "deploy" / "retrain.sh"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ssd promote: kept the served model" in done.stderr and "worse" in done.stderr
    assert served.read_bytes() == DEMO.read_bytes()
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "model.onnx").is_file()  # the candidate stays in its run folder


def test_an_image_the_service_would_refuse_is_named(tmp_path, capsys):
    from model.data.synth import generate

    data = generate(tmp_path / "data", "yolo", images=1, val_images=2, seed=3, image_size=(96, 96))
    victim = sorted((data / "images" / "val").iterdir())[1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) * 6 // 10])  # the header reads, the pixels do not
    code, _, err = _ssd(capsys, "evaluate", "--model", DEMO, "--data", data)
    assert code == 2 and victim.name in err and "truncated" in err and "Traceback" not in err
