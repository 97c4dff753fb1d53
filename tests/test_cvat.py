"""CVAT's nuclio function (deploy/cvat/): its labels are the artifact's classes, and its handler,
against a live service, answers CVAT's detector format with /detect's detections."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from live import free_port, live_server
from test_service import encode, scene

ROOT = Path(__file__).resolve().parents[1]
CVAT = ROOT / "deploy" / "cvat"
DEMO = ROOT / "models" / "demo.onnx"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"cvat_{name}", CVAT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_functions_labels_are_the_served_artifacts_classes():
    committed = (CVAT / "function.yaml").read_text()
    make = load("make_function")
    assert committed == make.function_yaml(str(DEMO)), "run make cvat-function"
    function = yaml.safe_load(committed)
    labels = json.loads(function["metadata"]["annotations"]["spec"])
    _, classes = make.classes_of(str(DEMO))
    assert [label["name"] for label in labels] == classes
    assert {label["type"] for label in labels} == {"rectangle"}
    assert function["metadata"]["annotations"]["type"] == "detector"
    assert function["spec"]["handler"] == "main:handler"


@dataclass
class Answer:
    body: str
    headers: dict
    content_type: str
    status_code: int


def context(detector: str) -> SimpleNamespace:
    """What nuclio hands a Python handler: Response, a logger, user_data."""
    logs: list[str] = []
    logger = SimpleNamespace(info=logs.append, warn=logs.append, error=logs.append)
    return SimpleNamespace(Response=Answer, logger=logger, user_data=SimpleNamespace(), logs=logs)


@pytest.mark.slow
def test_the_handler_answers_cvats_format_with_the_detectors_detections(tmp_path, monkeypatch):
    main = load("main")
    image = encode(scene(640, 480, seed=2))
    with live_server(tmp_path, {"SSD_MODEL_PATH": str(DEMO)}) as live:
        monkeypatch.setenv("SSD_DETECTOR_URL", live.url)
        ctx = context(live.url)
        main.init_context(ctx)
        event = SimpleNamespace(body={"image": base64.b64encode(image).decode(), "threshold": 0.3})
        answer = main.handler(ctx, event)
        assert answer.status_code == 200 and answer.content_type == "application/json"
        shapes = json.loads(answer.body)
        want = httpx.post(live.url + "/detect", params={"score_threshold": 0.3}, content=image).json()
        detections = want["results"][0]["detections"]
        assert len(shapes) == len(detections) >= 3
        for shape, detection in zip(shapes, detections, strict=True):
            assert shape["type"] == "rectangle" and shape["label"] == detection["label"]
            assert float(shape["confidence"]) == pytest.approx(detection["score"])
            assert shape["points"] == pytest.approx(detection["box"])
        # A body nuclio left as bytes, the default threshold.
        raw = SimpleNamespace(body=json.dumps({"image": base64.b64encode(image).decode()}).encode())
        assert all(float(s["confidence"]) >= 0.5 for s in json.loads(main.handler(ctx, raw).body))
        # CVAT's mistakes and the detector's refusals, each a clear error.
        for body, status, words in [
            ({}, 400, "base64 image"),
            ({"image": "not base64!"}, 400, "base64 image"),
            ({"image": base64.b64encode(image).decode(), "threshold": 7}, 400, "threshold"),
            ({"image": base64.b64encode(b"not an image").decode()}, 400, "detector answered 400"),
        ]:
            answer = main.handler(ctx, SimpleNamespace(body=body))
            assert answer.status_code == status and words in json.loads(answer.body)["error"], answer.body
    gone = context("")
    gone.user_data.detector = f"http://127.0.0.1:{free_port()}"
    answer = main.handler(gone, SimpleNamespace(body={"image": base64.b64encode(image).decode()}))
    assert answer.status_code == 502 and "unreachable" in json.loads(answer.body)["error"]
