"""The Open Inference Protocol over REST (KServe v2, as Triton and KServe speak it), with Triton's
binary tensor data extension, so that ``tritonclient.http`` and KServe's clients work unmodified.

A request body is a JSON header, then (binary extension) the raw bytes of the inputs that say
``binary_data_size``, in order; ``Inference-Header-Content-Length`` gives the header's length.
A BYTES element's raw form is a 4-byte little-endian length, then its bytes. In the JSON form a
BYTES element is a string, which an encoded image cannot be: here it is read as base64.

An output is binary when it asks (``parameters.binary_data``) or, when it does not, when the
request's ``binary_data_output`` parameter is true (what ``tritonclient`` sends when it names no
outputs); otherwise JSON. A request may be compressed (``Content-Encoding: gzip`` or ``deflate``,
tritonclient's ``request_compression_algorithm``), inflated within the same limits; the answer
is compressed when ``Accept-Encoding`` asks.

Bounds, before work starts: the JSON header at most ``JSON_LIMIT`` bytes (a JSON UINT8 image of
320x320 is about 1 MB of text; larger pixel batches travel as binary), the binary part at most
what ``SSD_MAX_IMAGES_PER_REQUEST`` images of ``SSD_MAX_IMAGE_BYTES`` (or of the model's pixels)
take.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import zlib
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Scope

from .. import schema
from ..dependencies import StateDep, served
from ..door import Head
from ..endpoints import Endpoint
from ..errors import APIError
from ..pipeline import Call, not_ready
from ..settings import Settings
from ..uploads import Body, read_raw, until_disconnect
from .protocol import (
    DATATYPES,
    OUTPUT_TYPES,
    Tensor,
    bad,
    check_outputs,
    element_count,
    from_raw,
    model_config,
    model_metadata,
    repository_index,
    run,
    server_metadata,
)

HEADER_LENGTH = "inference-header-content-length"
JSON_LIMIT = 16 * 1024 * 1024
EXTENSIONS = ("binary_tensor_data", "parameters")

router = APIRouter(prefix="/v2")
NAME_CHARS = 128
Name = Annotated[str, Path(max_length=NAME_CHARS)]


INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


def head(scope: Scope) -> Head | None:
    """The door's reading of an inference request (None for other paths): the model and version
    from the path; its ``timeout_ms`` travels in the body, so the door keeps the longest."""
    found = INFER.match(scope["path"])
    if found is None:
        return None
    name, version = found.groups()
    return Head(ROUTES[version is not None], name, version)


def body_limit(settings: Settings, pixels: int) -> int:
    """The largest request: the JSON part, and the larger of the encoded images' and the
    pixels' binary data (``pixels``: bytes of one image at the model's input size), within the
    request's own limit (SSD_MAX_REQUEST_BYTES)."""
    images = settings.max_images_per_request
    most = JSON_LIMIT + max(images * (settings.max_image_bytes + 4), images * pixels)
    return min(most, settings.max_request_bytes)


