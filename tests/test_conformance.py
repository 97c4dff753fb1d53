"""Every guarantee of the request pipeline (service/pipeline.py), through every transport alike:
``POST /detect``, the Open Inference Protocol over REST and over gRPC. Each test runs once per
row of ``TRANSPORTS``; adding a transport is adding an adapter below and a row there.

What is kept: which model answered (its served name and repository version), metrics by route
template and served model, the error mapping (400, 404, 413, 415, 422, 503, 504 and their gRPC
codes), bursts served whole, refusals at the door, deadlines, the budget of request bytes in
flight, and the rejection counted once under its reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from helpers import slow_down
from live import free_port
from PIL import Image
from test_service import encode, metric, run, scene

from service.app import create_app
from service.oip.proto import open_inference_grpc_pb2 as pb
from service.oip.proto import open_inference_grpc_pb2_grpc as pb_grpc
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# gRPC's status as the HTTP status the same case answers: the test's own table, not the
# service's (service/oip/grpc.py maps the other way), so that the two can disagree.
HTTP_OF = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
DEMO = ROOT / "models" / "demo.onnx"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "detector.json"


@dataclass
class Reply:
    status: int  # HTTP's, or gRPC's code as the contract maps it
    message: str = ""
    model: tuple[str, str] | None = None  # (served name, repository version) that answered
    identity: dict | None = None  # /detect's whole "model" object
    counts: list[int] | None = None  # detections per image
    headers: dict | None = None
    tiles: list | None = None  # a tiled request's tiles, per image


class Transport:
    route: str  # the route template the metrics name

    def __init__(self, client: httpx.AsyncClient, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self.client, self.stub = client, stub

    async def infer(self, images: list[bytes], model: str, version: str | None = None,
                    timeout_ms: float | None = None, **params) -> Reply:  # fmt: skip
        raise NotImplementedError


class Detect(Transport):
    route = "/detect"

    async def infer(self, images, model, version=None, timeout_ms=None, **params):
        query = {"model": model, **params}
        if version is not None:
            query["version"] = version
        if timeout_ms is not None:
            query["timeout_ms"] = timeout_ms
        if len(images) == 1:
            r = await self.client.post("/detect", content=images[0], params=query,
                                       headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        else:
            files = [("file", (f"{n}.jpg", data, "image/jpeg")) for n, data in enumerate(images)]
            r = await self.client.post("/detect", files=files, params=query)
        body = r.json()
        if r.status_code != 200:
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
            return Reply(r.status_code, body["error"]["message"], headers=dict(r.headers))
        who = body["model"]
        counts = [len(result["detections"]) for result in body["results"]]
        tiles = [result["tiles"] for result in body["results"]] if "tiles" in body["results"][0] else None
        return Reply(200, "", (who["name"], who["version"]), who, counts, dict(r.headers), tiles)


class OipRest(Transport):
    route = "/v2/models/{name}/infer"

    async def infer(self, images, model, version=None, timeout_ms=None, **params):
        blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
        parameters = {**params, **({"timeout_ms": timeout_ms} if timeout_ms is not None else {})}
        header = {
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                        "parameters": {"binary_data_size": len(blob)}}],
            "parameters": parameters,
        }  # fmt: skip
        head = json.dumps(header).encode()
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        r = await self.client.post(path, content=head + blob, headers={
            "Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"
        })  # fmt: skip
        if r.status_code != 200:
            body = r.json()
            assert set(body) == {"error"} and isinstance(body["error"], str), body
            return Reply(r.status_code, body["error"], headers=dict(r.headers))
        body = r.json()
        counts = next(o["data"] for o in body["outputs"] if o["name"] == "num_detections")
        tiles = json.loads(body["parameters"]["tiles"]) if "tiles" in body.get("parameters", {}) else None
        return Reply(
            200, "", (body["model_name"], body["model_version"]), None, counts, dict(r.headers), tiles
        )


class OipGrpc(Transport):
    route = "ModelInfer"

    async def infer(self, images, model, version=None, timeout_ms=None, **params):
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
        if timeout_ms is not None:
            params["timeout_ms"] = float(timeout_ms)
        for key, value in params.items():
            kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}
            setattr(request.parameters[key], kind[type(value)], value)
        try:
            response = await self.stub.ModelInfer(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return Reply(HTTP_OF.get(exc.code(), 500), exc.details() or "")
        counts = np.frombuffer(response.raw_output_contents[0], np.int64).tolist()
        tiles = (
            json.loads(response.parameters["tiles"].string_param) if "tiles" in response.parameters else None
        )
        return Reply(200, "", (response.model_name, response.model_version), None, counts, None, tiles)


TRANSPORTS = {"detect": Detect, "oip_rest": OipRest, "oip_grpc": OipGrpc}


@dataclass
class Service:
    transport: Transport
    client: httpx.AsyncClient
    state: object  # service.state.State

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    def model(self, name: str):
        return self.state.repository.get(name)


@asynccontextmanager
async def service(kind: str, **overrides) -> AsyncIterator[Service]:
    port = free_port()
    config = Settings(providers=["cpu"], intra_op_threads=2, grpc_port=port, **overrides)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://detector", timeout=60) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            adapter = TRANSPORTS[kind](client, pb_grpc.GRPCInferenceServiceStub(channel))
            yield Service(adapter, client, app.state.service)


@pytest.fixture(params=list(TRANSPORTS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def repository(tmp_path_factory, served_artifact) -> Path:
    """``shapes`` in versions 1 and 2 (Triton's layout, random calibrated weights), ``demo``
    flat (the committed demo model)."""
    folder = tmp_path_factory.mktemp("repository")
    for version in (1, 2):
        (folder / "shapes" / str(version)).mkdir(parents=True)
        shutil.copy(served_artifact, folder / "shapes" / str(version) / "model.onnx")
    shutil.copy(DEMO, folder / "demo.onnx")
    return folder


IMAGE = encode(scene(320, 320, seed=12))


# --- Identity and metrics -----------------------------------------------------------------------


def test_answers_name_the_served_model_and_version(kind, repository):
    async def go():
        async with service(kind, model_dir=str(repository)) as s:
            t = s.transport
            assert (await t.infer([IMAGE], "shapes")).model == ("shapes", "2")  # the highest
            assert (await t.infer([IMAGE], "shapes", version="1")).model == ("shapes", "1")
            demo = await t.infer([IMAGE], "demo")
            assert demo.model == ("demo", "1")
            if demo.identity is not None:  # /detect: the artifact behind the name too
                info = s.model("demo").detector.info
                assert demo.identity == {"name": "demo", "version": "1", "architecture": info.name,
                                         "artifact_version": info.version, "sha256": info.sha256}  # fmt: skip
            missing = await t.infer([IMAGE], "shapes", version="7")
            assert missing.status == 404 and "no version 7" in missing.message

    run(go())


def test_metrics_by_route_template_and_served_model(kind, repository):
    async def go():
        async with service(kind, model_dir=str(repository)) as s:
            t = s.transport
            assert (await t.infer([IMAGE], "shapes")).status == 200
            assert (await t.infer([IMAGE], "no-such-model-xyz")).status == 404
            text = await s.metrics()
            route = t.route
            assert metric(text, f'detector_requests_total{{route="{route}",code="200",model="shapes"}}') == 1
            assert metric(text, f'detector_requests_total{{route="{route}",code="404",model="-"}}') == 1
            assert (
                metric(text, f'detector_request_duration_seconds_count{{route="{route}",model="shapes"}}')
                == 1
            )
            assert metric(text, 'detector_rejected_requests_total{reason="model_not_found"}') == 1
            assert "no-such-model-xyz" not in text  # a 404's name is never a label
            assert 'route="other"' not in text and 'route="unmatched"' not in text
            # The alerts and the dashboard's request panels select inference by route: this one too.
            for selector in re.findall(r'route=~\\?"([^"\\]+)', ALERTS.read_text() + DASHBOARD.read_text()):
                assert re.fullmatch(selector, route), (selector, route)

    run(go())


# --- Errors -------------------------------------------------------------------------------------


def test_errors_map_alike_and_are_counted_once(kind, served_artifact, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(served_artifact, folder / "shapes.onnx")
    (folder / "aa_broken.onnx").write_bytes(b"random bytes, no model")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    cases = [  # (images, model, params, status, reason)
        ([b"\xff\xd8\xff\xe0 not really a jpeg"], "shapes", {}, 400, "invalid_image"),
        ([eps], "shapes", {}, 415, "unsupported_media_type"),
        ([IMAGE] * 3, "shapes", {}, 413, "too_many_images"),
        ([IMAGE], "nope", {}, 404, "model_not_found"),
        ([IMAGE], "aa_broken", {}, 503, "not_ready"),
        ([IMAGE], "shapes", {"score_threshold": 1.5}, 422, "invalid_parameters"),
        ([IMAGE], "shapes", {"max_detections": 100_000}, 422, "invalid_parameters"),
    ]

    async def go():
        async with service(kind, model_dir=str(folder), max_images_per_request=2) as s:
            for images, model, params, status, _ in cases:
                reply = await s.transport.infer(images, model, **params)
                # A bad parameter is the OIP's 400 (REST) and INVALID_ARGUMENT (gRPC), as an
                # unsupported format is on gRPC (the README's table).
                expected = status
                if (status == 422 and kind != "detect") or (status == 415 and kind == "oip_grpc"):
                    expected = 400
                assert reply.status == expected, (images[0][:8], model, params, reply)
                assert reply.message and "Traceback" not in reply.message
            text = await s.metrics()
            for _, _, _, _, reason in cases:
                count = sum(1 for c in cases if c[4] == reason)
                assert metric(text, f'detector_rejected_requests_total{{reason="{reason}"}}') == count, reason
            # Nothing above stopped the service.
            assert (await s.transport.infer([IMAGE], "shapes")).status == 200

    run(go())


def test_what_cannot_serve_says_why(kind, served_artifact, tmp_path):
    """A refused file's reason in the answer of every request for it; with no model at all (the
    folder empty or missing), 503 with Retry-After saying so, not 404: the fault is the
    server's, and a file may yet appear."""
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(served_artifact, folder / "shapes.onnx")
    (folder / "aa_broken.onnx").write_bytes(b"random bytes, no model")

    async def go():
        async with service(kind, model_dir=str(folder)) as s:
            reply = await s.transport.infer([IMAGE], "aa_broken")
            assert reply.status == 503 and "INVALID_PROTOBUF" in reply.message, reply
        for where, why in ((tmp_path / "empty", "holds no"), (tmp_path / "missing", "does not exist")):
            if where.name == "empty":
                where.mkdir()
            async with service(kind, model_dir=str(where)) as s:
                reply = await s.transport.infer([IMAGE], "shapes")
                assert reply.status == 503 and why in reply.message and str(where) in reply.message, reply
                if reply.headers is not None:
                    assert reply.headers.get("retry-after") == "5", reply.headers

    run(go())


