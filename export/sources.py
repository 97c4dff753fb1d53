"""Where an export's network comes from: one of our training checkpoints, or torchvision's own
SSD models and weights. Each gives the network, its class names, a ``source`` for the metadata
and the reference the artifact is verified against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.checkpoint import load_model, sha256
from model.postprocess import PostprocessConfig
from model.registry import MODELS
from model.ssd import SSD
from model.weights import build_from_weights

from .cli import TORCHVISION_MODELS
from .verify import Outputs


@dataclass
class Source:
    model: SSD  # eval mode
    classes: list[str]  # without the background
    source: str  # checkpoint sha256 or torchvision weights name, for the metadata
    metrics: dict[str, Any] = field(default_factory=dict)
    # Builds the verification reference for a post-processing config; None: the eager
    # export graph is the reference (our own models).
    torchvision_reference: Callable[[PostprocessConfig], Callable[[np.ndarray], Outputs]] | None = None


def from_checkpoint(path: str | Path) -> Source:
    """A training checkpoint (``ssd train``'s best.pt or last.pt). Raises CheckpointError."""
    model, checkpoint = load_model(path)
    metrics = checkpoint.get("metrics") or {}
    val = metrics.get("val", metrics) if isinstance(metrics, dict) else {}
    kept = {k: v for k, v in val.items() if isinstance(v, int | float)}
    if "epoch" in checkpoint:
        kept["epoch"] = checkpoint["epoch"]  # epochs completed
    return Source(model, list(checkpoint["classes"]), f"sha256:{sha256(path)}", kept)


def from_torchvision(name: str, weights: str | Path) -> Source:
    """torchvision's ``name`` with ``weights``: an enum name such as ``COCO_V1`` (from the hub
    cache, as torchvision loads it) or a state-dict file. Raises WeightsError."""
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"--torchvision takes one of {', '.join(TORCHVISION_MODELS)}, not {name!r}")
    model, loaded = build_from_weights(name, weights)
    model.eval()
    categories = loaded.categories
    num_classes = model.num_classes
    if categories and len(categories) == num_classes:
        classes = list(categories[1:])  # torchvision lists the background first
    else:
        classes = [f"class_{i}" for i in range(num_classes - 1)]
    state_dict = loaded.state_dict

    def reference(config: PostprocessConfig) -> Callable[[np.ndarray], Outputs]:
        return torchvision_detector(name, num_classes, state_dict, config)

    source = loaded.source if not Path(str(weights)).exists() else f"{name}:{Path(weights).name}"
    return Source(model, classes, source, {}, reference)


def torchvision_detector(
    name: str, num_classes: int, state_dict: dict[str, torch.Tensor], config: PostprocessConfig
) -> Callable[[np.ndarray], Outputs]:
    """torchvision's own model with ``state_dict`` and our thresholds, as a function of uint8
    NHWC batches to padded, normalised outputs: the yardstick for torchvision exports."""
    from torchvision.models import detection

    tv: nn.Module = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)
    tv.load_state_dict(state_dict)
    tv.eval()
    tv.score_thresh = config.score_threshold
    tv.nms_thresh = config.iou_threshold
    tv.topk_candidates = config.topk_candidates
    tv.detections_per_img = config.max_detections
    height, width = MODELS[name].input_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    k = config.max_detections

    @torch.no_grad()
    def run(images: np.ndarray) -> Outputs:
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        results = tv(list(batch))
        out = Outputs(
            np.zeros(len(images), np.int64),
            np.zeros((len(images), k, 4), np.float32),
            np.zeros((len(images), k), np.float32),
            np.full((len(images), k), -1, np.int64),
        )
        for i, r in enumerate(results):
            boxes = r["boxes"] / scale
            # torchvision keeps boxes that clipping flattened to zero area; the artifact drops them.
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            n = int(keep.sum())
            out.num_detections[i] = n
            out.boxes[i, :n] = boxes[keep].numpy()
            out.scores[i, :n] = r["scores"][keep].numpy()
            out.labels[i, :n] = r["labels"][keep].numpy() - 1  # torchvision counts the background
        return out

    return run
