"""The servers the serving benchmarks compare, ours included: how to start each, how to ask it.

Every peer serves the same ONNX artifact through the same ``service.artifact.Detector`` (CPU
provider, the same intra-op threads, spinning off), decodes with the same
``service.images.decode`` and formats detections with the same ``Detections.to_json`` and the
same settings (``SSD_SCORE_THRESHOLD``, ...): only the serving framework differs (HTTP stack,
batching, scheduling). The load generator sends ``request(...)`` bytes over raw keep-alive
sockets, so no client library stands between it and a server.

- ``ours``: ``ssd serve`` (FastAPI + uvicorn, our batcher), ``POST /detect`` with the JPEG as body.
- ``bentoml``: ``bench/peers/bentoml_service.py``, BentoML adaptive batching, same request.
- ``pytriton``: ``bench/peers/pytriton_server.py``, NVIDIA PyTriton (Triton's dynamic batcher),
  KServe v2 binary-tensor requests; see that module for why it may be unavailable.

BentoML and PyTriton are in the optional ``peers`` dependency group, never in the serving install:
``unavailable()`` says why a peer cannot run here (None when it can), and nothing here imports them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

Command = tuple[list[str], dict[str, str]]


class PeerUnavailable(RuntimeError):
    """This peer cannot run on this machine or in this install; the message says why."""


@dataclass(frozen=True)
class Peer:
    name: str  # "ours", "bentoml", "pytriton"
    ready_path: str  # GET path that answers 200 once the server takes requests
    # (artifact, port, max_batch, max_delay_ms, threads) -> (argv, extra env); cwd = repo root.
    _command: Callable[[Path, int, int, float, int], Command] = field(repr=False)
    # (jpeg bytes, port) -> one complete HTTP/1.1 keep-alive request
    _request: Callable[[bytes, int], bytes] = field(repr=False)
    # JSON of a 200 answer -> the image's detection objects (KeyError/TypeError/... if malformed)
    _parse: Callable[[object], list] = field(repr=False)
    _unavailable: Callable[[], str | None] = field(default=lambda: None, repr=False)
    notes: str = ""  # how the common settings map onto this server, and what differs
    # The gRPC method ``request`` bytes are for (a serialized message), sent to the server's
    # gRPC port; None: they are complete HTTP/1.1 requests.
    grpc_method: str | None = None
    raw_answer: bool = False  # ``_parse`` takes the answer's bytes (binary tensors), not its JSON

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None when it can."""
        return self._unavailable()

    def command(
        self, artifact: Path, port: int, max_batch: int, max_delay_ms: float, threads: int
    ) -> Command:
        """argv and the extra environment that start it as a subprocess (cwd = the repo root), on
        127.0.0.1:``port``. Start it in a new session and stop it with SIGTERM to that process
        group. Some start more processes: BentoML's worker gets a process group of its own (its
        arbiter stops it on SIGTERM), so count memory over the process tree, not the group."""
        reason = self.unavailable()
        if reason:
            raise PeerUnavailable(f"{self.name}: {reason}")
        return self._command(Path(artifact), port, max_batch, max_delay_ms, threads)

    def request(self, image: bytes, port: int) -> bytes:
        """The complete raw HTTP/1.1 request (keep-alive) asking for the detections of one JPEG."""
        return self._request(image, port)

    def detections(self, status: int, body: bytes) -> int:
        """The number of detections in an answer; ValueError unless it is a well-formed 200."""
        return len(self.found(status, body))

    def found(self, status: int, body: bytes) -> list[dict]:
        """The detection objects of an answer (ours: label, class_id, score, box in pixels)."""
        if status != 200:
            raise ValueError(f"{self.name}: status {status}: {body[:300]!r}")
        try:
            found = self._parse(body if self.raw_answer else json.loads(body))
            if not isinstance(found, list) or not all(isinstance(d, dict) and "box" in d for d in found):
                raise TypeError("detections are not a list of objects with boxes")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{self.name}: malformed answer ({exc}): {body[:300]!r}") from exc
        return found


def _http(path: str, port: int, content_type: str, body: bytes, headers: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    )
    return head.encode("ascii") + body


def _ssd_env(threads: int, max_batch: int, max_delay_ms: float) -> dict[str, str]:
    """The service's own settings (service/settings.py): the peers read the same ones."""
    return {
        "SSD_PROVIDERS": "cpu",
        "SSD_INTRA_OP_THREADS": str(threads),
        "SSD_MAX_BATCH_SIZE": str(max_batch),
        "SSD_MAX_QUEUE_DELAY_MS": str(max_delay_ms),
    }


