"""The service in-process, through httpx's ASGI transport with the app's lifespan: every route,
every input form, every error code, batching, back-pressure, deadlines and hot reload."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from helpers import slow_down
from PIL import Image

from service.app import create_app
from service.runtime import GPURequired
from service.settings import Settings
from service.state import State

PHOTOS = Path(__file__).resolve().parents[1] / "photos" / "val2017"  # photos/README.md
CLASSES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
JPEG = {"Content-Type": "image/jpeg"}


def settings(model: Path, **overrides) -> Settings:
    return Settings(model_path=str(model), providers=["cpu"], intra_op_threads=2, **overrides)


@asynccontextmanager
async def serving_state(config: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, State]]:
    """A client of the service, and its state (to reach the models behind it)."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://detector", timeout=60) as client:
            yield client, app.state.service


@asynccontextmanager
async def serving(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving_state(config) as (client, _):
        yield client


def run(coro):
    return asyncio.run(coro)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def scene(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A synthetic scene of shapes (what the test model was calibrated on)."""
    from model.data.synth import render

    return render(np.random.default_rng(seed), (height, width)).image


def metric(text: str, name: str) -> float:
    """The sum of the series of ``name`` whose labels include those given with it
    (``'detector_requests_total{code="413",route="/detect"}'``)."""
    from prometheus_client.parser import text_string_to_metric_families

    family, _, labels = name.partition("{")
    wanted = dict(pair.split("=", 1) for pair in labels.rstrip("}").split(",") if pair)
    wanted = {k: v.strip('"') for k, v in wanted.items()}
    total = 0.0
    for metric_family in text_string_to_metric_families(text):
        for sample in metric_family.samples:
            if sample.name == family and wanted.items() <= sample.labels.items():
                total += sample.value
    return total


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_operational_routes(served_artifact):
    async def go():
        async with serving(settings(served_artifact)) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).status_code == 200
            model = (await client.get("/model")).json()
            assert model["name"] == "ssdlite320_mobilenet_v3_large"
            assert model["providers"] == ["CPUExecutionProvider"]
            assert model["metadata"]["classes"] == CLASSES
            assert len(model["sha256"]) == 64
            page = await client.get("/")
            assert (
                page.status_code == 200
                and "<canvas" in page.text
                and "http" not in page.text.split("<script")[1]
            )
            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert metric(metrics.text, "detector_ready") == 1
            assert 'detector_model_info{model="ssdlite320_mobilenet_v3_large"' in metrics.text
            assert "process_resident_memory_bytes" in metrics.text
            response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
            assert response.headers["x-request-id"] == "abc-123"
            assert len((await client.get("/healthz")).headers["x-request-id"]) == 32
            # Load balancers and uptime checks probe with HEAD.
            for path in ("/healthz", "/readyz", "/", "/model", "/metrics"):
                head = await client.head(path)
                assert head.status_code == 200 and head.content == b"", path

    run(go())


def test_what_startup_made_is_kept_out_of_the_collectors_way(served_artifact):
    """Startup's objects are frozen (gc.freeze) while the app serves: a full collection, which
    stops the event loop, does not walk them (the tail latency it cut: docs/benchmarks.md, "The
    front end's CPU"); they are thawed when it stops."""
    import gc

    async def go():
        gc.unfreeze()
        async with serving(settings(served_artifact)) as client:
            assert (await client.get("/readyz")).status_code == 200
            assert gc.get_freeze_count() > 10_000
        # Stopped, the app is garbage like any other: each one frozen for good grew the suite's
        # process by 240 MB (its session's arenas), 11 GB over the conformance tests.
        assert gc.get_freeze_count() == 0

    try:
        run(go())
    finally:
        gc.unfreeze()


def test_detect_raw_and_multipart_in_order(served_artifact):
    wide, tall = scene(640, 480, seed=1), scene(300, 500, seed=2)

    async def go():
        async with serving(settings(served_artifact)) as client:
            raw = await client.post(
                "/detect",
                content=encode(wide),
                headers={"Content-Type": "image/jpeg"},
                params={"score_threshold": 0.2},
            )
            assert raw.status_code == 200, raw.text
            body = raw.json()
            assert body["model"]["name"] == "ssdlite320_mobilenet_v3_large"
            (result,) = body["results"]
            assert (result["width"], result["height"]) == (640, 480)
            assert result["detections"], "the calibrated model finds shapes"
            for d in result["detections"]:
                x1, y1, x2, y2 = d["box"]
                assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
                assert d["label"] == CLASSES[d["class_id"]] and d["score"] >= 0.2
            scores = [d["score"] for d in result["detections"]]
            assert scores == sorted(scores, reverse=True)

            files = [("file", ("tall.png", encode(tall, "PNG"), "image/png")),
                     ("file", ("wide.jpg", encode(wide), "image/jpeg"))]  # fmt: skip
            multi = await client.post("/detect", files=files, params={"score_threshold": 0.2})
            assert multi.status_code == 200, multi.text
            results = multi.json()["results"]
            assert [r["filename"] for r in results] == ["tall.png", "wide.jpg"]
            assert (results[0]["width"], results[0]["height"]) == (300, 500)
            assert results[1]["detections"] == result["detections"]  # same image, same answer

            few = await client.post(
                "/detect",
                content=encode(wide),
                headers={"Content-Type": "image/jpeg"},
                params={"score_threshold": 0.01, "max_detections": 3, "classes": "star,circle"},
            )
            detections = few.json()["results"][0]["detections"]
            assert 0 < len(detections) <= 3 and {d["label"] for d in detections} <= {"star", "circle"}

    run(go())


def test_boxes_follow_exif_orientation(served_artifact):
    image = scene(400, 240, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed

    async def go():
        async with serving(settings(served_artifact)) as client:
            response = await client.post(
                "/detect", content=encode(image, exif=exif), headers={"Content-Type": "image/jpeg"}
            )
            result = response.json()["results"][0]
            assert (result["width"], result["height"]) == (240, 400)  # as displayed
            for d in result["detections"]:
                assert d["box"][2] <= 240 and d["box"][3] <= 400

    run(go())


def test_every_image_mode_is_read(served_artifact):
    base = scene(200, 150, seed=4)
    sixteen = Image.new("I;16", base.size)
    sixteen.frombytes((np.asarray(base.convert("L"), dtype="<u2") * 257).tobytes())
    frames = [scene(120, 90, seed=s) for s in (5, 6)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    bodies = {
        "L": encode(base.convert("L"), "PNG"),
        "LA": encode(base.convert("LA"), "PNG"),
        "P": encode(base.convert("P"), "PNG"),
        "RGBA": encode(base.convert("RGBA"), "PNG"),
        "CMYK": encode(base.convert("CMYK"), "JPEG"),
        "I;16": encode(sixteen, "PNG"),
        "GIF": gif.getvalue(),
        "WEBP": encode(base, "WEBP"),
        "BMP": encode(base, "BMP"),
        "TIFF": encode(base, "TIFF"),
    }

    async def go():
        async with serving(settings(served_artifact)) as client:
            for mode, data in bodies.items():
                response = await client.post("/detect", content=data, headers={"Content-Type": "image/x-any"})
                assert response.status_code == 200, (mode, response.text)
                width, height = (120, 90) if mode == "GIF" else (200, 150)
                assert (response.json()["results"][0]["width"], response.json()["results"][0]["height"]) == (
                    width,
                    height,
                )

    run(go())


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny body: never to be decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = zlib.compress(b"\x00" * 64)
    idat = b"IDAT" + data
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(data)) + idat + struct.pack(">I", zlib.crc32(idat))
        + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )  # fmt: skip


def test_bad_input_gets_clear_errors_and_the_service_keeps_serving(served_artifact):
    good = encode(scene(320, 240, seed=7))
    jpeg = {"Content-Type": "image/jpeg"}

    async def go():
        config = settings(
            served_artifact, max_image_bytes=200_000, max_images_per_request=3, max_image_pixels=4_000_000
        )
        async with serving(config) as client:
            assert_error(
                await client.post("/detect", content=good[: len(good) // 2], headers=jpeg),
                400,
                "invalid_image",
            )
            assert_error(await client.post("/detect", content=b"\xff\xd8\xff\xe0garbage", headers=jpeg), 400)
            assert_error(await client.post("/detect", content=b"", headers=jpeg), 400)
            big = encode(
                Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)),
                "PNG",
            )
            assert_error(
                await client.post("/detect", content=big, headers={"Content-Type": "image/png"}), 413
            )
            error = assert_error(
                await client.post(
                    "/detect", content=bomb_png(50_000, 50_000), headers={"Content-Type": "image/png"}
                ),
                413,
                "image_too_large",
            )
            assert "2500000000 pixels" in error["message"]
            files = [("file", (f"{i}.jpg", good, "image/jpeg")) for i in range(4)]
            assert_error(await client.post("/detect", files=files), 413, "too_many_images")
            assert_error(
                await client.post("/detect", content=b"hello", headers={"Content-Type": "text/plain"}), 415
            )
            # Bytes that are no image format at all: 400, whatever the declared type.
            assert_error(
                await client.post("/detect", content=b"just text", headers={"Content-Type": "image/png"}),
                400,
                "invalid_image",
            )
            error = assert_error(
                await client.post("/detect", files=[("file", ("notes.txt", b"just text", "text/plain"))]), 400
            )
            assert "notes.txt" in error["message"]
            # A known format outside the allow-list: 415, named, and never handed to Ghostscript.
            eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
            error = assert_error(await client.post("/detect", content=eps, headers=jpeg), 415)
            assert "EPS" in error["message"]
            assert_error(await client.post("/detect", files={"other": ("a.jpg", good, "image/jpeg")}), 422)
            for params in ({"score_threshold": 1.5}, {"score_threshold": "x"}, {"max_detections": 0},
                           {"max_detections": 201}, {"classes": "dog"}):  # fmt: skip
                assert_error(await client.post("/detect", content=good, headers=jpeg, params=params), 422)
            assert_error(await client.get("/nowhere"), 404)
            # Nothing above stopped the service.
            assert (await client.post("/detect", content=good, headers=jpeg)).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, 'detector_requests_total{code="413",route="/detect"}') == 3

    run(go())


def with_floor(source: Path, target: Path, floor: float) -> None:
    """The same network with another ``score_threshold`` in its metadata, the floor the service
    reads (the graph itself still keeps every score above its own threshold)."""
    proto = onnx.load(source)
    (prop,) = [p for p in proto.metadata_props if p.key == "score_threshold"]
    prop.value = str(floor)
    onnx.save(proto, target)


def test_score_threshold_is_never_below_the_artifact_floor(served_artifact, tmp_path, caplog):
    image = encode(scene(seed=0))
    floored = tmp_path / "floored.onnx"
    with_floor(served_artifact, floored, 0.3)

    async def detect(client: httpx.AsyncClient, **params) -> httpx.Response:
        return await client.post("/detect", content=image, headers=JPEG, params=params)

    def found(response: httpx.Response) -> list[dict]:
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["detections"]

    async def go():
        # A default (SSD_SCORE_THRESHOLD) between the two floors: the calibrated model scores ~0.4 at most.
        async with serving(settings(served_artifact, score_threshold=0.1)) as client:
            floor = (await client.get("/model")).json()["metadata"]["score_threshold"]
            assert floor == 0.01
            for below in (0.005, 0.0):
                error = assert_error(await detect(client, score_threshold=below), 422, "invalid_parameters")
                assert error["message"] == (
                    f"score_threshold {below} is below this model's floor of {floor} "
                    "(the threshold baked into the artifact)"
                )
            for nonsense in ("nan", "NaN", "inf", "-inf", 1.5):
                response = await detect(client, score_threshold=nonsense)
                assert "score_threshold" in assert_error(response, 422, "invalid_parameters")["message"]
            everything = found(await detect(client, score_threshold=floor))  # at the floor is valid
            assert everything and min(d["score"] for d in everything) >= floor

        with caplog.at_level(logging.WARNING, logger="service.runtime"):
            async with serving(settings(floored, score_threshold=0.1)) as client:
                detections = found(await detect(client))  # SSD_SCORE_THRESHOLD 0.1 is below 0.3
                assert detections and all(d["score"] >= 0.3 for d in detections)
                assert detections == [d for d in everything if d["score"] >= 0.3]
                error = assert_error(await detect(client, score_threshold=0.2), 422, "invalid_parameters")
                assert "below this model's floor of 0.3 " in error["message"]
                assert found(await detect(client, score_threshold=0.3)) == detections
        runtime = [r for r in caplog.records if r.name == "service.runtime"]
        warnings = [r.getMessage() for r in runtime if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "SSD_SCORE_THRESHOLD 0.1 is below the floor" in warnings[0], warnings

    run(go())


@pytest.mark.timing
def test_concurrent_requests_form_batches(served_artifact):
    image = encode(scene(320, 320, seed=8))

    async def go():
        async with serving(
            # Room for the whole burst: this test is about batching, not admission.
            settings(
                served_artifact,
                max_batch_size=8,
                max_queue_delay_ms=20,
                max_queue_size=128,
            )
        ) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/detect", content=image, headers={"Content-Type": "image/jpeg"})
                    for _ in range(100)
                )
            )
            assert [r.status_code for r in responses] == [200] * 100
            assert len({r.text for r in responses}) == 1  # batching does not change answers
            text = (await client.get("/metrics")).text
            batches = metric(text, "detector_batch_size_count")
            assert metric(text, "detector_batch_size_sum") == 100
            assert batches < 100 / 2, f"{batches} batches for 100 images: no batching"
            assert metric(text, "detector_images_total") == 100

    run(go())


@pytest.mark.timing
def test_requests_that_cannot_make_their_deadline_are_refused_at_the_door(served_artifact):
    image = encode(scene(320, 320, seed=9))

    async def go():
        # Batches of one that take 0.25 s more than the model (and are known to), so a burst
        # queues up; each request may wait 500 ms at most: one fits, those that cannot finish by
        # then are refused before decoding, with the drain time to retry after. (The margins,
        # not the model's speed, decide: 50 ms deadlines on the model alone failed on one core.)
        config = settings(served_artifact, max_batch_size=1, max_queue_size=100)
        async with serving_state(config) as (client, state):
            (model,) = state.repository.models()
            slow_down(model, 0.25)
            model.batcher.times.reset({1: 0.25})
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/detect",
                        content=image,
                        headers={**JPEG, "X-Request-Id": f"burst-{n}"},
                        params={"timeout_ms": 500},
                    )
                    for n in range(20)
                )
            )
            codes = [r.status_code for r in responses]
            assert 200 in codes and 503 in codes and set(codes) <= {200, 503, 504}, codes
            n, refused = next((n, r) for n, r in enumerate(responses) if r.status_code == 503)
            assert_error(refused, 503, "overloaded")
            assert int(refused.headers["retry-after"]) >= 1
            assert "past its deadline" in refused.json()["error"]["message"]
            # Answered outside the other middleware, with what they would have added: the
            # client's request id; and the connection closed, so that a client retrying at once
            # must reconnect first.
            assert refused.headers["x-request-id"] == f"burst-{n}"
            assert refused.headers["connection"] == "close"
            text = (await client.get("/metrics")).text
            # Refused at the door: only admitted images were decoded (a 504 may have been cut
            # before its decoding started).
            decoded = metric(text, "detector_preprocess_duration_seconds_count")
            assert codes.count(200) <= decoded <= codes.count(200) + codes.count(504)
            assert metric(text, 'detector_rejected_requests_total{reason="overloaded"}') == codes.count(503)
            # A deadline beyond SSD_REQUEST_TIMEOUT_S is not the client's to set.
            too_long = await client.post(
                "/detect", content=image, headers=JPEG, params={"timeout_ms": 10_001}
            )
            assert_error(too_long, 422, "invalid_parameters")
            # What the door (service/door.py) cannot read goes on to the route and its own errors,
            # never a refusal: a malformed deadline, an unknown model.
            for params, status, code in (
                ({"timeout_ms": "soon"}, 422, "invalid_parameters"),
                ({"timeout_ms": "nan"}, 422, "invalid_parameters"),
                ({"timeout_ms": 50, "model": "nope"}, 404, "model_not_found"),
            ):
                answer = await client.post("/detect", content=image, headers=JPEG, params=params)
                assert_error(answer, status, code)
            # A refusal at the door is counted on the route it was meant for, and timed.
            assert metric(text, 'detector_requests_total{code="503",route="/detect"}') == codes.count(503)
            assert metric(text, 'detector_request_duration_seconds_count{route="/detect"}') >= len(codes)

    run(go())


