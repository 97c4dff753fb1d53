"""Building a registered model: a ``ModelSpec`` (registry.py) to an ``SSD`` network."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from . import backbones
from .registry import ModelSpec, get_spec
from .ssd import SSD

log = logging.getLogger(__name__)

# (weights, pretrained layout) -> backbone; only MobileNetV3's layout depends on its weights.
BACKBONES: dict[str, Callable[[backbones.BackboneWeights, bool | None], nn.Module]] = {
    "vgg16": lambda w, _: backbones.build_vgg16(highres=False, weights=w),
    "vgg16_highres": lambda w, _: backbones.build_vgg16(highres=True, weights=w),
    "mobilenet_v3_large": backbones.build_mobilenet_v3_large,
    "resnet50": lambda w, _: backbones.build_resnet50(w),
}
# (feature channels, boxes per location, classes) -> head
HEADS: dict[str, Callable[[list[int], list[int], int], nn.Module]] = {
    "ssd": SSDHead,
    "ssdlite": lambda channels, anchors, classes: SSDLiteHead(
        channels, anchors, classes, backbones.mobilenet_norm_layer()
    ),
}


def _backbone_weights(spec: ModelSpec, weights: str | Path | None) -> backbones.BackboneWeights:
    if weights is None:
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))


def build_model(
    name: str,
    num_classes: int,
    *,
    backbone_weights: str | Path | None = None,
    freeze_base: bool = False,
    scale_set: str | None = None,
    pretrained_layout: bool | None = None,
) -> SSD:
    """Build a registered SSD.

    Args:
        name: one of ``MODELS``.
        num_classes: object classes + 1 (background), torchvision's convention, e.g. 21 for VOC.
        backbone_weights: ``None`` (random), ``"imagenet"`` (torchvision's ImageNet weights for the
            backbone: downloaded, or read from torch's hub cache; with no network, a warning and
            random initialisation), or the path of a state dict of the classification network.
        freeze_base: do not train the base network (the pretrained part of the backbone).
        scale_set: default box sizes, e.g. ``"coco"`` (default) or ``"voc"`` for the SSD300/512 models.
        pretrained_layout: build the backbone as for pretrained weights, whether or not they are
            loaded (SSDlite's MobileNetV3 has a smaller tail from scratch); None: whether
            ``backbone_weights`` are given. Checkpoints record it (``pretrained_layout``).
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be >= 2 (got {num_classes})")
    weights = _backbone_weights(spec, backbone_weights)
    try:
        backbone = BACKBONES[spec.backbone](weights, pretrained_layout)
    except OSError as exc:  # URLError is an OSError: no network, or the download failed
        log.warning(
            "could not get ImageNet weights for %s's backbone (%s); starting from random initialisation. "
            "Pass a local file with backbone_weights=PATH.",
            name,
            exc,
        )
        backbone = BACKBONES[spec.backbone](None, pretrained_layout)
    shapes = backbones.feature_shapes(backbone, spec.input_size)
    prior_config = spec.prior_config(scale_set)
    channels = [c for c, _, _ in shapes]
    head = HEADS[spec.head](channels, prior_config.boxes_per_location, num_classes)
    model = SSD(
        name=name,
        backbone=backbone,
        head=head,
        num_classes=num_classes,
        input_size=spec.input_size,
        image_mean=spec.image_mean,
        image_std=spec.image_std,
        prior_config=prior_config,
        feature_sizes=[(h, w) for _, h, w in shapes],
    )
    if freeze_base:
        model.freeze_base()
    return model
