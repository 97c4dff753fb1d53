"""The model family by name, and the one function that builds any of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from . import backbones
from .priors import (
    SSD300_COCO_SCALES,
    SSD300_VOC_SCALES,
    SSD512_COCO_SCALES,
    SSD512_VOC_SCALES,
    PriorConfig,
    linear_scales,
)
from .ssd import SSD

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's VGG16 "features" weights take Caffe-style 0-255 input minus the mean.
VGG_MEAN = (0.48235, 0.45882, 0.40784)
VGG_STD = (1.0 / 255, 1.0 / 255, 1.0 / 255)

_RATIOS_6 = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
_RATIOS_7 = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    aspect_ratios: tuple[tuple[int, ...], ...]
    scale_sets: Mapping[str, tuple[float, ...]]  # the first is the default
    steps: tuple[int, ...] | None
    build_backbone: Callable[[backbones.BackboneWeights], nn.Module]
    build_head: Callable[[list[int], list[int], int], nn.Module]
    description: str = ""
    torchvision_name: str | None = None  # torchvision's builder with the same state dict, if any
    extra: dict[str, Any] = field(default_factory=dict)

    def prior_config(self, scale_set: str | None = None) -> PriorConfig:
        key = scale_set or next(iter(self.scale_sets))
        if key not in self.scale_sets:
            raise ValueError(f"{self.name} has no scale set {key!r}; it has {sorted(self.scale_sets)}")
        return PriorConfig(self.aspect_ratios, self.scale_sets[key], self.steps)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="ssd300_vgg16",
            input_size=(300, 300),
            image_mean=VGG_MEAN,
            image_std=VGG_STD,
            aspect_ratios=_RATIOS_6,
            scale_sets={"coco": SSD300_COCO_SCALES, "voc": SSD300_VOC_SCALES},
            steps=(8, 16, 32, 64, 100, 300),
            build_backbone=lambda w: backbones.build_vgg16(highres=False, weights=w),
            build_head=SSDHead,
            description="SSD300, VGG16 with L2Norm on conv4_3 (the paper's model); 8732 default boxes",
            torchvision_name="ssd300_vgg16",
        ),
        ModelSpec(
            name="ssd512_vgg16",
            input_size=(512, 512),
            image_mean=VGG_MEAN,
            image_std=VGG_STD,
            aspect_ratios=_RATIOS_7,
            scale_sets={"coco": SSD512_COCO_SCALES, "voc": SSD512_VOC_SCALES},
            steps=(8, 16, 32, 64, 128, 256, 512),
            build_backbone=lambda w: backbones.build_vgg16(highres=True, weights=w),
            build_head=SSDHead,
            description="SSD512, VGG16 with L2Norm and the paper's conv12_2; 24564 default boxes",
        ),
        ModelSpec(
            name="ssdlite320_mobilenet_v3_large",
            input_size=(320, 320),
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            aspect_ratios=((2, 3),) * 6,
            # "small" starts at 8% (26 px) instead of 20% (64 px): for data with many small
            # objects, such as the synthetic set (3% to 80% of the side), where 64-px boxes
            # overlap a 20-px object by IoU < 0.1 and every such object trains a single prior.
            scale_sets={
                "default": linear_scales(6, 0.2, 0.95),
                "small": linear_scales(6, 0.08, 0.95),
            },
            steps=None,
            build_backbone=backbones.build_mobilenet_v3_large,
            build_head=lambda channels, anchors, classes: SSDLiteHead(
                channels, anchors, classes, backbones.mobilenet_norm_layer()
            ),
            description="SSDlite320, MobileNetV3-Large with depthwise heads; 3234 default boxes",
            torchvision_name="ssdlite320_mobilenet_v3_large",
        ),
        ModelSpec(
            name="ssd300_resnet50",
            input_size=(300, 300),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            aspect_ratios=_RATIOS_6,
            scale_sets={"coco": SSD300_COCO_SCALES, "voc": SSD300_VOC_SCALES},
            steps=(8, 16, 32, 64, 100, 300),
            build_backbone=backbones.build_resnet50,
            build_head=SSDHead,
            description="SSD300, ResNet-50 to conv4, batch-norm extra layers (NVIDIA's variant); 8732 boxes",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


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
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be >= 2 (got {num_classes})")
    weights = _backbone_weights(spec, backbone_weights)
    try:
        backbone = spec.build_backbone(weights)
    except OSError as exc:  # URLError is an OSError: no network, or the download failed
        log.warning(
            "could not get ImageNet weights for %s's backbone (%s); starting from random initialisation. "
            "Pass a local file with backbone_weights=PATH.",
            name,
            exc,
        )
        backbone = spec.build_backbone(None)
    shapes = backbones.feature_shapes(backbone, spec.input_size)
    prior_config = spec.prior_config(scale_set)
    channels = [c for c, _, _ in shapes]
    head = spec.build_head(channels, prior_config.boxes_per_location, num_classes)
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
