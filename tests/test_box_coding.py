import torch
from conftest import random_boxes
from torchvision.models.detection._utils import BoxCoder

from model.box_coding import MAX_LOG_SCALE, cxcywh_to_xyxy, decode, encode, xyxy_to_cxcywh


def _priors(g, n):
    return xyxy_to_cxcywh(random_boxes(g, n))


def test_encode_decode_round_trip_batched():
    g = torch.Generator().manual_seed(0)
    priors = _priors(g, 50)
    boxes = torch.stack([random_boxes(g, 50), random_boxes(g, 50)])  # [2, 50, 4]
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes, atol=1e-5, rtol=1e-5)


def test_equal_to_torchvision_box_coder():
    g = torch.Generator().manual_seed(1)
    priors = _priors(g, 200)
    boxes = random_boxes(g, 200)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchors = cxcywh_to_xyxy(priors)
    torch.testing.assert_close(
        encode(boxes, priors), coder.encode_single(boxes, anchors), atol=1e-4, rtol=1e-5
    )
    deltas = torch.randn(200, 4, generator=g)
    torch.testing.assert_close(
        decode(deltas, priors), coder.decode_single(deltas, anchors), atol=1e-5, rtol=1e-5
    )


def test_decode_clamps_log_scale_so_half_precision_stays_finite():
    priors = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float16)
    huge = torch.tensor([[[0.0, 0.0, 1e4, 1e4]]], dtype=torch.float16)
    boxes = decode(huge, priors)
    assert torch.isfinite(boxes).all()
    width = float(boxes[0, 0, 2] - boxes[0, 0, 0])
    assert abs(width - 0.5 * torch.exp(torch.tensor(MAX_LOG_SCALE)).item()) / width < 1e-2
