"""The SSD model family: networks, default boxes, matching, loss and post-processing.

Names are loaded on first use (PEP 562): ``model.registry`` and ``model.config`` import no torch,
and importing them must not pull in the torch modules through this package. The function
``postprocess`` is imported from ``model.postprocess``: a name shared with its submodule cannot be
loaded lazily (importing the submodule sets the package attribute to the module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "MODELS": "registry",
    "get_spec": "registry",
    "PostprocessConfig": "config",
    "build_model": "build",
    "SSD": "ssd",
    "Detections": "postprocess",
    "LossParts": "loss",
    "MultiBoxLoss": "loss",
    "match": "matching",
    "pad_targets": "matching",
}

if TYPE_CHECKING:
    from .build import build_model
    from .config import PostprocessConfig
    from .loss import LossParts, MultiBoxLoss
    from .matching import match, pad_targets
    from .postprocess import Detections
    from .registry import MODELS, get_spec
    from .ssd import SSD

__all__ = [
    "MODELS",
    "SSD",
    "Detections",
    "LossParts",
    "MultiBoxLoss",
    "PostprocessConfig",
    "build_model",
    "get_spec",
    "match",
    "pad_targets",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
