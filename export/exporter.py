"""From a network to a checked, verified model artifact on disk.

build_onnx: torch.onnx's dynamo exporter on ``DetectionGraph`` (the selection step as a custom
    op with its ONNX translation, see nms.py), dynamic batch, metadata, optional float16.
export_artifact: build, ``onnx.checker`` (full check), write to a temporary file beside the
    target, verify it with ONNX Runtime against PyTorch, then rename: a running service
    watching the path never sees half a file or an artifact that failed verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model.config import PostprocessConfig
from model.data.synth import render
from model.files import staged
from model.ssd import SSD

from . import verify as checks
from .diagnose import explain
from .fp16 import to_float16
from .graph import DetectionGraph
from .metadata import build_metadata
from .nms import onnx_select_detections
from .reference import Reference, eager_reference
from .sources import Source

log = logging.getLogger(__name__)

OPSET = 18
DETECTION_OUTPUTS = ["num_detections", "boxes", "scores", "labels"]
# The class count, carried by the graph itself (docs/reference.md, "The model artifact"): an int64
# [C] initializer 0..C-1, listed as an optional graph input so that ONNX Runtime shows its shape
# (InferenceSession.get_overridable_initializers) to a service without the onnx package. The
# service refuses an artifact whose ``classes`` metadata disagrees with it: metadata is easy to
# edit, the network's class axis is not.
CLASS_IDS = "class_ids"
RAW_OUTPUTS = ["boxes", "scores"]


@dataclass(frozen=True)
class ExportOptions:
    config: PostprocessConfig = field(default_factory=PostprocessConfig)
    raw: bool = False  # decoded boxes and class scores, no NMS
    fp16: bool = False


@dataclass
class Artifact:
    path: Path
    sha256: str
    metadata: dict[str, str]
    report: checks.Report | None = None  # verification against PyTorch
    fp16_agreement: tuple[int, int] | None = None  # (found, total) float32 detections > 0.3


def build_onnx(model: SSD, options: ExportOptions, example_batch: int = 2) -> onnx.ModelProto:
    """The model's graph from uint8 NHWC images to the padded outputs (or raw outputs)."""
    graph = DetectionGraph(model.eval(), options.config, raw=options.raw).eval()
    height, width = model.input_size
    example = torch.zeros(example_batch, height, width, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")  # the exporter's own progress chatter
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=RAW_OUTPUTS if options.raw else DETECTION_OUTPUTS,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            custom_translation_table={torch.ops.ssd.select_detections.default: onnx_select_detections},
            verbose=False,
        )
    proto = program.model_proto
    if options.fp16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one line per weight below float16's smallest normal
            proto = to_float16(proto)
    mark_class_count(proto, model.num_classes - 1)
    return proto


def mark_class_count(proto: onnx.ModelProto, count: int) -> None:
    """Bake the class count (background excluded) into ``proto`` as ``CLASS_IDS``."""
    graph = proto.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.arange(count, dtype=np.int64), CLASS_IDS))
    graph.input.append(onnx.helper.make_tensor_value_info(CLASS_IDS, onnx.TensorProto.INT64, [count]))


def sample_images(
    input_size: tuple[int, int], count: int = max(checks.BATCH_SIZES), seed: int = 0
) -> np.ndarray:
    """Synthetic scenes at the model's input size, uint8 [count, H, W, 3]: objects a model
    trained on them detects, and plenty of texture for any other model."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(rng, input_size).image, dtype=np.uint8) for _ in range(count)])


def export_artifact(source: Source, out: str | Path, options: ExportOptions | None = None) -> Artifact:
    """Export ``source`` to ``out`` (atomically), verified. Raises VerificationError (and
    leaves ``out`` untouched) when ONNX Runtime and PyTorch disagree."""
    options = options or ExportOptions()
    out = Path(out)
    model = source.model.eval()
    started = time.perf_counter()
    log.info("building the ONNX graph of %s (torch.onnx) ...", model.name)
    proto = build_onnx(model, options)
    metadata = build_metadata(
        model_name=model.name,
        classes=source.classes,
        input_size=model.input_size,
        config=options.config,
        source=source.source,
        metrics=source.metrics,
        raw=options.raw,
        fp16=options.fp16,
    )
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = f"SSD detector {model.name}: uint8 NHWC RGB images in, padded detections out"
    proto.producer_name = metadata["producer"]
    onnx.checker.check_model(proto, full_check=True)
    if len(source.classes) != model.num_classes - 1:
        raise ValueError(
            f"{len(source.classes)} class names for a model with {model.num_classes - 1} classes"
        )

    data = proto.SerializeToString()
    with staged(out) as tmp:
        tmp.write_bytes(data)
        artifact = Artifact(out, hashlib.sha256(data).hexdigest(), metadata)
        log.info("graph built and checked in %.1f s", time.perf_counter() - started)
        if not options.raw:
            started = time.perf_counter()
            log.info("verifying it against PyTorch with ONNX Runtime ...")
            _verify(tmp, source, options, artifact)
            log.info("verified in %.1f s", time.perf_counter() - started)
    return artifact


def _verify(path: Path, source: Source, options: ExportOptions, artifact: Artifact) -> None:
    images = sample_images(source.model.input_size)
    sess = checks.session(path)
    config = options.config
    if options.fp16:
        # Float16 against the float32 graph: detections above 0.3, boxes within 2e-3.
        fp32 = eager_reference(source.model, config)(images)
        artifact.fp16_agreement = found, total = checks.agreement(fp32, checks.run(sess, images))
        if total and found < 0.99 * total:
            raise checks.VerificationError(
                f"float16 artifact keeps {found} of {total} float32 detections above 0.3 (needs 99%)"
            )
        return
    if source.reference is not None and not config.class_agnostic:
        reference = source.reference(config)
    else:
        reference = eager_reference(source.model, config)
    try:
        artifact.report = checks.verify(sess, reference, images, config)
    except checks.VerificationError as exc:
        raise checks.VerificationError(
            f"{exc}\n{_diagnosis(source.model, reference, sess, images, config)}"
        ) from None


def _diagnosis(
    model: SSD,
    reference: Reference,
    sess: ort.InferenceSession,
    images: np.ndarray,
    config: PostprocessConfig,
) -> str:
    """Where the two pipelines part (diagnose.py), from a raw export of the same network."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning that CLASS_IDS is an input (on purpose)
    raw = ort.InferenceSession(
        build_onnx(model, ExportOptions(config, raw=True)).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )

    def artifact_raw(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = raw.run(RAW_OUTPUTS, {"images": batch})
        return scores, boxes

    largest = max(checks.BATCH_SIZES)
    finding = explain(
        reference, lambda batch: checks.run(sess, batch), artifact_raw, images[:largest], config
    )
    return f"first difference, stage by stage against {reference.name}: {finding}"