@pytest.mark.timing
def test_expired_requests_answer_504(served_artifact):
    # 24 megapixels of PNG take far longer than 80 ms to decode: admitted at the door (one small
    # batch is well within 80 ms), then the deadline passes while decoding.
    big = encode(Image.new("RGB", (6000, 4000), (90, 120, 30)), "PNG")

    async def go():
        async with serving(settings(served_artifact)) as client:
            response = await client.post(
                "/detect", content=big, headers={"Content-Type": "image/png"}, params={"timeout_ms": 80}
            )
            error = assert_error(response, 504, "deadline_exceeded")
            assert "80 ms" in error["message"]
            # A deadline no batch can make is refused at the door instead, for free.
            tiny = await client.post("/detect", content=big, headers={"Content-Type": "image/png"},
                                     params={"timeout_ms": 0.01})  # fmt: skip
            assert_error(tiny, 503, "overloaded")
            text = (await client.get("/metrics")).text
            assert metric(text, 'detector_rejected_requests_total{reason="deadline"}') == 1

    run(go())


def test_raw_bodies_are_images_by_their_bytes_whatever_their_declared_type(served_artifact):
    """What most HTTP libraries send for raw bytes (application/octet-stream), no type at all, or
    a wrong image type: the bytes decide. A text, JSON or form type holding no image is 415."""
    jpeg = encode(scene(320, 320, seed=4))

    async def go():
        async with serving(settings(served_artifact)) as client:
            for declared in ("application/octet-stream", None, "image/png", "binary/octet-stream",
                             "text/plain"):  # fmt: skip
                headers = {"Content-Type": declared} if declared else {}
                answer = await client.post("/detect", content=jpeg, headers=headers)
                assert answer.status_code == 200, (declared, answer.text)
            for declared in ("text/plain", "application/json", "application/x-www-form-urlencoded",
                             "application/problem+json"):  # fmt: skip
                answer = await client.post(
                    "/detect", content=b'{"image": "cat.jpg"}', headers={"Content-Type": declared}
                )
                error = assert_error(answer, 415, "unsupported_media_type")
                assert declared in error["message"]
            # Bytes that are no image under a non-text type: a broken image, 400.
            broken = await client.post(
                "/detect", content=b"\x00" * 100, headers={"Content-Type": "application/octet-stream"}
            )
            assert_error(broken, 400, "invalid_image")

    run(go())


