"""``ssd export``: a checkpoint or torchvision weights to a verified model artifact."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from model.config import PostprocessConfig
from model.registry import TORCHVISION_MODELS

# `ssd` builds every subcommand's parser, `ssd serve` included, which must not import torch: so
# this module imports the exporter only when it runs, and takes its defaults and model names
# from the torch-free model.config and model.registry.
DEFAULTS = PostprocessConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a training checkpoint (ssd train's best.pt or last.pt)")
    what.add_argument("--torchvision", choices=TORCHVISION_MODELS, help="torchvision's own SSD model")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="with --torchvision: a weights enum name, e.g. COCO_V1")
    weights.add_argument("--weights-file", help="with --torchvision: a state-dict file")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--fp16", action="store_true", help="float16 network (for GPUs); I/O unchanged")
    parser.add_argument("--raw", action="store_true", help="decoded boxes and class scores, no NMS")
    parser.add_argument("--class-agnostic-nms", action="store_true", help="one NMS across classes")
    parser.add_argument("--score-threshold", type=float, default=DEFAULTS.score_threshold)
    parser.add_argument("--iou-threshold", type=float, default=DEFAULTS.iou_threshold)
    parser.add_argument(
        "--topk-candidates", type=int, default=DEFAULTS.topk_candidates, help="per class, before NMS"
    )
    parser.add_argument("--max-detections", type=int, default=DEFAULTS.max_detections, help="K, per image")


def _say_progress() -> None:
    """The exporter's phase lines (graph built, verified: a minute in all on a small CPU) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ssd export: %(message)s"))
    logger = logging.getLogger("export")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    print("ssd export: loading PyTorch ...", file=sys.stderr, flush=True)
    _say_progress()
    from model.checkpoint import CheckpointError
    from model.weights import WeightsError

    from .exporter import ExportOptions, export_artifact
    from .sources import Source, from_checkpoint, from_torchvision
    from .verify import VerificationError

    try:
        config = PostprocessConfig(
            score_threshold=args.score_threshold,
            iou_threshold=args.iou_threshold,
            topk_candidates=args.topk_candidates,
            max_detections=args.max_detections,
            class_agnostic=args.class_agnostic_nms,
        )
        source: Source
        if args.checkpoint:
            if args.weights or args.weights_file:
                raise ValueError("--weights and --weights-file go with --torchvision, not --checkpoint")
            source = from_checkpoint(args.checkpoint)
        else:
            if not (args.weights or args.weights_file):
                raise ValueError("--torchvision needs --weights (e.g. COCO_V1) or --weights-file PATH")
            source = from_torchvision(args.torchvision, args.weights or args.weights_file)
    except (ValueError, CheckpointError, WeightsError, FileNotFoundError) as exc:
        print(f"ssd export: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    try:
        artifact = export_artifact(source, args.out, ExportOptions(config, raw=args.raw, fp16=args.fp16))
    except VerificationError as exc:
        print(f"ssd export: verification failed, {args.out} not written: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    if artifact.report is not None:
        print(
            f"verified against PyTorch with ONNX Runtime (CPU): {artifact.report.summary()}", file=sys.stderr
        )
    if artifact.fp16_agreement is not None:
        found, total = artifact.fp16_agreement
        print(
            f"float16: {found} of {total} float32 detections above 0.3 kept (boxes within 2e-3)",
            file=sys.stderr,
        )
    print(f"wrote {artifact.path} in {seconds:.1f} s", file=sys.stderr)
    print(json.dumps({"path": str(artifact.path), "sha256": artifact.sha256, "metadata": artifact.metadata}))
    return 0