async def _body(request: Request, limit: int, held: Body) -> bytes:
    """The body, inflated if it says so, never past ``limit`` bytes either way."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return await read_raw(request, limit, held)
    if encoding not in ("gzip", "deflate"):
        raise APIError(415, f"Content-Encoding {encoding!r}: gzip, deflate or none", "unsupported_media_type")
    raw = await read_raw(request, limit, held)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise bad(f"the {encoding} body is corrupt: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise APIError(413, f"the body inflates past the limit of {limit} bytes", "payload_too_large")
    await held.reservation.take(len(data), held.due)  # the inflated copy is held too
    return data


def _parse_header(body: bytes, length: str | None) -> tuple[dict[str, Any], memoryview]:
    if length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if not length.isdigit() or int(length) > len(body):
            raise bad(f"Inference-Header-Content-Length {length!r} does not fit a body of {len(body)} bytes")
        header_bytes, binary = body[: int(length)], memoryview(body)[int(length) :]
    if len(header_bytes) > JSON_LIMIT:
        raise APIError(
            413,
            f"the JSON part is {len(header_bytes)} bytes; the limit is {JSON_LIMIT} "
            "(send tensors as binary data)",
            "payload_too_large",
        )
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("the request must be a JSON object")
    return header, binary


def _tensor(spec: Any, binary: memoryview, at: int) -> tuple[Tensor, int]:
    """One input from its JSON (and its binary data at ``at``): the tensor and the next offset."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad("each input is an object with a name, a datatype, a shape and data")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise bad(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list):
        raise bad(f"input {name!r}: shape must be a list")
    count = element_count(shape)
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or at + size > len(binary):
            raise bad(f"input {name!r}: binary_data_size {size!r} does not fit the binary data")
        return from_raw(name, datatype, shape, binary[at : at + size]), at + size
    if "data" not in spec:
        raise bad(f"input {name!r} has neither data nor binary_data_size")
    data = spec["data"]
    if datatype == "BYTES":
        flat = _flatten(data, name)
        try:  # an encoded image cannot be a JSON string: base64 stands in for its bytes
            elements = [base64.b64decode(e, validate=True) for e in flat]
        except (binascii.Error, TypeError, ValueError):
            raise bad(
                f"input {name!r}: BYTES elements in JSON are base64 strings (or send binary data)"
            ) from None
        return Tensor(name, datatype, shape, elements), at
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad(f"input {name!r}: data is not {datatype} of shape {shape}: {exc}") from None
    if array.size != count:
        raise bad(f"input {name!r}: shape {shape} but {array.size} elements")
    return Tensor(name, datatype, shape, array.reshape(-1)), at


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise bad(f"input {name!r}: data must be a list")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested list cannot exhaust the stack
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _inputs(header: dict[str, Any], binary: memoryview) -> list[Tensor]:
    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise bad("the request has no inputs")
    tensors, at = [], 0
    for spec in specs:
        tensor, at = _tensor(spec, binary, at)
        tensors.append(tensor)
    if at != len(binary):
        raise bad(f"{len(binary) - at} bytes of binary data belong to no input")
    return tensors


def _wanted(header: dict[str, Any], parameters: dict[str, Any]) -> list[tuple[str, bool]]:
    """The outputs to answer, each with whether it goes as binary data."""
    default = parameters.get("binary_data_output") is True
    specs = header.get("outputs")
    if specs is None:
        return [(name, default) for name in check_outputs(None)]
    if not isinstance(specs, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs
    ):
        raise bad("outputs must be a list of objects with a name")
    names = check_outputs([s["name"] for s in specs])
    flags = {}
    for spec in specs:
        flag = (
            (spec.get("parameters") or {}).get("binary_data")
            if isinstance(spec.get("parameters"), dict)
            else None
        )
        flags[spec["name"]] = default if flag is None else bool(flag)
    return [(name, flags[name]) for name in names]


def _response(
    model_name: str,
    version: int,
    request_id: Any,
    outputs: dict[str, np.ndarray],
    wanted: list[tuple[str, bool]],
    parameters: dict[str, str] | None = None,
) -> tuple[bytes, int | None]:
    """The answer's bytes, and the JSON header's length when binary data follows it."""
    described, blobs = [], []
    for name, binary in wanted:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": OUTPUT_TYPES[name], "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": str(version), "outputs": described}
    if isinstance(request_id, str) and request_id:
        answer["id"] = request_id
    if parameters:
        answer["parameters"] = parameters
    head = json.dumps(answer, separators=(",", ":")).encode()
    return head + b"".join(blobs), (len(head) if blobs else None)


def _compressed(request: Request, body: bytes, headers: dict[str, str]) -> bytes:
    accepted = {
        e.split(";")[0].strip().lower() for e in request.headers.get("accept-encoding", "").split(",")
    }
    if "gzip" in accepted:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body, 1)
    if "deflate" in accepted:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(body, 1)
    return body


