"""The artifact's self-description (ONNX ``metadata_props``), as docs/reference.md lists it ("The
model artifact": a test holds the two to each other).

Every value is a string (ONNX's rule); lists, sizes and metrics are JSON. Beyond the contract's
keys we record what a reader needs to run or compare artifacts without guessing: the output
format, the NMS mode, the top-k before NMS, the precision and the producer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from model.postprocess import PostprocessConfig

FORMAT_VERSION = "1"


def _producer() -> str:
    try:
        return f"ssd-detector {version('ssd-detector')}"
    except PackageNotFoundError:
        return "ssd-detector"


def build_metadata(
    *,
    model_name: str,
    classes: Sequence[str],
    input_size: tuple[int, int],
    config: PostprocessConfig,
    source: str,
    metrics: Mapping[str, Any] | None = None,
    raw: bool = False,
    fp16: bool = False,
    created_at: datetime | None = None,
) -> dict[str, str]:
    created = (created_at or datetime.now(UTC)).replace(microsecond=0)
    return {
        "classes": json.dumps(list(classes)),
        "model": model_name,
        "input_size": json.dumps(list(input_size)),
        "score_threshold": repr(config.score_threshold),
        "iou_threshold": repr(config.iou_threshold),
        "max_detections": str(config.max_detections),
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "source": source,
        "metrics": json.dumps(dict(metrics or {}), sort_keys=True),
        # Beyond the contract:
        "version": created.strftime("%Y%m%dT%H%M%SZ"),
        "topk_candidates": str(config.topk_candidates),
        "nms": "none" if raw else ("class_agnostic" if config.class_agnostic else "per_class"),
        "outputs": "raw" if raw else "detections",
        "precision": "fp16" if fp16 else "fp32",
        "format_version": FORMAT_VERSION,
        "producer": _producer(),
    }
