import torch
from test_loss import ANCHORS, PRIORS

from model import PostprocessConfig, postprocess


def _head_outputs(seed, batch, num_classes=21, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(batch, len(PRIORS), num_classes, generator=g) * sharp
    regression = torch.randn(batch, len(PRIORS), 4, generator=g) * 0.5
    return cls_logits, regression


def _assert_same(ours, theirs, size=300):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert len(a["scores"]) == len(b["scores"]), f"image {i}: {len(a['scores'])} vs {len(b['scores'])}"
        assert torch.equal(a["labels"] + 1, b["labels"]), f"image {i}"
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"] * size, b["boxes"], rtol=0, atol=1e-3)


def test_equal_to_torchvision_postprocess(torchvision_ssd):
    # Random logits: every default box is a candidate for every class (the worst case).
    cls_logits, regression = _head_outputs(0, batch=3)
    expected = torchvision_ssd.postprocess_detections(
        {"cls_logits": cls_logits, "bbox_regression": regression}, [ANCHORS] * 3, [(300, 300)] * 3
    )
    ours = postprocess(cls_logits, regression, PRIORS, PostprocessConfig(remove_empty=False))
    assert all(len(e["scores"]) == 200 for e in expected)
    _assert_same(ours.per_image(), expected)


def test_equal_to_torchvision_with_few_candidates(torchvision_ssd):
    # Confident background almost everywhere: the score threshold, not top-k, decides.
    cls_logits, regression = _head_outputs(1, batch=2, sharp=1.0)
    cls_logits[..., 0] += 12.0
    g = torch.Generator().manual_seed(11)
    for image in range(2):  # a few dozen confident objects
        where = torch.randint(0, len(PRIORS), (60,), generator=g)
        cls_logits[image, where, torch.randint(1, 21, (60,), generator=g)] += 15.0 + torch.rand(
            60, generator=g
        )
    expected = torchvision_ssd.postprocess_detections(
        {"cls_logits": cls_logits, "bbox_regression": regression}, [ANCHORS] * 2, [(300, 300)] * 2
    )
    ours = postprocess(cls_logits, regression, PRIORS, PostprocessConfig(remove_empty=False))
    assert 0 < len(expected[0]["scores"]) < 200
    _assert_same(ours.per_image(), expected)


def test_padding_and_order():
    cls_logits, regression = _head_outputs(2, batch=2, sharp=8.0)
    cls_logits[0, :, 0] += 100.0  # image 0: nothing but background
    det = postprocess(cls_logits, regression, PRIORS, PostprocessConfig(max_detections=50))
    assert det.boxes.shape == (2, 50, 4) and det.labels.dtype == torch.int64
    assert det.num_detections[0] == 0 and (det.labels[0] == -1).all() and (det.scores[0] == 0).all()
    n = int(det.num_detections[1])
    assert 0 < n <= 50
    assert (det.scores[1, : n - 1] >= det.scores[1, 1:n]).all()
    assert (det.labels[1, :n] >= 0).all() and (det.labels[1, n:] == -1).all()
    assert ((det.boxes >= 0) & (det.boxes <= 1)).all()


def test_thresholds_are_applied():
    cls_logits, regression = _head_outputs(3, batch=1, sharp=6.0)
    config = PostprocessConfig(score_threshold=0.3, iou_threshold=0.2, topk_candidates=50, max_detections=20)
    det = postprocess(cls_logits, regression, PRIORS, config).per_image()[0]
    assert (det["scores"] > 0.3).all() and len(det["scores"]) <= 20
    from torchvision.ops import box_iou

    for label in det["labels"].unique():
        boxes = det["boxes"][det["labels"] == label]
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou <= 0.2 + 1e-6).all()


def test_empty_boxes_are_dropped():
    cls_logits, regression = _head_outputs(4, batch=1, sharp=6.0)
    # Push every box far outside the image: clipped to [0, 1] they have no area left.
    regression[..., 0] = 1000.0
    assert postprocess(cls_logits, regression, PRIORS).num_detections.item() == 0
    assert (
        postprocess(
            cls_logits, regression, PRIORS, PostprocessConfig(remove_empty=False)
        ).num_detections.item()
        > 0
    )
