"""Where an export's network comes from: one of our training checkpoints, or torchvision's own
SSD models and weights. Each gives the network, its class names, a ``source`` for the metadata
and the reference the artifact is verified against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import load_model, sha256
from model.config import PostprocessConfig
from model.registry import TORCHVISION_MODELS
from model.ssd import SSD
from model.weights import build_from_weights

from .reference import Reference, torchvision_reference


@dataclass
class Source:
    model: SSD  # eval mode
    classes: list[str]  # without the background
    source: str  # checkpoint sha256 or torchvision weights name, for the metadata
    metrics: dict[str, Any] = field(default_factory=dict)
    # Builds the verification reference for a post-processing config; None: the eager
    # export graph is the reference (our own models).
    reference: Callable[[PostprocessConfig], Reference] | None = None


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

    def reference(config: PostprocessConfig) -> Reference:
        return torchvision_reference(name, num_classes, state_dict, config)

    source = loaded.source if not Path(str(weights)).exists() else f"{name}:{Path(weights).name}"
    return Source(model, classes, source, {}, reference)