def test_detect_query_values_of_the_wrong_type_are_422_naming_the_parameter(served_artifact):
    """/detect reads its query itself (service/endpoints.py): each parameter's type is checked,
    a repeated one counts by its last value, and other methods are still FastAPI's 405."""
    jpeg = encode(scene(320, 320, seed=4))

    async def go():
        async with serving(settings(served_artifact)) as client:
            for params, named in (
                ({"max_detections": "ten"}, "max_detections"),
                ({"max_detections": "1.5"}, "max_detections"),
                ({"timeout_ms": "soon"}, "timeout_ms"),
                ({"timeout_ms": "inf"}, "timeout_ms"),
                ({"timeout_ms": "0"}, "timeout_ms"),
                ({"score_threshold": ""}, "score_threshold"),
                ({"model": "m" * 129}, "model"),
                ({"version": "9" * 21}, "version"),
            ):
                response = await client.post("/detect", content=jpeg, headers=JPEG, params=params)
                assert named in assert_error(response, 422, "invalid_parameters")["message"], params
            repeated = await client.post(
                "/detect?max_detections=ten&max_detections=1", content=jpeg, headers=JPEG
            )
            assert repeated.status_code == 200 and len(repeated.json()["results"][0]["detections"]) <= 1
            for method in ("GET", "PUT", "DELETE"):
                assert_error(await client.request(method, "/detect"), 405, "method_not_allowed")
            oip = await client.get("/v2/models/x/infer")
            assert oip.status_code == 405 and isinstance(oip.json()["error"], str)  # the OIP's own form

    run(go())