# --- Routes ----------------------------------------------------------------------------------


@router.get("")
@router.get("/", include_in_schema=False)  # the OIP's own spelling; tritonclient asks for /v2
async def server_info() -> dict[str, Any]:
    return server_metadata(EXTENSIONS)


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(state: StateDep) -> JSONResponse:
    ok = state.not_ready() is None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def metadata(state: StateDep, name: Name, version: str | None = None) -> dict[str, Any]:
    return model_metadata(state, served(state, name, version))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(state: StateDep, name: Name, version: str | None = None) -> JSONResponse:
    model = served(state, name, version)
    if not model.ready:
        raise not_ready(model.why_not_ready())
    return JSONResponse({"name": model.name, "ready": True})


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def config(state: StateDep, name: Name, version: str | None = None) -> dict[str, Any]:
    """Triton's model configuration of a model (``protocol.model_config``)."""
    return model_config(state, served(state, name, version))


INDEX_BODY_LIMIT = 4096


@router.post("/repository/index")
async def index(request: Request, state: StateDep) -> list[dict[str, Any]]:
    """Triton's repository index (read-only); the body, if any, may ask ``{"ready": true}``."""
    body = b""
    async for chunk in request.stream():  # a few bytes at most: read no more than that
        body += chunk
        if len(body) > INDEX_BODY_LIMIT:
            raise APIError(
                413,
                f"a repository index request's body is at most {INDEX_BODY_LIMIT} bytes",
                "payload_too_large",
            )
    ready = False
    if body.strip():
        try:
            asked = json.loads(body)
        except ValueError:
            raise bad("the repository index request's body is not JSON") from None
        ready = asked.get("ready", False) if isinstance(asked, dict) else None
        if not isinstance(ready, bool):
            raise bad('the repository index request\'s body: {"ready": true or false} is all it takes')
    return repository_index(state, ready)


async def handle(request: Request, call: Call, head: Head) -> Response:
    """``POST /v2/models/{name}[/versions/{version}]/infer``, answered below FastAPI
    (service/endpoints.py); ``head``: the model and version its path names."""
    name, version = head.model or "", head.version
    if len(name) > NAME_CHARS:
        raise bad(f"name: at most {NAME_CHARS} characters")
    call.resolve(name, version)
    height, width = call.info.input_size
    limit = body_limit(call.state.settings, height * width * 3)
    call.bytes = call.bytes or call.state.budget.reservation()
    body = await _body(request, limit, Body(call.bytes, call.longest_due()))
    header, binary = _parse_header(body, request.headers.get(HEADER_LENGTH))
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("parameters must be an object")
    wanted = _wanted(header, parameters)
    inputs = _inputs(header, binary)
    del body, binary
    inferred = await run(call, inputs, parameters, lambda: until_disconnect(request))
    model = call.model
    assert model is not None
    content, head_length = _response(
        model.name, model.version, header.get("id"), inferred.outputs, wanted, inferred.parameters()
    )
    headers: dict[str, str] = {}
    if head_length is not None:
        headers["Inference-Header-Content-Length"] = str(head_length)
    content = _compressed(request, content, headers)
    media = "application/octet-stream" if head_length is not None else "application/json"
    return Response(content, media_type=media, headers=headers)


ENDPOINT = Endpoint(head, handle)


_INFER = {
    "summary": "Inference",
    "description": schema.INFER,
    "responses": schema.errors(400, 404, 413, 415, 503, 504, model=schema.ProtocolError),
    "openapi_extra": schema.INFER_BODY,
}


@router.post("/models/{name}/infer", **_INFER)
@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer(name: Name, version: str | None = None) -> None:
    """Inference (the Open Inference Protocol's request; the module docstring).

    FastAPI's declaration of the route for the OpenAPI schema; a POST is answered by ``handle``.
    """
    raise AssertionError("an OIP inference is answered by service.oip.rest.handle")
