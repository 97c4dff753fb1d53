"""The labelling loop against the real Label Studio (tests/studio.py starts it): it stores our
predictions, equal to /detect's; its export trains a model the gate promotes over a weak one; the
service reloads it and Label Studio's next predictions carry its version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live import live_server
from studio import Studio, label_studio
from test_labelstudio import CLASSES, back_to_pixels, config
from test_service import encode, metric, scene

from model.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
PHOTOS = sorted((ROOT / "photos" / "val2017").glob("*.jpg"))

pytestmark = [pytest.mark.slow, pytest.mark.timing]


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Iterator[Studio]:
    with label_studio(tmp_path_factory.mktemp("label-studio")) as running:
        yield running


def ssd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_label_studio_stores_our_predictions_and_they_are_detects_answers(studio, tmp_path):
    files = [*PHOTOS[:3]]
    for seed in range(2):
        path = tmp_path / f"scene{seed}.jpg"
        path.write_bytes(encode(scene(640, 480, seed=seed)))
        files.append(path)
    settings = {
        "SSD_MODEL_PATH": str(DEMO),
        "SSD_LABELSTUDIO_URL": studio.url,
        "SSD_LABELSTUDIO_TOKEN": studio.personal_access_token(),
        "SSD_ADMIN_TOKEN": "operator",
    }
    with live_server(tmp_path, settings) as live:
        project = studio.project("pre-annotation", config())
        tasks = studio.upload(project, files)
        backend = live.url + "/labelstudio"
        studio.connect(project, backend, {"score_threshold": 0.3})
        studio.webhook_header(project, backend + "/webhook", {"Authorization": "Bearer operator"})
        assert studio.retrieve_predictions(project)["processed_items"] == len(files)

        model = httpx.get(live.url + "/model").json()
        version = f"{model['name']}-v{model['version']}-{model['sha256'][:12]}"
        stored = studio.predictions(project)
        assert sorted(p["task"] for p in stored) == sorted(tasks)
        boxes = 0
        for prediction in stored:
            assert prediction["model_version"] == version
            data = tasks[prediction["task"]].read_bytes()
            want = httpx.post(live.url + "/detect", params={"score_threshold": 0.3}, content=data).json()
            detections = want["results"][0]["detections"]
            regions = prediction["result"]
            assert len(regions) == len(detections)
            for region, detection in zip(regions, detections, strict=True):
                assert region["value"]["rectanglelabels"] == [detection["label"]]
                assert region["score"] == pytest.approx(detection["score"], abs=1e-5)
                assert back_to_pixels(region) == pytest.approx(detection["box"], abs=0.01)
            assert prediction["score"] == pytest.approx(
                max((d["score"] for d in detections), default=0.0), abs=1e-5
            )
            boxes += len(regions)
        assert boxes >= 10

        # A person's annotation reaches the webhook, with the operator's token Label Studio sends.
        studio.annotate(stored[0]["task"], stored[0]["result"])
        events = 'detector_labelstudio_webhook_events_total{action="ANNOTATION_CREATED"}'
        deadline = time.monotonic() + 20
        while metric(httpx.get(live.url + "/metrics").text, events) < 1:
            assert time.monotonic() < deadline, "no ANNOTATION_CREATED event reached the webhook"
            time.sleep(0.5)
    assert "labelstudio predict" not in live.log.read_text()  # no task failed


def coco_to_results(annotations: dict, image: dict) -> list[dict]:
    """A synthetic image's ground truth as a person's boxes in Label Studio."""
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    width, height = image["width"], image["height"]
    return [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "value": {
                "x": x / width * 100,
                "y": y / height * 100,
                "width": w / width * 100,
                "height": h / height * 100,
                "rotation": 0,
                "rectanglelabels": [names[a["category_id"]]],
            },
        }
        for a in annotations["annotations"]
        if a["image_id"] == image["id"]
        for x, y, w, h in [a["bbox"]]
    ]


def test_corrected_labels_train_a_model_the_gate_promotes_and_label_studio_predicts_with(
    studio, served_artifact, tmp_path
):
    # A deliberately weak model serves first: random weights (tests/conftest.py).
    models = tmp_path / "models"
    models.mkdir()
    served = models / "model.onnx"
    shutil.copyfile(served_artifact, served)
    data = generate(tmp_path / "synth", "coco", images=48, val_images=1, seed=7)
    truth = json.loads((data / "annotations" / "instances_train.json").read_text())
    settings = {
        "SSD_MODEL_PATH": str(served),
        "SSD_MODEL_POLL_S": "0.5",
        "SSD_LABELSTUDIO_URL": studio.url,
        "SSD_LABELSTUDIO_TOKEN": studio.personal_access_token(),
    }
    times: dict[str, float] = {}
    started = time.monotonic()

    def lap(step: str) -> None:
        nonlocal started
        times[step] = round(time.monotonic() - started, 1)
        started = time.monotonic()

    access = ["--url", studio.url, "--token", settings["SSD_LABELSTUDIO_TOKEN"]]
    with live_server(tmp_path, settings) as live:
        # A project of the served model's classes, the service its ML backend (found, not made
        # again, the second time).
        connect = ["labelstudio", "connect", *access, "--detector", live.url, "--title", "the loop"]
        made, again = ssd(*connect), ssd(*connect)
        assert made.returncode == 0 and again.returncode == 0, made.stderr + again.stderr
        project = json.loads(made.stdout)["project"]
        assert json.loads(made.stdout)["created"] and not json.loads(again.stdout)["created"]
        assert json.loads(again.stdout)["project"] == project
        assert len(studio.api.get("/api/ml", params={"project": project}).json()) == 1
        tasks = studio.upload(project, sorted((data / "train").glob("*.jpg")))
        studio.retrieve_predictions(project)
        first = {p["model_version"] for p in studio.predictions(project)}
        assert len(first) == 1
        lap("import and pre-annotate 48 tasks")

        # People correct the boxes (here: the scenes' ground truth).
        by_name = {image["file_name"]: image for image in truth["images"]}
        for task, path in tasks.items():
            studio.annotate(task, coco_to_results(truth, by_name[path.name]))
        lap("annotate")

        # deploy/retrain.sh, as the compose trainer runs it: the export, ssd train (the served
        # model's classes, a seeded tenth held out), ssd export, ssd promote on the held-out tenth.
        runs = tmp_path / "runs"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
        env |= {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            "SSD_LABELSTUDIO_PROJECT": str(project),
            "SSD_LABELSTUDIO_URL": studio.url,
            "SSD_LABELSTUDIO_TOKEN": settings["SSD_LABELSTUDIO_TOKEN"],
            "SSD_TRAIN_RUNS": str(runs),
            "SSD_MODEL_OUT": str(served),
            "SSD_TRAIN_EPOCHS": "4",
        }
        job = subprocess.run(
            ["bash", str(ROOT / "deploy" / "retrain.sh")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        decision = json.loads(job.stdout.strip().splitlines()[-1])
        assert decision["promoted"] and decision["candidate"] > decision["served"], decision
        # The labels' category attributes numbered the export's classes in the model's order.
        (export,) = runs.glob("*/data/result.json")
        categories = json.loads(export.read_text())["categories"]
        assert [c["name"] for c in sorted(categories, key=lambda c: c["id"])] == CLASSES
        lap("deploy/retrain.sh: export, train, export, promote")

        new_sha = hashlib.sha256(served.read_bytes()).hexdigest()
        deadline = time.monotonic() + 30
        while httpx.get(live.url + "/model").json()["sha256"] != new_sha:
            assert time.monotonic() < deadline, "the promoted model was not picked up"
            time.sleep(0.25)
        lap("hot reload")

        studio.retrieve_predictions(project)
        versions = {p["model_version"] for p in studio.predictions(project)}
        new = versions - first
        assert len(new) == 1 and next(iter(new)).endswith(new_sha[:12])
        latest = [p for p in studio.predictions(project) if p["model_version"] in new]
        assert sorted(p["task"] for p in latest) == sorted(tasks)
        lap("predict with the new model")
    print("labelling loop steps (s):", times)
