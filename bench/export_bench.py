"""The exported artifact on ONNX Runtime (CPU) against PyTorch eager, and where the graph's time goes.

For each model: the same network and post-processing (uint8 images in, padded detections out),
PyTorch eager (``export.graph.DetectionGraph``) against the exported artifact on ONNX Runtime's
CPU provider, at batch 1 and 8, same threads, alternating rounds. Then ONNX Runtime's profiler at
batch 8 splits the graph's time between the network and the rest (softmax, box decoding, top-k,
NMS, top K).

The weights: random, with batch-norm statistics from synthetic scenes (so the scores vary), and
91 classes: every softmax score sits near 1/91 > 0.01, so every default box of every class is an
NMS candidate, the worst case for the post-processing. ``--checkpoint`` adds a trained model.

    ssd bench export [--models ssdlite320_mobilenet_v3_large ssd300_vgg16]
        [--checkpoint runs/demo/best.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.machine import emit, machine_info, sample_times
from export.calibrated import random_model
from export.exporter import ExportOptions, build_onnx, sample_images
from export.graph import DetectionGraph, module_path
from export.sources import from_checkpoint

PROG = "ssd bench export"


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = profile
    # The trace goes beside the artifact (a temporary folder), not into the working directory.
    options.profile_file_prefix = str(path.with_suffix("")) + "_profile"
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    return statistics.median(sample_times(fn, repeats, warmup=1))


def post_processing_nodes(proto: onnx.ModelProto) -> set[str]:
    """Names of the nodes after the network: softmax, decoding, top-k, NMS, top K. The network is
    the ``model`` submodule; what feeds it (cast, /255, transpose) is preprocessing, not counted."""
    network, outside = set(), {}
    for node in proto.graph.node:
        path = module_path(node)
        if len(path) > 1 and path[1] == "model":
            network.add(node.name)
        else:
            outside[node.name] = node
    producer = {out: node for node in proto.graph.node for out in node.output}
    feeding: set[str] = set()  # ancestors of the network: preprocessing
    stack = [node for node in proto.graph.node if node.name in network]
    while stack:
        for name in stack.pop().input:
            parent = producer.get(name)
            if parent is not None and parent.name in outside and parent.name not in feeding:
                feeding.add(parent.name)
                stack.append(parent)
    return set(outside) - feeding


def profile_share(path: Path, proto: onnx.ModelProto, images: np.ndarray, threads: int, runs: int) -> dict:
    """Share of node time in decoding and selection, from ONNX Runtime's profiler."""
    sess = session(path, threads, profile=True)
    for _ in range(runs + 1):
        sess.run(None, {"images": images})
    trace = json.loads(Path(sess.end_profiling()).read_text())
    post_nodes = post_processing_nodes(proto)
    by_node: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            by_node[name] = by_node.get(name, 0.0) + event["dur"]
    # Nodes ORT fused or created (fused Conv+activation, ...) are the network's.
    post = {k: v for k, v in by_node.items() if k in post_nodes}
    total = sum(by_node.values())
    top = sorted(post.items(), key=lambda kv: -kv[1])[:5]
    return {
        "post_processing_share": sum(post.values()) / total,
        "post_processing_ms_per_batch": sum(post.values()) / 1000 / (runs + 1),
        "graph_ms_per_batch": total / 1000 / (runs + 1),
        "slowest_post_nodes": [(name, round(us / 1000 / (runs + 1), 2)) for name, us in top],
    }


def bench_model(label: str, model, threads: int, repeats: int) -> dict:
    proto = build_onnx(model, ExportOptions())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, path)
        sess = session(path, threads)
        graph = DetectionGraph(model.eval(), ExportOptions().config).eval()
        result = {"model": label, "classes": model.num_classes - 1, "batches": {}}
        for batch in (1, 8):
            images = sample_images(model.input_size, batch, seed=batch)
            tensor = torch.from_numpy(images)
            with torch.inference_mode():
                eager = timed(lambda tensor=tensor: graph(tensor), repeats)
            onnx_s = timed(lambda images=images: sess.run(None, {"images": images}), repeats)
            count = int(sess.run(["num_detections"], {"images": images})[0].sum())
            result["batches"][batch] = {
                "eager_ms": round(eager * 1000, 1),
                "onnxruntime_ms": round(onnx_s * 1000, 1),
                "speedup": round(eager / onnx_s, 2),
                "onnxruntime_images_per_s": round(batch / onnx_s, 1),
                "detections": count,
            }
            print(label, batch, result["batches"][batch], file=sys.stderr)
        images = sample_images(model.input_size, 8, seed=8)
        result["batch8_profile"] = profile_share(path, proto, images, threads, runs=max(3, repeats // 2))
        print(label, result["batch8_profile"], file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["ssdlite320_mobilenet_v3_large", "ssd300_vgg16"])
    parser.add_argument("--classes", type=int, default=90, help="random models: classes without background")
    parser.add_argument("--checkpoint", help="a trained checkpoint to measure as well")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        model = random_model(name, args.classes + 1)
        results.append(bench_model(f"{name} (random weights, worst case)", model, args.threads, args.repeats))
    if args.checkpoint:
        source = from_checkpoint(args.checkpoint)
        results.append(
            bench_model(
                f"{source.model.name} (trained: {args.checkpoint})", source.model, args.threads, args.repeats
            )
        )
    emit(
        {
            "machine": {**machine_info(), "onnxruntime": ort.__version__, "threads": args.threads},
            "results": results,
        },
        args.json,
    )
    return 0
