"""The SSD model family: networks, default boxes, matching, loss and post-processing."""

from .loss import LossParts, MultiBoxLoss
from .matching import match, pad_targets
from .postprocess import Detections, PostprocessConfig, postprocess
from .registry import MODELS, build_model, get_spec
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
    "postprocess",
]