def test_the_openapi_schema_declares_the_query_the_inference_routes_read(served_artifact):
    """The inference routes are answered below FastAPI; its schema still describes them, with
    the parameters they read."""
    from service.detect import NAMES

    async def go():
        async with serving(settings(served_artifact)) as client:
            schema = (await client.get("/openapi.json")).json()
            detect = schema["paths"]["/detect"]
            assert set(detect) == {"post"}
            assert {p["name"] for p in detect["post"]["parameters"] if p["in"] == "query"} == NAMES
            for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
                assert set(schema["paths"][path]) == {"post"}

    run(go())


def test_unknown_query_parameters_are_422_naming_the_known_ones(served_artifact):
    jpeg = encode(scene(320, 320, seed=4))

    async def go():
        async with serving(settings(served_artifact, admin_token="s3cret")) as client:
            typo = await client.post("/detect", content=jpeg, headers=JPEG, params={"threshold": 0.99})
            error = assert_error(typo, 422, "invalid_parameters")
            assert "threshold" in error["message"] and "score_threshold" in error["message"]
            assert_error(await client.get("/model", params={"modle": "x"}), 422, "invalid_parameters")
            reload = await client.post("/model/reload", params={"force": 1},
                                       headers={"Authorization": "Bearer s3cret"})  # fmt: skip
            assert_error(reload, 422, "invalid_parameters")
            # Known ones still work; the /v2 routes ignore unknown ones, as Triton does.
            ok = await client.post("/detect", content=jpeg, headers=JPEG, params={"score_threshold": 0.9})
            assert ok.status_code == 200
            assert (await client.get("/v2/health/ready", params={"whatever": 1})).status_code == 200

    run(go())


