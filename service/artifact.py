"""Loading a model artifact into an ONNX Runtime session, and running it.

Everything the service needs (classes, input size, thresholds) comes from the artifact's
metadata; a file that is not a valid artifact is refused with an ``ArtifactError`` that says what
is wrong with it, before anything is swapped or served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

OUTPUTS = ("num_detections", "boxes", "scores", "labels")
# The graph's own class count: an int64 [C] initializer the exporter lists as an optional input,
# whose shape ONNX Runtime shows (export/exporter.py CLASS_IDS; docs/reference.md, "The model artifact").
CLASS_IDS = "class_ids"
REQUIRED_METADATA = ("classes", "model", "input_size", "score_threshold", "iou_threshold", "max_detections")
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


# What the file people most often take for an artifact starts with: torch.save's zip archive (or
# its older pickle). An ONNX model is a protobuf whose first byte is a field tag (0x08).
_NOT_ONNX = (
    (b"PK\x03\x04", "a PyTorch checkpoint (a zip archive, as torch.save writes)"),
    (b"\x80\x02", "a PyTorch checkpoint (a pickle)"),
)


def not_an_artifact(path: Path, data: bytes) -> str | None:
    """Why ``data`` is plainly not an ONNX artifact, naming what it is and the way to one; None
    when it may be one (ONNX Runtime then says whether it is)."""
    for magic, what in _NOT_ONNX:
        if data.startswith(magic):
            return (
                f"{path} is {what}, not an ONNX model artifact: export it first "
                f"(ssd export --checkpoint {path} --out MODEL.onnx)"
            )
    return None


class ArtifactError(RuntimeError):
    """The file is missing, unreadable, or not a detector artifact of ours."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    name: str
    version: str
    classes: list[str]
    input_size: tuple[int, int]  # (H, W)
    score_threshold: float
    iou_threshold: float
    max_detections: int
    metadata: dict[str, str] = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """The metadata as JSON values (lists and numbers parsed), for /model and logs."""
        out: dict[str, Any] = {}
        for key, value in self.metadata.items():
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        out["model"] = self.name  # a model name like "1e5" must stay a string
        return out

    def label(self, class_id: int) -> str:
        """The name of ``class_id``. An artifact whose graph has more classes than its metadata
        names is refused at load when the graph carries its class count; an older one that does
        not cannot fail a request for it: the id stands in for the missing name."""
        if 0 <= class_id < len(self.classes):
            return self.classes[class_id]
        return f"class_{class_id}"

    def threshold(self, requested: float | None, default: float) -> float:
        """The score threshold to apply: ``requested``, or ``default`` raised to the artifact's
        floor. The graph keeps only scores above its own ``score_threshold``, so a requested
        threshold below it would silently get that floor: ValueError saying so. At it is fine."""
        if requested is None:
            return max(default, self.score_threshold)
        if requested < self.score_threshold:
            raise ValueError(
                f"score_threshold {requested} is below this model's floor of {self.score_threshold} "
                "(the threshold baked into the artifact)"
            )
        return requested