# --- Admission, bursts and deadlines --------------------------------------------------------------


@pytest.mark.timing
@pytest.mark.slow
def test_a_burst_of_128_from_32_clients_is_answered_whole(kind, served_artifact):
    """An ordinary batch job with the default settings: 32 connections, 4 requests each back
    to back. Deadlines, not a queue bound, decide admission: all of it fits in 10 s."""

    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes") as s:

            async def one_client() -> list[int]:
                return [(await s.transport.infer([IMAGE], "shapes")).status for _ in range(4)]

            statuses = [
                c for batch in await asyncio.gather(*(one_client() for _ in range(32))) for c in batch
            ]
            assert statuses == [200] * 128

    run(go())


@pytest.mark.timing
def test_a_full_queue_answers_503_at_once(kind, served_artifact):
    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes",
                           max_batch_size=1, max_queue_size=2) as s:  # fmt: skip
            replies = await asyncio.gather(*(s.transport.infer([IMAGE], "shapes") for _ in range(30)))
            statuses = [r.status for r in replies]
            assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
            refused = [r for r in replies if r.status == 503]
            assert all("limit 2" in r.message for r in refused), refused[0]
            text = await s.metrics()
            assert metric(text, 'detector_rejected_requests_total{reason="queue_full"}') == len(refused)

    run(go())


