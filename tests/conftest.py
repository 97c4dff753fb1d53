from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList


def random_boxes(generator: torch.Generator, count: int, size: float = 1.0) -> torch.Tensor:
    """``count`` valid xyxy boxes inside [0, size], sides from 2% to 70% of it."""
    wh = (torch.rand(count, 2, generator=generator) * 0.68 + 0.02) * size
    xy = torch.rand(count, 2, generator=generator) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def torchvision_anchors(
    generator: DefaultBoxGenerator, image_size: tuple[int, int], feature_sizes
) -> torch.Tensor:
    """torchvision's default boxes, xyxy in pixels, for one image of ``image_size`` (H, W)."""
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    return generator(images, features)[0]


@pytest.fixture(scope="session")
def torchvision_ssd():
    """A torchvision SSD instance, for its compute_loss and postprocess_detections (which only use
    its box coder, matcher and thresholds, not its network)."""
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    model.score_thresh, model.nms_thresh, model.topk_candidates, model.detections_per_img = (
        0.01,
        0.45,
        400,
        200,
    )
    return model.eval()


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory):
    """A small verified artifact (SSDlite320, 6 synthetic classes, random weights with batch-norm
    statistics from synthetic scenes, so that it detects plenty): for the service tests."""
    from helpers import calibrated

    from export.exporter import export_artifact
    from export.sources import Source
    from model.data.synth import CLASSES

    model = calibrated("ssdlite320_mobilenet_v3_large", len(CLASSES) + 1)
    path = tmp_path_factory.mktemp("artifact") / "model.onnx"
    export_artifact(Source(model, list(CLASSES), "test"), path)
    return path
