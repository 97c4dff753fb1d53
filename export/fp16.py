"""Half-precision artifacts: float16 weights and compute in the network, float32 everywhere else.

onnxconverter-common's converter does the rewriting and the casts at the boundaries. We keep in
float32, besides its default block list (which already holds TopK and NonMaxSuppression):
- every node outside the SSD network (pixel normalisation, softmax, box decoding, selection):
  decoding multiplies small offsets by the default boxes, where float16's 3 significant digits
  would move boxes by more than the 2e-3 that fp16 artifacts promise;
- the L2Norm of the VGG models and any other sum of squares or exponential, which overflow
  float16's 65504 on ordinary activations.
- the prediction heads: their few convolutions carry the box offsets and class logits straight to
  the outputs, and in float16 they moved boxes by up to 9e-3 (a tenth of the cost of the graph
  at most; the backbone is the rest).
Inputs (uint8) and outputs keep their types (``keep_io_types``).
"""

from __future__ import annotations

import onnx
from onnxconverter_common import float16

from .graph import module_path

# Ops whose float16 results overflow or lose too much on SSD activations.
_FLOAT32_OPS = {
    "ReduceMean",
    "GlobalAveragePool",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Exp",
    "Softmax",
    "Div",
}


def _in_network(node: onnx.NodeProto, network_scope: str) -> bool:
    path = module_path(node)
    return len(path) > 2 and path[1] == network_scope and path[2] != f"{network_scope}.head"


def to_float16(model: onnx.ModelProto, network_scope: str = "model") -> onnx.ModelProto:
    """``model`` with the SSD network (the submodule ``network_scope`` of the exported module) in
    float16. Returns a new ModelProto; raises ValueError when no node belongs to the network."""
    keep = [
        n.name for n in model.graph.node if not _in_network(n, network_scope) or n.op_type in _FLOAT32_OPS
    ]
    if len(keep) == len(model.graph.node):
        raise ValueError(f"no node of the exported graph comes from the module {network_scope!r}")
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST))
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=block, node_block_list=keep, disable_shape_infer=False
    )
    return _restore_float_outputs(converted, model)


def _restore_float_outputs(converted: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """onnxconverter-common 1.16 ends outputs produced by a blocked (float32) node with a Cast to
    float16 despite ``keep_io_types``; turn those casts back to float32, as the contract says."""
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producer = {out: node for node in converted.graph.node for out in node.output}
    for output in converted.graph.output:
        elem = output.type.tensor_type
        if elem.elem_type == wanted[output.name]:
            continue
        node = producer.get(output.name)
        if node is None or node.op_type != "Cast":
            raise ValueError(f"float16 conversion changed output {output.name!r} and no Cast can undo it")
        for attribute in node.attribute:
            if attribute.name == "to":
                attribute.i = wanted[output.name]
        elem.elem_type = wanted[output.name]
    return converted
