"""The Open Inference Protocol over REST, in-process: metadata, health, inference by BYTES and by
UINT8 (JSON and binary), the same answers as /detect, outputs and their binary flags,
compression, deadlines and every error in the protocol's form. Triton's own clients drive a live
server in tests/test_tritonclient.py."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image
from test_service import CLASSES, encode, run, scene, serving, settings

HEADER = "Inference-Header-Content-Length"


def binary_request(inputs, outputs=None, parameters=None, **extra):
    """(body, headers) of a binary-extension request. ``inputs``: (name, datatype, shape, payload)
    with payload a list of bytes (BYTES) or an array."""
    specs, blobs = [], []
    for name, datatype, shape, payload in inputs:
        if datatype == "BYTES":
            blob = b"".join(struct.pack("<I", len(p)) + p for p in payload)
        else:
            blob = np.ascontiguousarray(payload).tobytes()
        specs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = {"inputs": specs, **extra}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def parse_response(response):
    """{name: array} from a JSON or binary-extension answer."""
    length = response.headers.get(HEADER)
    content = response.content
    head = json.loads(content[: int(length)] if length else content)
    out, at = {}, int(length) if length else 0
    types = {"INT64": np.int64, "FP32": np.float32}
    for o in head["outputs"]:
        dtype = types[o["datatype"]]
        if "data" in o:
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(content[at : at + size], dtype=dtype).reshape(o["shape"])
            at += size
    assert at == len(content) or not length
    return head, out


def assert_oip_error(response, status, words=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert words.lower() in body["error"].lower(), body["error"]
    assert "Traceback" not in body["error"]


MODEL = "ssdlite320_mobilenet_v3_large"
INFER = f"/v2/models/{MODEL}/infer"


def test_metadata_and_health(served_artifact):
    async def go():
        async with serving(settings(served_artifact)) as client:
            server = (await client.get("/v2")).json()
            assert (await client.get("/v2/")).json() == server  # no redirect: clients follow none
            assert server["name"] == "ssd-detector" and "binary_tensor_data" in server["extensions"]
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 200
            meta = (await client.get(f"/v2/models/{MODEL}")).json()
            assert (
                meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
            )
            assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
                "images": "BYTES",
                "pixels": "UINT8",
            }
            assert [o["name"] for o in meta["outputs"]] == ["num_detections", "boxes", "scores", "labels"]
            assert meta["parameters"]["classes"] == CLASSES
            assert (await client.get(f"/v2/models/{MODEL}/versions/1")).json() == meta
            assert (await client.get(f"/v2/models/{MODEL}/ready")).json() == {"name": MODEL, "ready": True}
            assert (await client.get(f"/v2/models/{MODEL}/versions/1/ready")).status_code == 200
            assert_oip_error(await client.get("/v2/models/nope"), 404, "unknown model")
            assert_oip_error(await client.get(f"/v2/models/{MODEL}/versions/2"), 404, "no version 2")
            assert_oip_error(await client.get("/v2/models/nope/ready"), 404)
            index = (await client.post("/v2/repository/index")).json()
            assert index == [{"name": MODEL, "version": "1", "state": "READY"}]

    run(go())


def test_bytes_inference_answers_as_detect_does(served_artifact):
    images = [encode(scene(640, 480, seed=1)), encode(scene(300, 500, seed=2), "PNG")]
    params = {"score_threshold": 0.2, "max_detections": 30, "classes": ["circle", "square", "star"]}

    async def go():
        async with serving(settings(served_artifact)) as client:
            files = [("file", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
            detect = await client.post(
                "/detect", files=files, params={"score_threshold": 0.2, "max_detections": 30,
                                                "classes": "circle,square,star"}
            )  # fmt: skip
            assert detect.status_code == 200, detect.text
            body, headers = binary_request([("images", "BYTES", [2], images)], parameters=params, id="r1")
            response = await client.post(INFER, content=body, headers=headers)
            assert response.status_code == 200, response.text
            head, out = parse_response(response)
            assert head["model_name"] == MODEL and head["model_version"] == "1" and head["id"] == "r1"
            assert out["boxes"].shape == (2, 30, 4) and out["scores"].shape == (2, 30)
            for row, result in enumerate(detect.json()["results"]):
                found = result["detections"]
                n = int(out["num_detections"][row])
                assert n == len(found) and n > 0
                assert out["labels"][row, :n].tolist() == [d["class_id"] for d in found]
                np.testing.assert_allclose(out["scores"][row, :n], [d["score"] for d in found], atol=1e-5)
                np.testing.assert_allclose(out["boxes"][row, :n], [d["box"] for d in found], atol=0.006)
                assert (out["labels"][row, n:] == -1).all() and (out["scores"][row, n:] == 0).all()
                assert {CLASSES[c] for c in out["labels"][row, :n]} <= {"circle", "square", "star"}

    run(go())


def test_pixels_json_and_binary_agree_with_detect(served_artifact):
    pixels = np.asarray(scene(320, 320, seed=3).convert("RGB"))
    png = encode(Image.fromarray(pixels), "PNG")

    async def go():
        async with serving(settings(served_artifact)) as client:
            detect = (await client.post("/detect", content=png, headers={"Content-Type": "image/png"})).json()
            found = detect["results"][0]["detections"]
            body, headers = binary_request([("pixels", "UINT8", [1, 320, 320, 3], pixels[None])])
            _, binary = parse_response(await client.post(INFER, content=body, headers=headers))
            as_json = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 320, 320, 3],
                                   "data": pixels.reshape(-1).tolist()}]}  # fmt: skip
            response = await client.post(INFER, json=as_json)
            assert response.status_code == 200 and HEADER not in response.headers
            _, plain = parse_response(response)
            for name in ("num_detections", "boxes", "scores", "labels"):
                np.testing.assert_array_equal(binary[name], plain[name])
            n = int(plain["num_detections"][0])
            assert n == len(found) > 0
            np.testing.assert_allclose(plain["boxes"][0, :n], [d["box"] for d in found], atol=0.006)
            # Nested JSON data (row-major) is the same tensor.
            nested = {"inputs": [{**as_json["inputs"][0], "data": pixels[None].tolist()}]}
            _, again = parse_response(await client.post(INFER, json=nested))
            np.testing.assert_array_equal(again["scores"], plain["scores"])
            # Pixels are at the model's input size already: there is nothing to cut into tiles.
            tiled = await client.post(INFER, json={**as_json, "parameters": {"tile": "auto"}})
            assert tiled.status_code == 400 and "tile" in tiled.json()["error"]

    run(go())


def test_outputs_named_with_their_binary_flags_and_base64_bytes(served_artifact):
    image = encode(scene(seed=4))

    async def go():
        async with serving(settings(served_artifact)) as client:
            request = {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 1],
                            "data": [base64.b64encode(image).decode()]}],
                "outputs": [{"name": "scores", "parameters": {"binary_data": True}},
                            {"name": "num_detections"}],
                "parameters": {"score_threshold": 0.3},
            }  # fmt: skip
            response = await client.post(INFER, json=request)
            assert response.status_code == 200, response.text
            head, out = parse_response(response)
            assert [o["name"] for o in head["outputs"]] == ["scores", "num_detections"]
            assert "parameters" in head["outputs"][0] and "data" in head["outputs"][1]
            assert out["scores"].shape[0] == 1 and out["num_detections"].shape == (1,)
            # binary_data_output (what tritonclient sends when it names no outputs): all binary.
            request.pop("outputs")
            request["parameters"]["binary_data_output"] = True
            head, out = parse_response(await client.post(INFER, json=request))
            assert all("parameters" in o for o in head["outputs"]) and len(out) == 4

    run(go())


def test_compressed_request_and_answer(served_artifact):
    body, headers = binary_request([("images", "BYTES", [1], [encode(scene(seed=5))])])

    async def go():
        async with serving(settings(served_artifact)) as client:
            plain = await client.post(INFER, content=body, headers=headers)
            zipped = await client.post(
                INFER,
                content=gzip.compress(body),
                headers={**headers, "Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
            )
            assert zipped.status_code == 200, zipped.text
            assert zipped.headers["content-encoding"] == "gzip"
            assert zipped.content == plain.content  # httpx inflates it
            bomb = gzip.compress(b"\0" * (400 * 1024 * 1024))  # 400 MB of zeros in 400 KB
            response = await client.post(INFER, content=bomb, headers={**headers, "Content-Encoding": "gzip"})
            assert_oip_error(response, 413, "inflates past")
            assert_oip_error(
                await client.post(INFER, content=body, headers={**headers, "Content-Encoding": "br"}), 415
            )
            assert_oip_error(
                await client.post(
                    INFER, content=b"\x1f\x8bnot gzip", headers={**headers, "Content-Encoding": "gzip"}
                ),
                400,
                "corrupt",
            )

    run(go())


def one(name="images", datatype="BYTES", shape=(1,), data=("AA==",), **extra):
    """A JSON request of one input (by default one base64 BYTES element)."""
    return {
        "inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": list(data)}],
        **extra,
    }


PIXELS = (1, 320, 320, 3)


@pytest.mark.parametrize(
    ("header", "status", "words"),
    [
        (one(name="image"), 400, "unknown input"),
        (one(datatype="FP32", data=[1.0]), 400, "is BYTES"),
        (one(data=["%%%"]), 400, "base64"),
        (one(shape=[2]), 400, "elements"),
        (one("pixels", "UINT8", [1, 2, 2, 3], [0] * 12), 400, "shape"),
        (one("pixels", "UINT8", PIXELS, [300]), 400, "UINT8"),
        (one(datatype="WHAT", data=[]), 400, "datatype"),
        (one(shape=[-1], data=[]), 400, "non-negative"),
        ({"inputs": []}, 400, "no inputs"),
        ({}, 400, "no inputs"),
        ([], 400, "JSON object"),
        (one(outputs=[{"name": "masks"}]), 400, "unknown outputs"),
        (one(parameters={"max_detections": "ten"}), 400, "max_detections"),
        (one(parameters={"classes": ["unicorn"]}), 400, "unknown names"),
        (one(parameters={"score_threshold": 0.0001}), 400, "floor"),
        (one(parameters={"timeout_ms": 10**9}), 400, "timeout_ms"),
        (one(data=["AAAA"]), 400, "images[0]"),
        (one(shape=[17], data=["AA=="] * 17), 413, "at most 16"),
    ],
)
def test_bad_requests_are_the_protocols_errors(served_artifact, header, status, words):
    async def go():
        async with serving(settings(served_artifact)) as client:
            assert_oip_error(await client.post(INFER, json=header), status, words)
            assert (await client.get("/v2/health/ready")).status_code == 200

    run(go())


def test_binary_framing_errors(served_artifact):
    image = encode(scene(seed=6))
    body, headers = binary_request([("images", "BYTES", [1], [image])])

    async def go():
        async with serving(settings(served_artifact)) as client:
            cases = [
                (body + b"extra", headers, "belong to no input"),
                (body, {**headers, HEADER: str(len(body) + 1)}, "does not fit"),
                (body, {**headers, HEADER: "-3"}, "does not fit"),
                (body[:-10], headers, "does not fit the binary data"),
                (b"{nope" + body[5:], headers, "not valid json"),
            ]
            for content, head, words in cases:
                assert_oip_error(await client.post(INFER, content=content, headers=head), 400, words)
            # An element's length running past the data.
            spec = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 8}}]}  # fmt: skip
            head = json.dumps(spec).encode()
            raw = head + struct.pack("<I", 100) + b"abcd"
            response = await client.post(INFER, content=raw, headers={HEADER: str(len(head))})
            assert_oip_error(response, 400, "runs past")
            # Not an image; a known format we do not take.
            for data, status in ((b"not an image at all", 400), (b"%!PS-Adobe-3.0 EPSF-3.0\n", 415)):
                content, head = binary_request([("images", "BYTES", [1], [data])])
                assert_oip_error(await client.post(INFER, content=content, headers=head), status)
            assert (await client.get("/v2/health/ready")).status_code == 200

    run(go())


def test_deadlines_from_timeout_ms_and_tritons_timeout(served_artifact):
    image = encode(scene(seed=7))

    async def go():
        async with serving(settings(served_artifact)) as client:
            for parameters in ({"timeout_ms": 0.001}, {"timeout": 1}):  # 1 µs: no way to make it
                body, headers = binary_request([("images", "BYTES", [1], [image])], parameters=parameters)
                response = await client.post(INFER, content=body, headers=headers)
                assert response.status_code in (503, 504), response.text
                assert set(response.json()) == {"error"}
            # Triton's timeout past the server's longest is held to it, not refused.
            body, headers = binary_request([("images", "BYTES", [1], [image])], parameters={"timeout": 10**9})
            assert (await client.post(INFER, content=body, headers=headers)).status_code == 200

    run(go())


def test_an_image_too_large_by_its_bytes(served_artifact):
    big = io.BytesIO()
    Image.effect_noise((800, 800), 100).convert("RGB").save(big, "PNG")

    async def go():
        async with serving(settings(served_artifact, max_image_bytes=100_000)) as client:
            body, headers = binary_request([("images", "BYTES", [1], [big.getvalue()])])
            assert_oip_error(await client.post(INFER, content=body, headers=headers), 413, "limit")

    run(go())
