"""Detection selection (top-k candidates, per-class NMS, top K) as one PyTorch custom op with an
ONNX translation.

The dynamo exporter sees ``torch.ops.ssd.select_detections`` as one opaque node: in eager mode it
runs ``model.postprocess.select_detections`` (so the graph's reference is the eager code path), and
``onnx_select_detections`` writes it as ONNX operators, NMS as ONNX's ``NonMaxSuppression``.
Every output has a fixed shape (padded to K), so the batch dimension stays dynamic and nothing
data-dependent leaks into the exported graph's shapes.

The ONNX form, for scores [B, N, C] and boxes [B, N, 4]:

1. TopK over the N boxes of each (image, class): k = min(topk_candidates, N) candidates.
   This is what bounds NMS's cost: ONNX Runtime's NMS is quadratic in the boxes it keeps.
2. Empty boxes get score 0, so that NMS's score threshold drops them with the low scores.
3. One NonMaxSuppression per image over all C*k candidates, each class's boxes shifted into its
   own cell (``class_offsets``) so that classes never suppress each other: per-class NMS, but
   it stops after K selections, the most the output can hold. ~10x less NMS time than C
   per-class runs in the worst case (every candidate above the threshold).
4. A dense [B, C*k] score map of the survivors, TopK K over it: the K best per image across
   classes, already sorted, with class = position // k.
"""

from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from torch import Tensor

from model.postprocess import PostprocessConfig, class_offsets, select_detections