@dataclass
class Detections:
    """One image's detections, boxes in the model's normalised coordinates."""

    boxes: np.ndarray  # float32 [n, 4] xyxy in [0, 1]
    scores: np.ndarray  # float32 [n], descending
    labels: np.ndarray  # int64 [n], 0-based
    model: ModelInfo  # the model that found them (a reload may swap models between batches)

    def to_json(
        self,
        width: int,
        height: int,
        threshold: float,
        limit: int | None = None,
        keep: set[int] | None = None,
    ) -> list[dict[str, Any]]:
        """The contract's detection objects, boxes in pixels of a ``width`` x ``height`` image:
        scores at least ``threshold``, classes in ``keep`` (all if None), at most ``limit``."""
        index = self._chosen(threshold, limit, keep)
        boxes = self.boxes[index].astype(np.float64) * [width, height, width, height]
        scores, labels = self.scores[index], self.labels[index]
        return [
            {
                "label": self.model.label(label),
                "class_id": label,
                "score": round(score, 5),
                "box": [round(v, 2) for v in box],
            }
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)
        ]

    def select(
        self,
        width: int,
        height: int,
        threshold: float,
        limit: int | None = None,
        keep: set[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The detections ``to_json`` answers, as arrays: boxes float32 [n, 4] in pixels of a
        ``width`` x ``height`` image, scores float32 [n], labels int64 [n]."""
        index = self._chosen(threshold, limit, keep)
        boxes = self.boxes[index].astype(np.float64) * [width, height, width, height]
        return (
            boxes.astype(np.float32),
            self.scores[index].astype(np.float32),
            self.labels[index].astype(np.int64),
        )

    def _chosen(self, threshold: float, limit: int | None, keep: set[int] | None) -> np.ndarray:
        chosen = self.scores >= threshold
        if keep is not None:
            chosen &= np.isin(self.labels, list(keep))
        return np.flatnonzero(chosen)[:limit]


def provider_list(names: Sequence[str]) -> list[str]:
    """``["cuda", "cpu"]`` -> ONNX Runtime provider names, in order, keeping those available."""
    available = set(ort.get_available_providers())
    wanted = []
    for name in names:
        full = PROVIDER_NAMES.get(name.strip().lower(), name.strip())
        if full not in PROVIDER_NAMES.values():
            raise ValueError(f"unknown execution provider {name!r}; use tensorrt, cuda or cpu")
        if full in available:
            wanted.append(full)
        else:
            log.warning("execution provider %s is not available in this onnxruntime build", full)
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def _parse_metadata(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ArtifactError(f"{path} has no {', '.join(missing)} in its metadata: not an ssd export")
    try:
        classes = json.loads(meta["classes"])
        size = json.loads(meta["input_size"])
        parsed = {
            "classes": classes,
            "input_size": (int(size[0]), int(size[1])),
            "score_threshold": float(meta["score_threshold"]),
            "iou_threshold": float(meta["iou_threshold"]),
            "max_detections": int(meta["max_detections"]),
        }
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ArtifactError(f"{path} has malformed metadata: {exc}") from exc
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(f"{path}: metadata 'classes' must be a non-empty JSON list of names")
    if meta.get("outputs", "detections") != "detections":
        raise ArtifactError(f"{path} is a raw export (no NMS inside); the service needs detections")
    return parsed


def usable_cores() -> int | None:
    """The cores this process may run on, where they are fewer than the machine's (taskset, a
    container's cpuset); None otherwise (ONNX Runtime's own choice). ONNX Runtime sizes its pool
    by the machine's cores whatever the process may use: on one core of two, a batch of 16 ran
    1.7x slower on two threads than on one (0.38 against 0.22 s, spinning; 0.25 without)."""
    usable = len(os.sched_getaffinity(0))
    return usable if usable < (os.cpu_count() or usable) else None


class Detector:
    """One ONNX Runtime session over one artifact. ``detect`` is thread-safe (ORT's ``run`` is)."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"model artifact {path} does not exist")
        data = path.read_bytes()
        if not data:
            raise ArtifactError(f"model artifact {path} is empty")
        refusal = not_an_artifact(path, data)
        if refusal:
            raise ArtifactError(refusal)
        started = time.perf_counter()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = intra_op_threads or usable_cores()
        if threads:
            options.intra_op_num_threads = threads
        # Spinning threads burn the cores the HTTP side and image decoding need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        chosen = provider_list(providers)
        provider_options = [
            {"cudnn_conv_algo_search": "HEURISTIC"} if p == "CUDAExecutionProvider" else {} for p in chosen
        ]
        try:
            self.session = ort.InferenceSession(
                data, options, providers=chosen, provider_options=provider_options
            )
        except Exception as exc:  # ORT raises its own types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{path} is not a loadable ONNX model: {first}") from exc
        self.providers = self.session.get_providers()  # what ORT really uses (it falls back silently)
        self.io_binding = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._output_device = "cuda" if self.io_binding else "cpu"
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        parsed = _parse_metadata(path, meta)
        self._check_signature(path, parsed["input_size"])
        self._check_class_count(path, parsed["classes"])
        self.info = ModelInfo(
            path=str(path),
            sha256=hashlib.sha256(data).hexdigest(),
            name=meta["model"],
            version=meta.get("version") or meta.get("created_at") or "unknown",
            metadata=meta,
            **parsed,
        )
        self.load_seconds = time.perf_counter() - started

    def _check_signature(self, path: Path, input_size: tuple[int, int]) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)":
            got = [(i.name, i.type) for i in inputs]
            raise ArtifactError(f"{path}: expected one uint8 input 'images', found {got}")
        shape = inputs[0].shape
        if len(shape) != 4 or list(shape[1:]) != [input_size[0], input_size[1], 3]:
            raise ArtifactError(
                f"{path}: input shape {shape} is not [B, {input_size[0]}, {input_size[1]}, 3]"
            )
        names = tuple(o.name for o in self.session.get_outputs())
        if names != OUTPUTS:
            raise ArtifactError(f"{path}: outputs {list(names)}, expected {list(OUTPUTS)}")

    def _check_class_count(self, path: Path, classes: list[str]) -> None:
        shapes = [arg.shape for arg in self.session.get_overridable_initializers() if arg.name == CLASS_IDS]
        if not shapes:
            log.warning(
                "%s does not carry its class count (exported before it did): its 'classes' metadata "
                "(%d names) cannot be checked against the graph",
                path,
                len(classes),
            )
            return
        shape = shapes[0]
        if len(shape) != 1 or not isinstance(shape[0], int):
            raise ArtifactError(f"{path}: '{CLASS_IDS}' has shape {shape}, expected [number of classes]")
        if shape[0] != len(classes):
            raise ArtifactError(
                f"{path}: its metadata names {len(classes)} classes but its graph has {shape[0]}; "
                "the 'classes' metadata must list one name per class the network predicts"
            )

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [B, H, W, 3] -> the four padded outputs."""
        if not self.io_binding:
            return tuple(self.session.run(list(OUTPUTS), {"images": images}))
        # On CUDA: one host-to-device copy of the uint8 batch (4x smaller than float32 pixels),
        # outputs copied back once, with no per-run output allocation on the device.
        binding = self.session.io_binding()
        binding.bind_cpu_input("images", np.ascontiguousarray(images))
        for name in OUTPUTS:
            binding.bind_output(name, self._output_device)
        self.session.run_with_iobinding(binding)
        return tuple(binding.copy_outputs_to_cpu())

    def detect(self, images: np.ndarray) -> list[Detections]:
        num, boxes, scores, labels = self.run(images)
        return [
            Detections(boxes[i, :n], scores[i, :n], labels[i, :n], self.info)
            for i, n in enumerate(num.tolist())
        ]
