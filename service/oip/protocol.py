"""The Open Inference Protocol's meaning for this service, whatever carries it (REST or gRPC):
metadata, the inputs and parameters an inference takes, the outputs it answers.

- Inputs, one per request: ``images`` (BYTES [B], or [B, 1] as Triton's clients shape a batch of
  one-element rows), encoded images decoded exactly as ``/detect`` decodes them; or ``pixels``
  (UINT8 [B, H, W, 3], RGB at the model's input size).
- Parameters: ``score_threshold``, ``max_detections``, ``classes`` (a list of names, or one
  comma-separated string), ``timeout_ms``, and Triton's ``timeout`` (microseconds); with both,
  the earlier deadline holds. Other parameters (Triton's ``priority``, ``sequence_id``, ...) are
  accepted and have no effect.
- Outputs: ``num_detections`` INT64 [B], ``boxes`` FP32 [B, K, 4] (pixels of each original image),
  ``scores`` FP32 [B, K], ``labels`` INT64 [B, K] (class ids), K the request's ``max_detections``,
  padded with label -1 and score 0. The same detections as ``/detect`` answers.

Errors are ``APIError`` with HTTP statuses; a 422 of the shared code (a bad parameter) is the
protocol's 400 (``oip_status``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import APIError
from ..pipeline import Call, Query, not_ready
from ..repository import ServedModel
from ..state import State
from ..tiling import Tiling

OUTPUTS = ("num_detections", "boxes", "scores", "labels")
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
OUTPUT_TYPES = {"num_detections": "INT64", "boxes": "FP32", "scores": "FP32", "labels": "INT64"}
SERVER_NAME = "ssd-detector"
PLATFORM = "onnxruntime_onnx"


def bad(message: str) -> APIError:
    return APIError(400, message, "bad_request")


def oip_status(status: int) -> int:
    """The protocol's status for one of ours: a bad parameter (422 on /detect) is its 400."""
    return 400 if status == 422 else status


