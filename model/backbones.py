"""Feature extractors: a classification network cut and extended into SSD's multi-scale maps.

Each returns an ``OrderedDict`` of feature maps, largest first, and has a ``features``
attribute holding the base network (what ``freeze_base`` freezes) and an ``extra`` ModuleList
holding the added layers. Parameter names follow torchvision's SSD feature extractors, so
torchvision's SSD checkpoints load into ours.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum, mobilenet_v3_large, resnet50, vgg16
from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers


def xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _extra_vgg_block(
    in_channels: int, mid: int, out: int, kernel: int, stride: int, padding: int
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out, kernel_size=kernel, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


def vgg16_extractor(features: nn.Sequential, highres: bool) -> SSDFeatureExtractorVGG:
    """VGG16 to conv4_3 (L2-normalised, learnable scale 20), dilated fc6/fc7 and the extra layers.

    SSD300 is torchvision's extractor as it is. For SSD512 we build the extra layers of the
    paper's Caffe model (conv8_2 to conv11_2 with stride 2 and padding 1, then conv12_2 with a 4x4
    kernel and padding 1: maps of 64, 32, 16, 8, 4, 2, 1 cells, 24564 boxes). torchvision's
    ``highres`` option leaves conv10_2 and conv11_2 unpadded, which gives 6x6 and 4x4 maps.
    """
    extractor = SSDFeatureExtractorVGG(features, highres=False)
    if highres:
        extras = [
            _extra_vgg_block(1024, 256, 512, 3, 2, 1),  # conv8_2: 32 -> 16
            _extra_vgg_block(512, 128, 256, 3, 2, 1),  # conv9_2: 16 -> 8
            _extra_vgg_block(256, 128, 256, 3, 2, 1),  # conv10_2: 8 -> 4
            _extra_vgg_block(256, 128, 256, 3, 2, 1),  # conv11_2: 4 -> 2
            _extra_vgg_block(256, 128, 256, 4, 1, 1),  # conv12_2: 2 -> 1
        ]
        for block in extras:
            xavier_init(block)
        extractor.extra = nn.ModuleList([extractor.extra[0], *extras])
    return extractor


# A backbone builder takes ``weights``: None (random), "imagenet" (torchvision's weights enum,
# downloaded or read from torch's hub cache) or a state dict of the classification network.
BackboneWeights = Literal["imagenet"] | dict[str, Tensor] | None


def imagenet_weights(backbone: str) -> WeightsEnum:
    """The torchvision weights that ``"imagenet"`` means for ``backbone`` (a BACKBONES name)."""
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, VGG16_Weights

    return {
        "vgg16": VGG16_Weights.IMAGENET1K_FEATURES,
        "vgg16_highres": VGG16_Weights.IMAGENET1K_FEATURES,
        "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    }[backbone]


def _load(net: nn.Module, weights: BackboneWeights) -> nn.Module:
    if isinstance(weights, dict):
        net.load_state_dict(weights)
    return net


def build_vgg16(highres: bool, weights: BackboneWeights) -> nn.Module:
    from torchvision.models import VGG16_Weights

    # torchvision's SSD uses the "features only" VGG16 weights, trained on 0-255 Caffe-style input.
    if weights == "imagenet":
        return vgg16_extractor(vgg16(weights=VGG16_Weights.IMAGENET1K_FEATURES).features, highres)
    # Only the conv layers: VGG16's classifier (100M parameters, seconds to initialise) is unused.
    features = make_layers(vgg_cfgs["D"])
    for layer in features.modules():
        if isinstance(layer, nn.Conv2d):  # VGG's own initialisation
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    if isinstance(weights, dict):
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in weights.items() if k.startswith("features.")}
        )
    return vgg16_extractor(features, highres)


def mobilenet_norm_layer() -> Callable[..., nn.Module]:
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def build_mobilenet_v3_large(weights: BackboneWeights, pretrained_layout: bool | None = None) -> nn.Module:
    """MobileNetV3-Large cut at C4's expansion layer and C5, plus four depthwise extra blocks.

    As torchvision's ``ssdlite320_mobilenet_v3_large``: the reduced tail (Table 6 of the
    MobileNetV3 paper) when training from scratch, the full one with ImageNet weights.
    ``pretrained_layout`` chooses the full tail without weights (to load a checkpoint that was
    trained from them); None: whether ``weights`` are given.
    """
    from torchvision.models import MobileNet_V3_Large_Weights

    pretrained = weights is not None if pretrained_layout is None else pretrained_layout
    enum = MobileNet_V3_Large_Weights.IMAGENET1K_V1 if weights == "imagenet" else None
    backbone = mobilenet_v3_large(
        weights=enum, norm_layer=mobilenet_norm_layer(), reduced_tail=not pretrained
    )
    if weights is not None:
        _load(backbone, weights)
    else:
        normal_init(backbone)
    features = backbone.features
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    c4 = strided[-1]  # the last strided block: C4 is cut at its expansion layer
    return SSDLiteFeatureExtractorMobileNet(features, c4, mobilenet_norm_layer())


class ResNet50Extractor(nn.Module):
    """NVIDIA's SSD300 backbone: ResNet-50 to its conv4 stage, with conv4's stride removed
    (38x38 maps at 300 pixels), then five extra blocks with batch norm (maps 19, 10, 5, 3, 1)."""

    out_channels = (1024, 512, 512, 256, 256, 256)

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        conv4_first = resnet.layer3[0]
        conv4_first.conv1.stride = (1, 1)
        conv4_first.conv2.stride = (1, 1)
        conv4_first.downsample[0].stride = (1, 1)
        self.features = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3
        )
        extra = []
        mids = (256, 256, 128, 128, 128)
        for i, (cin, cout, mid) in enumerate(
            zip(self.out_channels[:-1], self.out_channels[1:], mids, strict=True)
        ):
            stride, padding = (2, 1) if i < 3 else (1, 0)
            extra.append(
                nn.Sequential(
                    nn.Conv2d(cin, mid, kernel_size=1, bias=False),
                    nn.BatchNorm2d(mid),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(mid, cout, kernel_size=3, stride=stride, padding=padding, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )
            )
        self.extra = nn.ModuleList(extra)
        xavier_init(self.extra)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.features(x)
        outputs = [x]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(outputs))


def build_resnet50(weights: BackboneWeights) -> nn.Module:
    from torchvision.models import ResNet50_Weights

    # NVIDIA's recipe starts from torchvision's original ImageNet weights (V1).
    enum = ResNet50_Weights.IMAGENET1K_V1 if weights == "imagenet" else None
    return ResNet50Extractor(_load(resnet50(weights=enum), weights))


@torch.no_grad()
def feature_shapes(backbone: nn.Module, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, h, w) of each feature map for an input of ``image_size``, without computing any.

    Runs the backbone on the meta device (shapes only), so that building SSD512 costs no
    forward pass.
    """
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*backbone.named_parameters(), *backbone.named_buffers()]
    }
    was_training = backbone.training
    backbone.eval()
    try:
        out = torch.func.functional_call(
            backbone, meta, (torch.empty(1, 3, *image_size, device="meta"),), strict=False
        )
    finally:
        backbone.train(was_training)
    return [(int(f.shape[1]), int(f.shape[2]), int(f.shape[3])) for f in out.values()]
