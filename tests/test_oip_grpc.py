"""The Open Inference Protocol over gRPC, in-process (the app's lifespan serves it on a free port):
the committed stubs match the .proto, metadata, inference equal to REST's, typed contents, the
receive limit, errors as status codes, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from live import free_port
from test_oip import INFER, MODEL, binary_request, parse_response
from test_service import CLASSES, encode, metric, run, scene, serving, serving_state, settings

from service.oip.proto import open_inference_grpc_pb2 as pb
from service.oip.proto import open_inference_grpc_pb2_grpc as pb_grpc
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PROTOS = Path("service/oip/proto")
# Each .proto and what is generated from it (the Makefile's `proto` target).
GENERATED = {
    "open_inference_grpc": ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"),
    "model_config": ("_pb2.py", "_pb2.pyi"),
    "triton_repository": ("_pb2.py", "_pb2.pyi"),
}


@pytest.mark.parametrize("proto", list(GENERATED))
def test_the_committed_stubs_are_generated_from_the_committed_proto(tmp_path, proto):
    target = tmp_path / "out"
    (target / PROTOS).mkdir(parents=True)
    grpc_out = [f"--grpc_python_out={target}"] if "_pb2_grpc.py" in GENERATED[proto] else []
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={target}",
         f"--pyi_out={target}", *grpc_out, str(PROTOS / f"{proto}.proto")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for suffix in GENERATED[proto]:
        name = proto + suffix
        fresh = (target / PROTOS / name).read_text()
        assert fresh == (ROOT / PROTOS / name).read_text(), f"{name} is stale: run make proto"


def infer_request(images=(), pixels=None, **parameters) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id="g-1")
    if pixels is not None:
        request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
        request.raw_input_contents.append(pixels.tobytes())
    else:
        request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in images))
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[
            type(value)
        ]
        setattr(request.parameters[key], field, value)
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    types = {"INT64": np.int64, "FP32": np.float32}
    return {
        o.name: np.frombuffer(raw, types[o.datatype]).reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def with_grpc(artifact, check, **overrides):
    """Run ``check(client, stub)`` against an app serving ``artifact``, with gRPC on a free port."""
    port = free_port()

    async def go():
        config = settings(artifact, grpc_port=port, **overrides)
        async with serving(config) as client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await check(client, pb_grpc.GRPCInferenceServiceStub(channel))

    run(go())


def test_health_and_metadata(served_artifact):
    async def check(client, stub):
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server.name == "ssd-detector" and "binary_tensor_data" in server.extensions
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="1"))
        assert meta.name == MODEL and list(meta.versions) == ["1"]
        assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
            ("images", "BYTES", [-1]), ("pixels", "UINT8", [-1, 320, 320, 3])
        ]  # fmt: skip
        assert json.loads(meta.properties["classes"]) == CLASSES
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        text = (await client.get("/metrics")).text
        assert metric(text, 'detector_requests_total{code="200",route="ModelMetadata"}') == 1
        assert metric(text, 'detector_requests_total{code="404",route="ModelMetadata"}') == 1

    with_grpc(served_artifact, check)


def test_tritons_model_config_and_repository_index_on_both_transports(served_artifact, tmp_path):
    """Triton's two methods beyond the protocol's six, from its own messages: the model
    configuration (class names in its parameters) and the repository index (a refused file with
    its reason; ``ready`` lists the ready ones alone), the same over REST and gRPC."""
    from google.protobuf import json_format

    from service.oip.proto import triton_repository_pb2 as triton

    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(served_artifact, folder / "shapes.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")

    port = free_port()

    async def go():
        config = Settings(providers=["cpu"], intra_op_threads=2, grpc_port=port, model_dir=str(folder))
        async with serving(config) as client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await check(client, channel)

    async def check(client, channel):
        def method(name, request, response):
            path = f"/inference.GRPCInferenceService/{name}"
            return channel.unary_unary(path, request.SerializeToString, response.FromString)

        config = method("ModelConfig", triton.ModelConfigRequest, triton.ModelConfigResponse)
        index = method("RepositoryIndex", triton.RepositoryIndexRequest, triton.RepositoryIndexResponse)
        over_grpc = json_format.MessageToDict(
            (await config(triton.ModelConfigRequest(name="shapes"))).config, preserving_proto_field_name=True
        )
        over_rest = (await client.get("/v2/models/shapes/config")).json()
        assert json.loads(over_rest["parameters"]["classes"]["string_value"]) == CLASSES
        assert over_grpc["parameters"] == over_rest["parameters"]
        assert over_grpc["input"][1]["dims"] == ["320", "320", "3"] and over_rest["input"][1]["dims"] == [
            320,
            320,
            3,
        ]
        assert over_grpc["input"][0]["reshape"] == {} and over_rest["input"][0]["reshape"] == {"shape": []}
        assert (await client.get("/v2/models/shapes/versions/1/config")).json() == over_rest
        assert (await client.get("/v2/models/nope/config")).status_code == 404
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await config(triton.ModelConfigRequest(name="broken"))
        assert (
            caught.value.code() == grpc.StatusCode.UNAVAILABLE
            and "INVALID_PROTOBUF" in caught.value.details()
        )

        everything = json_format.MessageToDict(await index(triton.RepositoryIndexRequest()))["models"]
        assert everything == (await client.post("/v2/repository/index")).json()
        (broken,) = [m for m in everything if m["name"] == "broken"]
        assert broken["state"] == "UNAVAILABLE" and "INVALID_PROTOBUF" in broken["reason"]
        ready = json_format.MessageToDict(await index(triton.RepositoryIndexRequest(ready=True)))["models"]
        assert ready == [{"name": "shapes", "version": "1", "state": "READY"}]
        assert (await client.post("/v2/repository/index", json={"ready": True})).json() == ready
        assert (await client.post("/v2/repository/index", content=b"{")).status_code == 400
        assert (await client.post("/v2/repository/index", content=b" " * 5000)).status_code == 413

    run(go())


def test_draining_is_not_ready_on_every_readiness_route_while_serving(served_artifact):
    """Readiness has one source (State.not_ready): while draining, /readyz, /v2/health/ready,
    gRPC ServerReady and the detector_ready gauge all say not ready, and inference still serves."""

    port = free_port()

    async def go():
        config = settings(served_artifact, grpc_port=port)
        async with (
            serving_state(config) as (client, state),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            await check(client, pb_grpc.GRPCInferenceServiceStub(channel), state)

    async def check(client, stub, state):
        assert (await client.get("/readyz")).status_code == 200
        state.draining = True
        readyz = await client.get("/readyz")
        assert readyz.status_code == 503 and "draining" in readyz.json()["error"]["message"]
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert metric((await client.get("/metrics")).text, "detector_ready") == 0
        response = await client.post(
            "/detect", content=encode(scene(seed=3)), headers={"Content-Type": "image/jpeg"}
        )
        assert response.status_code == 200
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready  # the model is

    run(go())


def test_inference_equals_rest(served_artifact):
    images = [encode(scene(640, 480, seed=21)), encode(scene(400, 300, seed=22), "PNG")]
    parameters = {"score_threshold": 0.25, "max_detections": 25, "classes": "circle,star,hexagon"}

    async def check(client, stub):
        body, headers = binary_request([("images", "BYTES", [2], images)], parameters=parameters)
        _, rest = parse_response(await client.post(INFER, content=body, headers=headers))
        response = await stub.ModelInfer(infer_request(images, **parameters))
        assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "g-1")
        got = outputs(response)
        assert list(got) == ["num_detections", "boxes", "scores", "labels"]
        for name in got:
            np.testing.assert_array_equal(got[name], rest[name])
        assert got["num_detections"].min() > 0
        # Named outputs only, in the order asked.
        request = infer_request(images[:1], **parameters)
        request.outputs.add(name="scores")
        request.outputs.add(name="num_detections")
        response = await stub.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["scores", "num_detections"]

    with_grpc(served_artifact, check)


def test_typed_contents_and_the_receive_limit(served_artifact):
    pixels = np.stack([np.asarray(scene(320, 320, seed=s).convert("RGB")) for s in range(16)])

    async def check(client, stub):
        # 16 images of pixels are 4.9 MB: past gRPC's default 4 MB receive limit.
        raw = outputs(await stub.ModelInfer(infer_request(pixels=pixels)))
        assert raw["num_detections"].shape == (16,)
        typed = pb.ModelInferRequest(model_name=MODEL)
        tensor = typed.inputs.add(name="pixels", datatype="UINT8", shape=[1, 320, 320, 3])
        tensor.contents.uint_contents.extend(pixels[0].reshape(-1).tolist())
        got = outputs(await stub.ModelInfer(typed))
        np.testing.assert_array_equal(got["scores"][0], raw["scores"][0])

    with_grpc(served_artifact, check)


@pytest.mark.parametrize(
    ("request_of", "code", "words"),
    [
        (lambda: infer_request([b"not an image"]), grpc.StatusCode.INVALID_ARGUMENT, "images[0]"),
        (lambda: infer_request([b"%!PS-Adobe-3.0 EPSF-3.0\n"]), grpc.StatusCode.INVALID_ARGUMENT, "EPS"),
        (lambda: infer_request([b"x"] * 17), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 16"),
        (lambda: infer_request([b"x"], classes="unicorn"), grpc.StatusCode.INVALID_ARGUMENT, "unknown names"),
        (lambda: infer_request([b"x"], max_detections="ten"), grpc.StatusCode.INVALID_ARGUMENT, "integer"),
        (lambda: pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda: pb.ModelInferRequest(model_name=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "one input"),
    ],
)
def test_errors_are_status_codes(served_artifact, request_of, code, words):
    async def check(client, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(request_of())
        assert caught.value.code() == code and words in caught.value.details(), caught.value.details()
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready

    with_grpc(served_artifact, check)


@pytest.mark.timing
def test_deadlines_and_cancellation_stop_the_work(served_artifact):
    image = encode(scene(seed=23))

    async def check(client, stub):
        for call in (
            lambda: stub.ModelInfer(infer_request([image], timeout=1)),  # Triton's timeout: 1 µs
            lambda: stub.ModelInfer(infer_request([image]), timeout=0.0005),  # the gRPC deadline
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        # A client that cancels: its images never reach a batch once it has gone.
        before = metric((await client.get("/metrics")).text, "detector_images_total")
        calls = [stub.ModelInfer(infer_request([image] * 16)) for _ in range(4)]
        await asyncio.sleep(0.01)
        for c in calls:
            c.cancel()
        for c in calls:
            with pytest.raises(asyncio.CancelledError):
                await c
        await asyncio.sleep(1.0)
        after = metric((await client.get("/metrics")).text, "detector_images_total")
        assert after - before < 64  # dropped before inference, not all run
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready

    with_grpc(served_artifact, check)


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_two_concurrent_largest_messages_stay_within_the_memory_bound(tmp_path):
    """Two ModelInfer calls at once, each as large as a message may be (SSD_MAX_REQUEST_BYTES of
    BYTES elements of random data): the server's peak resident memory rises by at most 600 MB,
    and 5 s after both are answered it is back within 100 MB of where it started."""
    from live import live_server

    from service.settings import Settings

    port = free_port()
    limit = Settings().max_request_bytes
    element = limit // 16 - 64
    rng = np.random.default_rng(0)
    request = pb.ModelInferRequest(model_name="ssdlite320_mobilenet_v3_large")
    request.inputs.add(name="images", datatype="BYTES", shape=[16])
    request.raw_input_contents.append(
        b"".join(element.to_bytes(4, "little") + rng.bytes(element) for _ in range(16))
    )
    assert limit - 4096 < request.ByteSize() <= limit

    with live_server(tmp_path, {"SSD_GRPC_PORT": str(port)}) as live:
        pid = live.process.pid
        start = _rss_mb(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) from now on

        async def twice() -> list[grpc.StatusCode]:
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)

                async def one() -> grpc.StatusCode:
                    try:
                        await stub.ModelInfer(request, timeout=60)
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()
                    return grpc.StatusCode.OK

                return list(await asyncio.gather(one(), one()))

        codes = asyncio.run(twice())
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2  # random bytes: no image, 400
        peak = _rss_mb(pid, "VmHWM")
        time.sleep(5)
        after = _rss_mb(pid)
        assert peak - start <= 600, (start, peak, after)
        assert after - start <= 100, (start, peak, after)