def with_version(source: Path, target: Path, version: str) -> None:
    """The same network under another version (so another sha256), written by rename."""
    proto = onnx.load(source)
    for prop in proto.metadata_props:
        if prop.key == "version":
            prop.value = version
    tmp = target.with_suffix(".tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, target)


@pytest.mark.timing
def test_reload_is_guarded_and_swaps_without_failures(served_artifact, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(served_artifact, model)
    image = encode(scene(seed=11))
    token = {"Authorization": "Bearer s3cret"}

    async def go():
        async with serving(settings(model)) as client:
            assert_error(await client.post("/model/reload", headers=token), 403)  # no token configured
        async with serving(settings(model, admin_token="s3cret")) as client:
            assert_error(await client.post("/model/reload"), 403)
            assert_error(await client.post("/model/reload", headers={"Authorization": "Bearer wrong"}), 403)
            assert_error(await client.post("/model/reload", headers={"Authorization": "Basic s3cret"}), 403)
            # The scheme is case-insensitive (RFC 9110).
            assert (
                await client.post("/model/reload", headers={"Authorization": "bearer s3cret"})
            ).status_code == 200
            before = (await client.get("/model")).json()["sha256"]

            async def load(n: int) -> list[int]:
                out = []
                for _ in range(n):
                    r = await client.post("/detect", content=image, headers={"Content-Type": "image/jpeg"})
                    out.append(r.status_code)
                return out

            with_version(served_artifact, model, "v2")
            traffic = asyncio.gather(*(load(6) for _ in range(4)))
            await asyncio.sleep(0.05)
            reloaded = await client.post("/model/reload", headers=token)
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["artifact_version"] == "v2"
            codes = [c for batch in await traffic for c in batch]
            assert codes == [200] * 24  # zero failed requests across the swap
            after = (await client.get("/model")).json()
            assert after["artifact_version"] == "v2" and after["sha256"] != before

            model.write_bytes(b"not an onnx model at all")
            error = assert_error(await client.post("/model/reload", headers=token), 422, "invalid_artifact")
            assert "not a loadable ONNX model" in error["message"]
            assert (await client.get("/model")).json()["artifact_version"] == "v2"  # the old model serves on
            assert (
                await client.post("/detect", content=image, headers={"Content-Type": "image/jpeg"})
            ).status_code == 200
            text = (await client.get("/metrics")).text
            assert (
                metric(
                    text,
                    'detector_model_reloads_total{model="ssdlite320_mobilenet_v3_large",result="success"}',
                )
                == 2
            )
            assert (
                metric(
                    text,
                    'detector_model_reloads_total{model="ssdlite320_mobilenet_v3_large",result="failure"}',
                )
                == 1
            )
            assert 'version="v2"' in text

    run(go())


def with_classes(source: Path, target: Path, classes: list[str], graph_count: bool = True) -> None:
    """``source`` with other ``classes`` metadata; without ``graph_count``, also without the class
    count the exporter bakes into the graph (an artifact exported before it did)."""
    proto = onnx.load(source)
    (prop,) = [p for p in proto.metadata_props if p.key == "classes"]
    prop.value = json.dumps(classes)
    if not graph_count:
        for field in (proto.graph.input, proto.graph.initializer):
            (marker,) = [v for v in field if v.name == "class_ids"]
            field.remove(marker)
    onnx.save(proto, target)


def test_an_artifact_whose_classes_disagree_with_its_graph_is_refused(served_artifact, tmp_path, caplog):
    model = tmp_path / "model.onnx"
    shutil.copy(served_artifact, model)
    image = encode(scene(seed=3))

    async def go():
        async with serving(settings(model, admin_token="t", score_threshold=0.01)) as client:
            with_classes(served_artifact, model, ["circle"])
            error = assert_error(
                await client.post("/model/reload", headers={"Authorization": "Bearer t"}),
                422,
                "invalid_artifact",
            )
            assert "names 1 classes but its graph has 6" in error["message"]
            assert (await client.get("/readyz")).status_code == 200
            found = (await client.post("/detect", content=image, headers=JPEG)).json()["results"][0][
                "detections"
            ]
            assert found and {d["label"] for d in found} <= set(CLASSES)

        # An older artifact cannot be checked: it loads with a warning, and a label without a name
        # is answered by its id, never a 500.
        with_classes(served_artifact, model, ["circle"], graph_count=False)
        with caplog.at_level(logging.WARNING, logger="service.artifact"):
            async with serving(settings(model, score_threshold=0.01)) as client:
                response = await client.post("/detect", content=image, headers=JPEG)
                assert response.status_code == 200, response.text
                labels = {d["label"] for d in response.json()["results"][0]["detections"]}
                assert labels - {"circle"} and all(n.startswith("class_") for n in labels - {"circle"})
        assert "does not carry its class count" in caplog.text

    run(go())


@pytest.mark.timing
def test_a_changed_artifact_file_is_picked_up(served_artifact, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(served_artifact, model)

    async def go():
        async with serving(settings(model, model_poll_s=0.1)) as client:
            with_version(served_artifact, model, "polled")
            for _ in range(100):
                if (await client.get("/model")).json()["artifact_version"] == "polled":
                    break
                await asyncio.sleep(0.1)
            assert (await client.get("/model")).json()["artifact_version"] == "polled"
            model.write_bytes(b"broken")
            await asyncio.sleep(1.5)
            assert (await client.get("/model")).json()["artifact_version"] == "polled"  # broken file refused
            assert (await client.get("/readyz")).status_code == 200

    run(go())


def test_no_model_means_not_ready_but_alive(tmp_path):
    async def go():
        async with serving(settings(tmp_path / "missing.onnx")) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.get("/readyz")
            assert_error(response, 503, "not_ready")
            assert response.headers["retry-after"]
            assert_error(
                await client.post("/detect", content=b"x", headers={"Content-Type": "image/jpeg"}), 503
            )

    run(go())


def test_require_gpu_refuses_to_start_on_cpu(served_artifact):
    async def go():
        app = create_app(settings(served_artifact, require_gpu=True))
        with pytest.raises(GPURequired, match="CUDA provider did not load"):
            async with app.router.lifespan_context(app):
                pass

    run(go())


def test_real_photos(served_artifact):
    photos = sorted(PHOTOS.glob("*.jpg"))[:4]
    assert len(photos) == 4

    async def go():
        async with serving(settings(served_artifact)) as client:
            files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
            response = await client.post("/detect", files=files)
            assert response.status_code == 200
            for photo, result in zip(photos, response.json()["results"], strict=True):
                with Image.open(photo) as image:
                    assert (result["width"], result["height"]) == image.size

    run(go())
