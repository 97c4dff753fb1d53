"""The null artifact: a valid detector artifact of ours whose graph does no work, to measure the
serving front end alone (``ssd bench frontend``).

It has the demo model's interface (``images`` uint8 [batch, 320, 320, 3], the ``class_ids``
initializer, ``num_detections`` / ``boxes`` / ``scores`` / ``labels``) and metadata (its classes,
input size, thresholds, with ``model`` = ``null``), and answers every image with the same
DETECTIONS constant detections, broadcast over the batch: ONNX Runtime runs a batch of 8 in
well under a millisecond. Committed as models/null.onnx (a few KB), so that before and after,
ours and the peers', use the same file; ``python -m bench.null_artifact`` writes it again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "models" / "null.onnx"
DEMO = ROOT / "models" / "demo.onnx"
DETECTIONS = 3  # per image, the rest of the max_detections rows padding


def build(demo: Path = DEMO) -> onnx.ModelProto:
    """The null graph, with the metadata of ``demo`` (its classes, size, thresholds)."""
    source = onnx.load(str(demo), load_external_data=False)
    meta = {p.key: p.value for p in source.metadata_props}
    classes = json.loads(meta["classes"])
    height, width = json.loads(meta["input_size"])
    k = int(meta["max_detections"])
    boxes = np.zeros((1, k, 4), np.float32)
    scores = np.zeros((1, k), np.float32)
    labels = np.full((1, k), -1, np.int64)
    for i in range(DETECTIONS):  # boxes in the input's pixels, as the real graph's
        boxes[0, i] = [40 + 60 * i, 50, 90 + 60 * i, 120]
        scores[0, i] = 0.9 - 0.1 * i
        labels[0, i] = i % len(classes)
    constants = [
        numpy_helper.from_array(boxes, "boxes_1"),
        numpy_helper.from_array(scores, "scores_1"),
        numpy_helper.from_array(labels, "labels_1"),
        numpy_helper.from_array(np.array([DETECTIONS], np.int64), "count_1"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([k, 4], np.int64), "tail_boxes"),
        numpy_helper.from_array(np.array([k], np.int64), "tail_rows"),
        numpy_helper.from_array(np.arange(len(classes), dtype=np.int64), "class_ids"),
    ]
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),  # [1]: the batch size
        helper.make_node("Concat", ["batch", "tail_boxes"], ["shape_boxes"], axis=0),
        helper.make_node("Concat", ["batch", "tail_rows"], ["shape_rows"], axis=0),
        helper.make_node("Expand", ["boxes_1", "shape_boxes"], ["boxes"]),
        helper.make_node("Expand", ["scores_1", "shape_rows"], ["scores"]),
        helper.make_node("Expand", ["labels_1", "shape_rows"], ["labels"]),
        helper.make_node("Expand", ["count_1", "batch"], ["num_detections"]),
    ]
    graph = helper.make_graph(
        nodes,
        "null",
        [
            helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", height, width, 3]),
            helper.make_tensor_value_info("class_ids", TensorProto.INT64, [len(classes)]),
        ],
        [
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", k]),
        ],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model.doc_string = "The null artifact: the demo model's interface and metadata, constant detections"
    keep = {"classes", "input_size", "score_threshold", "iou_threshold", "max_detections", "topk_candidates",
            "nms", "outputs", "precision", "format_version"}  # fmt: skip
    props = {key: value for key, value in meta.items() if key in keep}
    props |= {"model": "null", "version": "1", "producer": "bench/null_artifact.py"}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    data = build().SerializeToString()
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