def test_a_request_that_cannot_make_its_deadline_is_refused_at_the_door(kind, served_artifact):
    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes") as s:
            model = s.model("shapes")
            model.batcher.times.reset({1: 60.0})  # one image would take a minute
            decoded_before = metric(await s.metrics(), "detector_preprocess_duration_seconds_count")
            reply = await s.transport.infer([IMAGE], "shapes", timeout_ms=5000)
            assert reply.status == 503 and "deadline" in reply.message, reply
            if reply.headers is not None:  # HTTP: when to come back, and the connection closed
                assert int(reply.headers["retry-after"]) >= 1
                assert reply.headers["connection"] == "close"
            text = await s.metrics()
            assert metric(text, "detector_preprocess_duration_seconds_count") == decoded_before  # no work
            assert metric(text, 'detector_rejected_requests_total{reason="overloaded"}') == 1
            route = s.transport.route
            assert metric(text, f'detector_requests_total{{route="{route}",code="503",model="shapes"}}') == 1

    run(go())


@pytest.mark.timing
def test_the_door_holds_a_place_for_each_request_it_lets_in(kind, served_artifact):
    """A burst where one image fits the deadline: the door's reservation lets one request in,
    not all of those that saw an empty queue at once; none of them is answered 504."""

    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes",
                           max_batch_size=1) as s:  # fmt: skip
            model = s.model("shapes")
            model.batcher.times.reset({1: 0.4})
            slow_down(model, 0.4)
            replies = await asyncio.gather(*(s.transport.infer([IMAGE], "shapes", timeout_ms=1000)
                                             for _ in range(8)))  # fmt: skip
            statuses = sorted(r.status for r in replies)
            assert 504 not in statuses, statuses
            assert 1 <= statuses.count(200) <= 2 and statuses.count(503) >= 6, statuses

    run(go())