@torch.library.custom_op("ssd::select_detections", mutates_args=())
def select_detections_op(
    scores: Tensor,
    boxes: Tensor,
    score_threshold: float,
    iou_threshold: float,
    topk_candidates: int,
    max_detections: int,
    class_agnostic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scores [B, N, C] (background dropped), boxes [B, N, 4] -> the four padded outputs."""
    config = PostprocessConfig(
        score_threshold, iou_threshold, topk_candidates, max_detections, class_agnostic=class_agnostic
    )
    num, out_boxes, out_scores, out_labels = select_detections(scores, boxes, config)
    return num, out_boxes, out_scores, out_labels


@select_detections_op.register_fake
def _(
    scores: Tensor,
    boxes: Tensor,
    score_threshold: float,
    iou_threshold: float,
    topk_candidates: int,
    max_detections: int,
    class_agnostic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch = scores.shape[0]
    return (
        scores.new_empty((batch,), dtype=torch.int64),
        scores.new_empty((batch, max_detections, 4)),
        scores.new_empty((batch, max_detections)),
        scores.new_empty((batch, max_detections), dtype=torch.int64),
    )


def onnx_select_detections(  # noqa: ANN201 - returns onnxscript values
    scores,  # noqa: ANN001 - onnxscript values
    boxes,  # noqa: ANN001
    score_threshold: float,
    iou_threshold: float,
    topk_candidates: int,
    max_detections: int,
    class_agnostic: bool,
):
    """The ONNX translation of ``select_detections_op`` (traced by the exporter)."""
    num_priors = scores.shape[1]
    num_classes = scores.shape[2]
    if not isinstance(num_priors, int) or not isinstance(num_classes, int):
        raise ValueError("select_detections needs static box and class counts to export")
    k = min(topk_candidates, num_priors)
    zero = op.Constant(value_float=0.0)

    if class_agnostic:
        best = op.ReduceMax(scores, op.Constant(value_ints=[2]), keepdims=0)  # [B, N]
        best_label = op.ArgMax(scores, axis=2, keepdims=0)  # [B, N]
        groups = 1
        per_group = op.Unsqueeze(best, op.Constant(value_ints=[1]))  # [B, 1, N]
    else:
        groups = num_classes
        per_group = op.Transpose(scores, perm=[0, 2, 1])  # [B, C, N]
    # Unsorted: NMS orders its input itself, and ONNX Runtime then finds the k best with a
    # selection (linear) instead of a heap (k log k per element): 3x less time for 90 classes.
    cand_scores, cand_index = op.TopK(per_group, op.Constant(value_ints=[k]), axis=2, sorted=0)  # [B, G, k]

    # Candidate boxes: flat gather from [B*N, 4] at image * N + box.
    batch = op.Shape(scores, start=0, end=1)  # [1]
    image = op.Range(op.Constant(value_int=0), op.Squeeze(batch), op.Constant(value_int=1))
    offset = op.Mul(image, op.Constant(value_int=num_priors))
    flat_index = op.Add(cand_index, op.Unsqueeze(offset, op.Constant(value_ints=[1, 2])))  # [B, G, k]
    flat_boxes = op.Reshape(boxes, op.Constant(value_ints=[-1, 4]))
    cand_boxes = op.Gather(flat_boxes, flat_index, axis=0)  # [B, G, k, 4]

    x1, y1, x2, y2 = op.Split(cand_boxes, num_outputs=4, axis=3)
    nonempty = op.Squeeze(op.And(op.Greater(x2, x1), op.Greater(y2, y1)), op.Constant(value_ints=[3]))
    cand_scores = op.Where(nonempty, cand_scores, zero)

    # One NMS per image over all classes' candidates, each class shifted to its own cell (see
    # class_offsets): per-class NMS in effect, and it stops once K boxes are selected.
    nms_boxes = cand_boxes
    if groups > 1:
        shifts = class_offsets(groups).numpy()[None, :, None, :]  # [1, G, 1, 4]
        nms_boxes = op.Add(cand_boxes, op.Constant(value=ir.tensor(shifts)))
    selected = op.NonMaxSuppression(
        op.Reshape(nms_boxes, op.Concat(batch, op.Constant(value_ints=[groups * k, 4]), axis=0)),
        op.Reshape(cand_scores, op.Concat(batch, op.Constant(value_ints=[1, groups * k]), axis=0)),
        op.Constant(value_ints=[max_detections]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )  # [M, 3]: (image, 0, group * k + candidate), by image, scores descending
    image_of, _, candidate = op.Split(selected, num_outputs=3, axis=1)
    position = op.Add(op.Mul(image_of, op.Constant(value_int=groups * k)), candidate)  # [M, 1]

    flat_scores = op.Reshape(cand_scores, op.Constant(value_ints=[-1]))
    survivors = op.ScatterND(op.Mul(flat_scores, zero), position, op.GatherND(flat_scores, position))
    survivors = op.Reshape(survivors, op.Concat(batch, op.Constant(value_ints=[groups * k]), axis=0))

    top = min(max_detections, groups * k)
    top_scores, top_index = op.TopK(survivors, op.Constant(value_ints=[top]), axis=1)  # [B, top]
    valid = op.Greater(top_scores, zero)
    num_detections = op.ReduceSum(op.Cast(valid, to=7), op.Constant(value_ints=[1]), keepdims=0)

    group_boxes = op.Reshape(cand_boxes, op.Concat(batch, op.Constant(value_ints=[groups * k, 4]), axis=0))
    gather_index = op.Expand(
        op.Unsqueeze(top_index, op.Constant(value_ints=[2])), op.Constant(value_ints=[1, 1, 4])
    )
    out_boxes = op.GatherElements(group_boxes, gather_index, axis=1)  # [B, top, 4]
    out_boxes = op.Where(op.Unsqueeze(valid, op.Constant(value_ints=[2])), out_boxes, zero)
    out_scores = op.Where(valid, top_scores, zero)
    minus_one = op.Constant(value_int=-1)
    if class_agnostic:
        prior = op.GatherElements(
            op.Reshape(cand_index, op.Concat(batch, op.Constant(value_ints=[k]), axis=0)), top_index, axis=1
        )
        label = op.GatherElements(best_label, prior, axis=1)
    else:
        label = op.Div(top_index, op.Constant(value_int=k))
    out_labels = op.Where(valid, label, minus_one)

    if top < max_detections:  # fewer candidates than K in all: pad to the contract's fixed K
        pad = op.Constant(value_ints=[0, 0, 0, max_detections - top])
        out_scores = op.Pad(out_scores, pad, zero)
        out_labels = op.Pad(out_labels, pad, minus_one)
        out_boxes = op.Pad(out_boxes, op.Constant(value_ints=[0, 0, 0, 0, max_detections - top, 0]), zero)
    return num_detections, out_boxes, out_scores, out_labels