# --- ours ---------------------------------------------------------------------------------------


def _ours_command(artifact: Path, port: int, max_batch: int, max_delay_ms: float, threads: int) -> Command:
    argv = [sys.executable, "-m", "cli", "serve", "--model", str(artifact), "--port", str(port)]
    # A queue of 256 images (the default): the load, not admission, decides (the peers have no
    # such bound); `ssd bench overload` and `soak` measure admission with every default.
    # No drain when the benchmark stops it (SIGTERM): no load balancer to wait for.
    env = {"SSD_MAX_QUEUE_SIZE": "256", "SSD_DRAIN_S": "0"}
    return argv, {**_ssd_env(threads, max_batch, max_delay_ms), **env}


def _ours_request(image: bytes, port: int) -> bytes:
    return _http("/detect", port, "image/jpeg", image)


OIP_MODEL = "detector"  # SSD_MODEL_NAME of ours when asked through the Open Inference Protocol


def _ours_oip_command(
    artifact: Path, port: int, max_batch: int, max_delay_ms: float, threads: int
) -> Command:
    argv, env = _ours_command(artifact, port, max_batch, max_delay_ms, threads)
    return argv, {**env, "SSD_MODEL_NAME": OIP_MODEL}


def _oip_header(image: bytes, binary_outputs: bool) -> bytes:
    """What tritonclient sends by default: the image as a binary BYTES [1] tensor, no outputs
    named, ``binary_data_output`` (every output as binary data)."""
    return json.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": len(image) + 4}}
            ],
            "parameters": {"binary_data_output": binary_outputs},
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


def _ours_oip_rest_request(image: bytes, port: int) -> bytes:
    header = _oip_header(image, binary_outputs=True)
    body = header + len(image).to_bytes(4, "little") + image
    return _http(
        f"/v2/models/{OIP_MODEL}/infer",
        port,
        "application/octet-stream",
        body,
        f"Inference-Header-Content-Length: {len(header)}\r\n",
    )