@pytest.mark.timing
def test_a_deadline_that_passes_is_504_and_stops_the_work(kind, served_artifact):
    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes") as s:
            slow_down(s.model("shapes"), 1.0)
            reply = await s.transport.infer([IMAGE], "shapes", timeout_ms=300)
            assert reply.status == 504 and "300 ms" in reply.message, reply
            text = await s.metrics()
            assert metric(text, 'detector_rejected_requests_total{reason="deadline"}') == 1
            s.model("shapes").runtime.detector = s.model("shapes").runtime.detector._detector
            assert (await s.transport.infer([IMAGE], "shapes")).status == 200  # still serving

    run(go())


# --- Memory -------------------------------------------------------------------------------------


def noise(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of noise: about 3 bytes per pixel, whatever the encoder does."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    return out.getvalue()


@pytest.mark.timing
def test_request_bytes_in_flight_share_one_budget(kind, served_artifact):
    """A request's bytes are held against the one budget until its answer; a request that does
    not fit waits for room, and is refused 503 when its deadline comes first; past the
    request's own limit, 413."""
    big = noise(640, 600)
    assert 1_000_000 < len(big) < 1_400_000

    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes",
                           request_budget_mb=2, max_request_bytes=1_500_000,
                           request_timeout_s=1.0) as s:  # fmt: skip
            budget = s.state.budget
            slow_down(s.model("shapes"), 0.6)
            first = asyncio.ensure_future(s.transport.infer([big], "shapes"))
            await asyncio.sleep(0.3)
            assert len(big) <= budget.used < 2 * len(big)  # held while the request runs
            assert (await first).status == 200
            assert budget.used == 0
            s.model("shapes").runtime.detector = s.model("shapes").runtime.detector._detector
            others = budget.reservation()  # other requests' bytes, in flight
            await others.take(1_500_000)
            refused = await s.transport.infer([big], "shapes")
            assert refused.status == 503 and "SSD_REQUEST_BUDGET_MB" in refused.message, refused
            others.release()
            assert (await s.transport.infer([big], "shapes")).status == 200
            too_big = await s.transport.infer([noise(800, 700)], "shapes")
            assert too_big.status == 413, too_big
            assert budget.used == 0
            text = await s.metrics()
            assert metric(text, 'detector_rejected_requests_total{reason="request_budget"}') == 1
            assert metric(text, 'detector_rejected_requests_total{reason="payload_too_large"}') == 1

    run(go())


