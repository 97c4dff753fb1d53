from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

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
def lite_model():
    """SSDlite320 for the 6 synthetic classes, random weights with batch-norm statistics from
    synthetic scenes, so that it detects plenty."""
    from helpers import calibrated

    from model.data.synth import CLASSES

    return calibrated("ssdlite320_mobilenet_v3_large", len(CLASSES) + 1)


@pytest.fixture(scope="session")
def lite_checkpoint(lite_model, tmp_path_factory) -> Path:
    """``lite_model`` in ``ssd train``'s checkpoint format."""
    from model.data.synth import CLASSES

    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(
        {
            "model": lite_model.state_dict(),
            "model_name": "ssdlite320_mobilenet_v3_large",
            "num_classes": len(CLASSES) + 1,
            "scale_set": None,
            "classes": list(CLASSES),
            "epoch": 4,
            "metrics": {"val": {"map": 0.61, "map50": 0.93, "map75": 0.7, "voc07_map": 0.9, "per_class": {}}},
        },
        path,
    )
    return path


@dataclass(frozen=True)
class Exported:
    path: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def exported(lite_checkpoint, tmp_path_factory) -> Exported:
    """``ssd export --checkpoint`` of ``lite_checkpoint``, run once for the session (an export
    costs 10-25 s): what it wrote and printed."""
    import cli

    out = tmp_path_factory.mktemp("artifact") / "model.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_info, redirect_stdout(stdout), redirect_stderr(stderr):
        cli.main(["export", "--checkpoint", str(lite_checkpoint), "--out", str(out)])
    assert exit_info.value.code == 0, stderr.getvalue()
    return Exported(out, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def served_artifact(exported) -> Path:
    """A small verified artifact (``lite_model``, exported): for the service tests."""
    return exported.path
