import math

import pytest
import torch
from conftest import torchvision_anchors
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from model import build_model
from model.box_coding import cxcywh_to_xyxy
from model.config import SSD300_COCO_SCALES, SSD300_VOC_SCALES, PriorConfig, linear_scales
from model.priors import default_boxes

SSD300_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_STEPS = (8, 16, 32, 64, 100, 300)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("ssd300_vgg16", 8732),
        ("ssd512_vgg16", 24564),
        ("ssdlite320_mobilenet_v3_large", 3234),
        ("ssd300_resnet50", 8732),
    ],
)
def test_default_box_counts(name, count):
    model = build_model(name, num_classes=3).eval()
    assert model.num_priors == count
    cls_logits, regression = model(torch.rand(1, 3, *model.input_size))
    assert cls_logits.shape == (1, count, 3) and regression.shape == (1, count, 4)


def test_ssdlite_count_equals_torchvision():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    images = torch.rand(1, 3, 320, 320)
    features = list(tv.backbone(images).values())
    anchors = tv.anchor_generator(tv.transform(list(images))[0], features)[0]
    ours = build_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert anchors.shape[0] == ours.num_priors == 3234
    torch.testing.assert_close(cxcywh_to_xyxy(ours.priors) * 320, anchors, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("config", "image_size", "feature_sizes"),
    [
        (PriorConfig(SSD300_RATIOS, SSD300_COCO_SCALES, SSD300_STEPS), (300, 300), SSD300_MAPS),
        (PriorConfig(SSD300_RATIOS, SSD300_VOC_SCALES, SSD300_STEPS), (300, 300), SSD300_MAPS),
        (
            PriorConfig(((2, 3),) * 6, linear_scales(6, 0.2, 0.95)),
            (320, 320),
            [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
        ),
        # Non-square inputs, with and without steps: W and H must not be swapped.
        (
            PriorConfig(SSD300_RATIOS, SSD300_COCO_SCALES, SSD300_STEPS),
            (300, 500),
            [(38, 63), (19, 32), (10, 16), (5, 8), (3, 4), (1, 2)],
        ),
        (PriorConfig(((2, 3),) * 3, linear_scales(3, 0.2, 0.9)), (240, 400), [(12, 20), (6, 10), (3, 5)]),
        (PriorConfig(((2,),) * 2, (0.3, 0.6, 1.2), clip=False), (64, 96), [(4, 6), (2, 3)]),
    ],
)
def test_equal_to_torchvision_default_box_generator(config, image_size, feature_sizes):
    reference = DefaultBoxGenerator(
        [list(r) for r in config.aspect_ratios],
        scales=list(config.scales),
        steps=list(config.steps) if config.steps else None,
        clip=config.clip,
    )
    expected = torchvision_anchors(reference, image_size, feature_sizes)
    ours = default_boxes(config, image_size, feature_sizes)
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    assert ours.shape == expected.shape
    torch.testing.assert_close(cxcywh_to_xyxy(ours) * scale, expected, atol=1e-4, rtol=1e-6)


def test_non_square_centres_follow_width_and_height():
    # 200 high, 400 wide, 4x8 cells with a 50-pixel step: x centres over the width, y over the height.
    config = PriorConfig(((2,),), (0.2, 0.4), steps=(50,))
    boxes = default_boxes(config, (200, 400), [(4, 8)]).view(4, 8, 4, 4)
    assert torch.allclose(boxes[0, :, 0, 0], (torch.arange(8) + 0.5) * 50 / 400)
    assert torch.allclose(boxes[:, 0, 0, 1], (torch.arange(4) + 0.5) * 50 / 200)


def test_box_shapes_follow_the_paper():
    config = PriorConfig(SSD300_RATIOS, SSD300_VOC_SCALES, SSD300_STEPS, clip=False)
    boxes = default_boxes(config, (300, 300), SSD300_MAPS)
    first = boxes[:4]  # the first cell of conv4_3: ratio 1, the extra ratio-1 box, then 2 and 1/2
    s, s_next = SSD300_VOC_SCALES[:2]
    assert first[0, 2:].tolist() == pytest.approx([s, s])  # 30 px, the VOC set's smallest
    assert first[1, 2:].tolist() == pytest.approx([math.sqrt(s * s_next)] * 2)
    assert first[2, 2:].tolist() == pytest.approx([s * math.sqrt(2), s / math.sqrt(2)])
    assert first[3, 2:].tolist() == pytest.approx([s / math.sqrt(2), s * math.sqrt(2)])
    assert [round(v * 300) for v in SSD300_VOC_SCALES] == [30, 60, 111, 162, 213, 264, 315]
    assert [round(v * 300) for v in SSD300_COCO_SCALES] == [21, 45, 99, 153, 207, 261, 315]


def test_clip_bounds_width_and_height():
    config = PriorConfig(SSD300_RATIOS, SSD300_COCO_SCALES, SSD300_STEPS)
    boxes = default_boxes(config, (300, 300), SSD300_MAPS)
    assert boxes[:, 2:].max() <= 1.0 and boxes[:, 2:].min() > 0


def test_config_is_checked():
    with pytest.raises(ValueError, match="one scale per feature map"):
        PriorConfig(SSD300_RATIOS, (0.1, 0.2))
    with pytest.raises(ValueError, match="feature maps"):
        default_boxes(PriorConfig(SSD300_RATIOS, SSD300_COCO_SCALES), (300, 300), SSD300_MAPS[:3])