# --- Tiled inference ----------------------------------------------------------------------------

WIDE = encode(scene(1280, 720, seed=21))  # 5 x 3 tiles of 320 (20% overlap), plus the whole image


def test_tiling_answers_its_tiles_and_counts_every_input(kind, served_artifact):
    """``tile`` alike on every transport: the tiles listed, each a model input (the queue, the
    images counted, the tiles histogram), an image smaller than one tile not cut, the default
    answer untiled and unchanged, bad values 422 (400 under the OIP) naming the parameter."""

    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes") as s:
            t, name = s.transport, "shapes"
            plain = await t.infer([WIDE], name)
            assert plain.status == 200 and plain.tiles is None
            tiled = await t.infer([WIDE], name, tile="auto")
            assert tiled.status == 200, tiled.message
            rects = tiled.tiles[0]
            assert len(rects) == 15 and all(x1 - x0 == 320 and y1 - y0 == 320 for x0, y0, x1, y1 in rects)
            assert {r[2] for r in rects} >= {1280} and {r[3] for r in rects} >= {720}  # to the edges
            small = await t.infer([IMAGE], name, tile="auto")  # 320x320: one tile is the whole image
            assert small.status == 200 and small.tiles == [[]]
            text = await s.metrics()
            assert metric(text, f'detector_images_total{{model="{name}"}}') == 1 + 16 + 1
            assert metric(text, f'detector_tiles_per_image_count{{model="{name}"}}') == 2
            refusals = [
                ({"tile": "7x7"}, "at least 32"),
                ({"tile": "auto", "tile_overlap": 0.999 + 0.001}, "tile_overlap"),
                ({"tile": "40x40"}, "SSD_MAX_TILES_PER_IMAGE"),
            ]
            for params, words in refusals:
                refused = await t.infer([WIDE], name, **params)
                assert refused.status in (400, 422) and words in refused.message, refused

    run(go())


def test_a_tiled_image_costs_its_tiles_in_admission(kind, served_artifact):
    """16 model inputs do not fit a queue of 8: refused at once, before decoding; untiled, the
    same image fits. tile=auto grows its tiles to stay within SSD_MAX_TILES_PER_IMAGE."""

    async def go():
        async with service(kind, model_path=str(served_artifact), model_name="shapes", max_queue_size=8) as s:
            t, name = s.transport, "shapes"
            assert (await t.infer([WIDE], name)).status == 200
            full = await t.infer([WIDE], name, tile="320x320")
            assert full.status == 503 and "queue" in full.message, full
        async with service(
            kind, model_path=str(served_artifact), model_name="shapes", max_tiles_per_image=4
        ) as s:
            grown = await s.transport.infer([WIDE], "shapes", tile="auto")
            assert grown.status == 200 and 0 < len(grown.tiles[0]) <= 4

    run(go())