@dataclass
class Tensor:
    """An input as it arrived: BYTES as a list of byte strings, anything else as an array."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


def element_count(shape: Sequence[int]) -> int:
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise bad(f"shape {list(shape)}: dimensions must be non-negative integers")
    return math.prod(shape)


def split_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    """A BYTES tensor's binary form (each element a 4-byte little-endian length, then its bytes)."""
    view = memoryview(raw)
    out, at = [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise bad(f"input {name!r}: BYTES data ends inside an element's length")
        size = int.from_bytes(view[at : at + 4], "little")
        at += 4
        if at + size > len(view):
            raise bad(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        out.append(bytes(view[at : at + size]))
        at += size
    return out


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> Tensor:
    """An input from its raw form (REST's binary data, gRPC's raw_input_contents): little-endian,
    row-major, BYTES elements length-prefixed."""
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise bad(f"input {name!r}: unknown datatype {datatype!r}")
    count = element_count(shape)
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, split_bytes(raw, name))
    dtype = DATATYPES[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise bad(f"input {name!r}: {len(raw)} bytes is not {datatype} of shape {shape}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype).astype(dtype.newbyteorder("=")))


# --- Metadata --------------------------------------------------------------------------------


def server_metadata(extensions: Sequence[str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ssd-detector")
    except PackageNotFoundError:
        ours = "0"
    return {"name": SERVER_NAME, "version": ours, "extensions": list(extensions)}


def model_metadata(state: State, model: ServedModel) -> dict[str, Any]:
    """Name, versions, platform, the inputs and outputs, and the artifact's facts (class names
    first) as parameters."""
    if model.detector is None:
        raise not_ready(model.why_not_ready())
    info = model.detector.info
    height, width = info.input_size
    versions = [str(m.version) for m in state.repository.models() if m.name == model.name]
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, height, width, 3]},
        ],
        "outputs": [
            {"name": "num_detections", "datatype": "INT64", "shape": [-1]},
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "labels", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "parameters": {
            "classes": list(info.classes),
            "architecture": info.name,
            "artifact_version": info.version,
            "sha256": info.sha256,
            "input_size": [height, width],
            "max_detections": info.max_detections,
            "score_threshold": info.score_threshold,
        },
    }


def repository_index(state: State, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's repository index: every model listed with its version, state and, where it is
    not ready, the reason (``ready_only``: the ready ones alone, as Triton's ``ready`` flag)."""
    return [m.index_entry() for m in state.repository.models() if m.ready or not ready_only]


# Triton's model configuration data types, by the protocol's.
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}


def model_config(state: State, model: ServedModel) -> dict[str, Any]:
    """The model as Triton's model configuration (``model_config.proto``, in its JSON form): what
    Triton's tools and clients read (``get_model_config``). The batch dimension is the first of
    each tensor, dropped from ``dims``, as a batching Triton model states it; a request holds
    at most SSD_MAX_IMAGES_PER_REQUEST images, which the dynamic batcher gathers into batches of
    SSD_MAX_BATCH_SIZE. The parameters are the metadata's, each value a string (JSON where it is
    not one): ``parameters["classes"]["string_value"]`` is the class list."""
    meta = model_metadata(state, model)
    settings = state.settings

    def tensor(t: dict[str, Any]) -> dict[str, Any]:
        dims = t["shape"][1:]
        out: dict[str, Any] = {"name": t["name"], "data_type": CONFIG_TYPES[t["datatype"]]}
        # A tensor of one value per image: Triton's dims [1], reshaped to none.
        return out | ({"dims": dims} if dims else {"dims": [1], "reshape": {"shape": []}})

    return {
        "name": meta["name"],
        "platform": meta["platform"],
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": len(meta["versions"])}},
        "max_batch_size": settings.max_images_per_request,
        "input": [tensor(t) for t in meta["inputs"]],
        "output": [tensor(t) for t in meta["outputs"]],
        "dynamic_batching": {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
        },
        "parameters": {
            key: {"string_value": value if isinstance(value, str) else json.dumps(value)}
            for key, value in meta["parameters"].items()
        },
    }


# --- Inference -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asked:
    """A request's parameters, checked for type (their ranges are the model's: ``Query.parse``)."""

    score_threshold: float | None = None
    max_detections: int | None = None
    classes: list[str] | None = None
    timeout_ms: float | None = None
    tile: str | None = None
    tile_overlap: float | None = None

    @classmethod
    def parse(cls, parameters: Mapping[str, Any], limit_ms: float) -> Asked:
        """``limit_ms``: the server's longest deadline. Triton's ``timeout`` is held to it (its
        clients set it by habit); ``timeout_ms`` past it is refused, as on ``/detect``."""

        def number(key: str) -> float | None:
            value = parameters.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(f"parameter {key!r}: a number is needed, not {value!r}")
            return float(value)

        limit = parameters.get("max_detections")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            if not (isinstance(limit, float) and limit.is_integer()):
                raise bad(f"parameter 'max_detections': an integer is needed, not {limit!r}")
            limit = int(limit)
        classes = parameters.get("classes")
        if isinstance(classes, str):
            classes = classes.split(",")
        elif classes is not None and not (
            isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        ):
            raise bad("parameter 'classes': a list of class names, or one comma-separated string")
        timeout_ms = number("timeout_ms")
        triton = number("timeout")  # Triton's, in microseconds; 0 there means none
        if triton:
            timeout_ms = min(timeout_ms or math.inf, triton / 1000, limit_ms)
        tile = parameters.get("tile")
        if tile is not None and not isinstance(tile, str):
            raise bad(f"parameter 'tile': auto, off or WIDTHxHEIGHT, not {tile!r}")
        return cls(number("score_threshold"), limit, classes, timeout_ms, tile, number("tile_overlap"))


def _images(call: Call, tensor: Tensor) -> list[bytes] | np.ndarray:
    """The input's images, checked: encoded (``images``) or pixels (``pixels``)."""
    info = call.info
    settings = call.state.settings
    limit = settings.max_images_per_request
    if tensor.name == "images":
        if tensor.datatype != "BYTES":
            raise bad(f"input 'images' is BYTES (encoded images), not {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise bad(f"input 'images' has shape [B] (or [B, 1]), not {tensor.shape}")
        images = list(tensor.data)
        if len(images) != element_count(tensor.shape):
            raise bad(f"input 'images': shape {tensor.shape} but {len(images)} elements")
        if not images:
            raise bad("input 'images' holds no image")
        if len(images) > limit:
            raise APIError(413, f"{len(images)} images; at most {limit} per request", "too_many_images")
        for index, data in enumerate(images):
            if len(data) > settings.max_image_bytes:
                raise APIError(
                    413,
                    f"images[{index}] has {len(data)} bytes; the limit is {settings.max_image_bytes}",
                    "payload_too_large",
                )
        return images
    if tensor.name == "pixels":
        height, width = info.input_size
        if tensor.datatype != "UINT8":
            raise bad(f"input 'pixels' is UINT8, not {tensor.datatype}")
        if len(tensor.shape) != 4 or list(tensor.shape[1:]) != [height, width, 3]:
            raise bad(
                f"input 'pixels' has shape [B, {height}, {width}, 3] for this model, not {tensor.shape}"
            )
        pixels = np.asarray(tensor.data)
        if pixels.dtype != np.uint8 or pixels.size != element_count(tensor.shape):
            raise bad(f"input 'pixels': shape {tensor.shape} but {pixels.size} elements")
        pixels = pixels.reshape(tensor.shape)
        if len(pixels) == 0:
            raise bad("input 'pixels' holds no image")
        if len(pixels) > limit:
            raise APIError(413, f"{len(pixels)} images; at most {limit} per request", "too_many_images")
        return pixels
    raise bad(f"unknown input {tensor.name!r}; this model takes 'images' (BYTES) or 'pixels' (UINT8)")


def check_outputs(requested: Sequence[str] | None) -> list[str]:
    """The outputs to answer, in the order asked (all four when none are named)."""
    if not requested:
        return list(OUTPUTS)
    unknown = [name for name in requested if name not in OUTPUTS]
    if unknown:
        raise bad(f"unknown outputs {unknown}; this model answers {list(OUTPUTS)}")
    return list(dict.fromkeys(requested))


async def run(
    call: Call,
    inputs: Sequence[Tensor],
    parameters: Mapping[str, Any],
    gone: Callable[[], Awaitable[None]] | None = None,
    transport_due: float | None = None,
) -> Inferred:
    """One inference request of a resolved ``call``: every output, by name, and the tiles of a
    tiled request. ``transport_due``: the transport's own deadline (gRPC's), if any. Raises
    APIError (HTTP statuses)."""
    info = call.info
    settings = call.state.settings
    if len(inputs) != 1:
        names = [t.name for t in inputs]
        raise bad(f"one input is needed, 'images' or 'pixels'; got {names}")
    asked = Asked.parse(parameters, settings.request_timeout_s * 1000)
    query = Query.parse(
        info, settings.score_threshold, asked.score_threshold, asked.max_detections, asked.classes
    )
    tiling = Tiling.parse(asked.tile, asked.tile_overlap, settings.tile, settings.tile_overlap)
    call.set_deadline(asked.timeout_ms, transport_due)
    images = _images(call, inputs[0])
    names = None if isinstance(images, np.ndarray) else [f"images[{i}]" for i in range(len(images))]
    if tiling is not None and isinstance(images, np.ndarray) and asked.tile is None:
        tiling = None  # the server's default tiling applies to encoded images only
    found = await call.run(images, names, gone, tiling, query.threshold)
    count = len(found)
    k = query.limit
    boxes = np.zeros((count, k, 4), np.float32)
    scores = np.zeros((count, k), np.float32)
    labels = np.full((count, k), -1, np.int64)
    kept = np.zeros(count, np.int64)
    for row, image in enumerate(found):
        b, s, c = image.arrays(query)
        n = len(s)
        boxes[row, :n], scores[row, :n], labels[row, :n], kept[row] = b, s, c, n
    call.answered(kept.tolist())
    outputs = {"num_detections": kept, "boxes": boxes, "scores": scores, "labels": labels}
    return Inferred(outputs, [[list(r) for r in image.tiles] for image in found] if tiling else None)


@dataclass(frozen=True)
class Inferred:
    """An inference's answer: the outputs by name, and for a tiled request each image's tiles
    (x0, y0, x1, y1 in its pixels), which the response carries as its ``tiles`` parameter (JSON)."""

    outputs: dict[str, np.ndarray]
    tiles: list[list[list[int]]] | None = None

    def parameters(self) -> dict[str, str]:
        return {"tiles": json.dumps(self.tiles, separators=(",", ":"))} if self.tiles is not None else {}