def _ours_oip_grpc_request(image: bytes, port: int) -> bytes:
    from service.oip.proto import open_inference_grpc_pb2 as pb

    request = pb.ModelInferRequest(model_name=OIP_MODEL)
    request.inputs.add(name="images", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    return request.SerializeToString()


def _ours_oip_parse(answer: object) -> list:
    """The OIP's binary tensors as detection objects (boxes only: what the smoke check needs).
    The JSON header's length is where the JSON ends (the answer's header says it too)."""
    import numpy as np

    raw = bytes(answer)  # type: ignore[arg-type]
    head, end = json.JSONDecoder().raw_decode(raw.decode("latin-1"))
    arrays, at = {}, end
    for output in head["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = np.int64 if output["datatype"] == "INT64" else np.float32
        arrays[output["name"]] = np.frombuffer(raw[at : at + size], dtype).reshape(output["shape"])
        at += size
    count = int(arrays["num_detections"][0])
    return [{"box": box.tolist()} for box in arrays["boxes"][0, :count]]


def _ours_parse(answer: object) -> list:
    (result,) = answer["results"]  # type: ignore[index]
    return result["detections"]


# --- BentoML ------------------------------------------------------------------------------------


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed: it is in the optional peers group (uv sync --group peers)"
    return None


def _bentoml_command(artifact: Path, port: int, max_batch: int, max_delay_ms: float, threads: int) -> Command:
    # `bentoml serve` (the CLI beside this Python) runs an arbiter process and one worker.
    cli = Path(sys.executable).with_name("bentoml")
    argv = [str(cli) if cli.exists() else (shutil.which("bentoml") or "bentoml"), "serve"]
    argv += ["bench.peers.bentoml_service:Detect", "--host", "127.0.0.1", "--port", str(port)]
    env = {
        **_ssd_env(threads, max_batch, max_delay_ms),
        "SSD_MODEL_PATH": str(artifact.resolve()),
        "BENTOML_DO_NOT_TRACK": "True",  # no usage reports (and no network here anyway)
    }
    return argv, env


def _bentoml_parse(answer: object) -> list:
    # A batchable BentoML API answers each request with its slice of the batch's list: [ours].
    (one,) = answer  # type: ignore[misc]
    return _ours_parse(one)


# --- PyTriton -----------------------------------------------------------------------------------

TRITON_MODEL = "ssd"


def _pytriton_python() -> str:
    """PyTriton runs from an environment of its own (see pytriton_server.py): SSD_PYTRITON_PYTHON,
    else .venv/pytriton/bin/python when made, else this Python (which cannot import it)."""
    from bench.peers import pytriton_server  # imports no pytriton: only its paths and checks

    return pytriton_server.default_python()


def _pytriton_unavailable() -> str | None:
    from bench.peers import pytriton_server

    return pytriton_server.unavailable(_pytriton_python())


def _pytriton_command(
    artifact: Path, port: int, max_batch: int, max_delay_ms: float, threads: int
) -> Command:
    argv = [_pytriton_python(), "-m", "bench.peers.pytriton_server", "--artifact", str(artifact)]
    argv += ["--port", str(port), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
    argv += ["--threads", str(threads)]
    return argv, {**_ssd_env(threads, max_batch, max_delay_ms), "PYTHONPATH": str(ROOT)}


def _pytriton_request(image: bytes, port: int) -> bytes:
    """KServe v2 with Triton's binary tensor extension: a JSON header, then the BYTES tensor raw
    (each element: 4-byte little-endian length, then its bytes), so no base64 on either side."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(image) + 4},
                }
            ],
            "outputs": [{"name": "result", "parameters": {"binary_data": False}}],
        },
        separators=(",", ":"),
    ).encode()
    body = header + len(image).to_bytes(4, "little") + image
    return _http(
        f"/v2/models/{TRITON_MODEL}/infer",
        port,
        "application/octet-stream",
        body,
        f"Inference-Header-Content-Length: {len(header)}\r\n",
    )


def _pytriton_parse(answer: object) -> list:
    # The output "result" is a BYTES tensor [1, 1] holding our JSON for the image.
    (output,) = (o for o in answer["outputs"] if o["name"] == "result")  # type: ignore[index]
    (text,) = output["data"]
    return _ours_parse(json.loads(text))


PEERS: dict[str, Peer] = {
    "ours": Peer(
        "ours",
        "/readyz",
        _ours_command,
        _ours_request,
        _ours_parse,
        notes="FastAPI + uvicorn, one process; decodes each request in a thread pool as it arrives, "
        "batches images (max_batch, max_delay_ms) for one inference thread.",
    ),
    # Ours again, asked through the Open Inference Protocol (`ssd bench serve --protocol`).
    "ours-oip-rest": Peer(
        "ours-oip-rest",
        "/readyz",
        _ours_oip_command,
        _ours_oip_rest_request,
        _ours_oip_parse,
        notes="ours; POST /v2/models/detector/infer, the JPEG as a binary BYTES tensor, every output "
        "as binary data (tritonclient's defaults).",
        raw_answer=True,
    ),
    "ours-oip-grpc": Peer(
        "ours-oip-grpc",
        "/readyz",
        _ours_oip_command,
        _ours_oip_grpc_request,
        _ours_oip_parse,
        notes="ours; gRPC ModelInfer, the JPEG in raw_input_contents, one channel per client.",
        grpc_method="/inference.GRPCInferenceService/ModelInfer",
    ),
    "bentoml": Peer(
        "bentoml",
        "/readyz",
        _bentoml_command,
        _ours_request,  # the same request: POST /detect, the JPEG as the raw body
        _bentoml_parse,
        lambda: _missing("bentoml"),
        notes="BentoML adaptive batching (CorkDispatcher), one worker process beside its arbiter; "
        "max_delay_ms has no BentoML counterpart (its wait adapts; max_latency_ms is a deadline, set "
        "to SSD_REQUEST_TIMEOUT_S); decoding runs inside the batched call. See bentoml_service.py.",
    ),
    "pytriton": Peer(
        "pytriton",
        # Not /v2/health/ready: PyTriton starts Triton, then loads the model, and Triton says it is
        # ready (all loaded models ready) before the model is there; this one waits for the model.
        f"/v2/models/{TRITON_MODEL}/ready",
        _pytriton_command,
        _pytriton_request,
        _pytriton_parse,
        _pytriton_unavailable,
        notes="NVIDIA PyTriton: Triton's dynamic batcher (max_batch, max_queue_delay = max_delay_ms) "
        "in front of one Python model; decoding inside the infer function. See pytriton_server.py.",
    ),
}
