"""The model family by name: every fact about a model in one place, importing no torch.

A ``ModelSpec`` holds what a model is (input size, normalisation, default box layout, backbone
and head kinds), where torchvision publishes the same network (``torchvision_name``) and how to
train it (``recipe``). ``build.py`` turns a spec into a network; the ``ssd`` command's parsers
and the serving path read the specs without loading torch (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import (
    SSD300_COCO_SCALES,
    SSD300_VOC_SCALES,
    SSD512_COCO_SCALES,
    SSD512_VOC_SCALES,
    PriorConfig,
    Recipe,
    linear_scales,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's VGG16 "features" weights take Caffe-style 0-255 input minus the mean.
VGG_MEAN = (0.48235, 0.45882, 0.40784)
VGG_STD = (1.0 / 255, 1.0 / 255, 1.0 / 255)

_RATIOS_6 = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
_RATIOS_7 = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))

# Caffe SSD and torchvision's references: lr 1e-3 to 2e-3 at batch 32, steps at 2/3 and 11/12.
_VGG_RECIPE = Recipe(0.002, 32, 5e-4, "multistep", (2 / 3, 11 / 12))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    aspect_ratios: tuple[tuple[int, ...], ...]
    scale_sets: Mapping[str, tuple[float, ...]]  # the first is the default
    steps: tuple[int, ...] | None
    backbone: str  # a key of build.BACKBONES
    head: str  # a key of build.HEADS
    recipe: Recipe  # the published training defaults
    description: str = ""
    torchvision_name: str | None = None  # torchvision's builder with the same state dict, if any

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
            backbone="vgg16",
            head="ssd",
            recipe=_VGG_RECIPE,
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
            backbone="vgg16_highres",
            head="ssd",
            recipe=_VGG_RECIPE,
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
            backbone="mobilenet_v3_large",
            head="ssdlite",
            # torchvision's SSDlite: lr 0.15 at batch 192 (8 x 24), cosine, weight decay 4e-5,
            # from scratch, no photometric distortion or zoom out.
            recipe=Recipe(
                0.15, 192, 4e-5, "cosine", backbone_weights=None, photometric=False, zoom_out=False
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
            backbone="resnet50",
            head="ssd",
            # NVIDIA's SSD300 ResNet-50: lr 2.6e-3 at batch 32, steps at epochs 43 and 54 of 65.
            recipe=Recipe(0.0026, 32, 5e-4, "multistep", (43 / 65, 54 / 65)),
            description="SSD300, ResNet-50 to conv4, batch-norm extra layers (NVIDIA's variant); 8732 boxes",
        ),
    ]
}

# The models whose torchvision builder takes our state dicts: ``ssd export --torchvision``.
TORCHVISION_MODELS = tuple(name for name, spec in MODELS.items() if spec.torchvision_name)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]
