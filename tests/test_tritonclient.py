"""Triton's own Python client (``tritonclient.http`` and ``tritonclient.grpc``, unmodified) against
a live ``ssd serve`` with gRPC on: health, metadata, BYTES and UINT8 inference equal to /detect,
errors with the protocol's codes, and bursts of 64 concurrent requests that form batches.

The client runs from an environment of its own (``make tritonclient-env``, which ``make test``
builds): ``tritonclient[grpc]`` pins protobuf below 7 and the project's lock holds protobuf 7, so
the two cannot share one environment. tests/tritonclient/client.py does what a Triton user would
and prints what it got; the assertions are here.
"""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import numpy as np
import pytest
from live import ROOT, free_port, live_server
from PIL import Image
from test_service import CLASSES, encode, scene

CLIENT_PYTHON = ROOT / ".venv" / "tritonclient" / "bin" / "python"
DEMO = ROOT / "models" / "demo.onnx"
MODEL = "ssdlite320_mobilenet_v3_large"  # the demo model, named by its own metadata
BURST = 64
PARAMETERS = {"score_threshold": 0.3, "max_detections": 20, "classes": "circle,square,triangle,star"}


def batches(metrics: str) -> tuple[float, float]:
    """(batches, images) run so far, from /metrics."""
    total = {"detector_batches_total": 0.0, "detector_images_total": 0.0}
    for line in metrics.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in total:
            total[name] += float(line.rsplit(" ", 1)[1])
    return total["detector_batches_total"], total["detector_images_total"]


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    if not CLIENT_PYTHON.exists():
        pytest.skip(f"no tritonclient environment at {CLIENT_PYTHON}: make tritonclient-env")
    folder = tmp_path_factory.mktemp("tritonclient")
    images = [encode(scene(640, 480, seed=11)), encode(scene(500, 375, seed=12), "PNG")]
    paths = []
    for index, data in enumerate(images):
        paths.append(folder / f"image{index}")
        paths[-1].write_bytes(data)
    # The demo model's input size, at which /detect's decoding leaves the pixels as they are.
    pixels = np.stack([np.asarray(scene(320, 320, seed=s).convert("RGB")) for s in (1, 2)])
    np.save(folder / "pixels.npy", pixels)
    spec = {"images": [str(p) for p in paths], "pixels": str(folder / "pixels.npy"),
            "parameters": PARAMETERS, "burst": BURST}  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    grpc_port = free_port()
    settings = {"SSD_MODEL_PATH": str(DEMO), "SSD_GRPC_PORT": str(grpc_port)}
    with live_server(folder, settings) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        query = {**PARAMETERS}
        detect_bytes = http.post(
            "/detect", files=[("file", (p.name, p.read_bytes())) for p in paths], params=query
        ).json()
        pngs = [encode(Image.fromarray(p), "PNG") for p in pixels]
        detect_pixels = http.post(
            "/detect", files=[("file", (f"{i}", d)) for i, d in enumerate(pngs)], params=query
        )
        before = batches(http.get("/metrics").text)
        done = subprocess.run(
            [str(CLIENT_PYTHON), str(ROOT / "tests" / "tritonclient" / "client.py"),
             live.url.removeprefix("http://"), f"127.0.0.1:{grpc_port}", MODEL, str(folder / "spec.json")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:] + live.log.read_text()[-2000:]
        after = batches(http.get("/metrics").text)
        yield {
            "url": live.url,
            "client": json.loads(done.stdout),
            "detect_bytes": detect_bytes,
            "detect_pixels": detect_pixels.json(),
            "batches": (after[0] - before[0], after[1] - before[1]),
        }


def test_health_and_metadata(answers):
    client = answers["client"]
    assert client["health"] == {"http": [True, True, True, False], "grpc": [True, True, True]}
    meta = client["metadata"]
    assert meta["http_server"]["name"] == meta["grpc_server"]["name"] == "ssd-detector"
    assert "binary_tensor_data" in meta["http_server"]["extensions"]
    for model in (meta["http_model"], meta["grpc_model"]):
        assert model["name"] == MODEL and model["versions"] == ["1"]
        assert [i["name"] for i in model["inputs"]] == ["images", "pixels"]
        assert [o["name"] for o in model["outputs"]] == ["num_detections", "boxes", "scores", "labels"]
    assert meta["http_model"]["parameters"]["classes"] == CLASSES
    # Triton's .proto has no ModelMetadataResponse.properties: its client drops the class names
    # there (tests/test_oip_grpc.py reads them with the protocol's own stubs); its model
    # configuration has them (below).


def test_model_config_and_repository_index_over_both_transports(answers):
    config = answers["client"]["config"]
    assert json.loads(config["grpc_classes"]) == CLASSES  # as the Triton user reads them
    http, grpc = config["http"], config["grpc"]["config"]
    assert json.loads(http["parameters"]["classes"]["string_value"]) == CLASSES
    for c in (http, grpc):
        assert c["name"] == MODEL and c["platform"] == "onnxruntime_onnx"
        assert [i["name"] for i in c["input"]] == ["images", "pixels"]
        assert [o["name"] for o in c["output"]] == ["num_detections", "boxes", "scores", "labels"]
        assert json.loads(c["parameters"]["classes"]["string_value"]) == CLASSES
    assert http["input"][1]["dims"] == [320, 320, 3] and http["input"][1]["data_type"] == "TYPE_UINT8"
    assert [int(d) for d in grpc["input"][1]["dims"]] == [320, 320, 3]  # int64 is a string in JSON
    assert int(grpc["max_batch_size"]) == http["max_batch_size"] > 0
    index = answers["client"]["index"]
    assert index["http"] == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert index["grpc"]["models"] == [{"name": MODEL, "version": "1", "state": "READY"}]


def _same(outputs: dict, detect: dict) -> None:
    results = detect["results"]
    assert len(outputs["num_detections"]) == len(results)
    assert sum(outputs["num_detections"]) > 0  # something to compare
    for row, result in enumerate(results):
        found = result["detections"]
        n = outputs["num_detections"][row]
        assert n == len(found), (n, len(found))
        assert outputs["labels"][row][:n] == [d["class_id"] for d in found]
        np.testing.assert_allclose(outputs["scores"][row][:n], [d["score"] for d in found], atol=1e-5)
        np.testing.assert_allclose(outputs["boxes"][row][:n], [d["box"] for d in found], atol=0.006)
        assert all(label == -1 for label in outputs["labels"][row][n:])
        assert len(outputs["scores"][row]) == PARAMETERS["max_detections"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inference_equals_detect(answers, protocol):
    infer = answers["client"]["infer"][protocol]
    _same(infer["bytes"], answers["detect_bytes"])
    _same(infer["pixels"], answers["detect_pixels"])
    assert infer["id"] == "r-1"


def test_named_outputs_and_their_binary_flags(answers):
    named = answers["client"]["named_outputs"]
    assert named["outputs"] == ["num_detections", "scores"] and named["boxes_absent"]
    assert named["num_detections"] == [answers["client"]["infer"]["http"]["bytes"]["num_detections"][0]]


def test_errors_carry_the_protocols_codes(answers):
    errors = answers["client"]["errors"]
    assert errors["http_unknown_model"]["status"] == "404"
    assert errors["grpc_unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model" in errors["grpc_unknown_model"]["message"]
    assert errors["http_not_an_image"]["status"] == "400"
    assert errors["grpc_not_an_image"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert errors["http_bad_input"]["status"] == "400" and "shape" in errors["http_bad_input"]["message"]
    assert errors["grpc_bad_parameter"]["status"] == "StatusCode.INVALID_ARGUMENT"
    # Refused at the door when the deadline cannot be met (UNAVAILABLE, as a 503), else expired.
    assert errors["grpc_deadline"]["status"] in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE")
    assert errors["http_timeout_parameter"]["status"] in ("503", "504")
    assert errors["grpc_unimplemented"]["status"] == "StatusCode.UNIMPLEMENTED"


@pytest.mark.timing
def test_bursts_are_answered_whole_in_batches(answers):
    burst = answers["client"]["burst"]
    assert len(burst["http"]) == len(burst["grpc"]) == BURST
    assert len(set(burst["http"] + burst["grpc"])) == 1  # the same image, the same answer
    runs, images = answers["batches"]
    assert images >= 2 * BURST and images / runs > 1.5, (runs, images)  # batches, not one by one


def test_the_readme_example_runs_as_written(answers):
    text = (ROOT / "README.md").read_text()
    section = text.split("### From Triton and KServe clients", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    address = answers["url"].removeprefix("http://")
    done = subprocess.run(
        [str(CLIENT_PYTHON), "-c", example.replace("127.0.0.1:8000", address)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines, "the example printed no detection"
    for line in lines:
        label, score, box = line.split(" ", 2)
        assert label in CLASSES and 0.5 <= float(score) <= 1 and len(json.loads(box)) == 4
