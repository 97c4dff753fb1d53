import pytest
import torch
from conftest import random_boxes, torchvision_anchors
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.ops import box_iou

from model import MultiBoxLoss, match, pad_targets
from model.box_coding import cxcywh_to_xyxy
from model.config import SSD300_COCO_SCALES, PriorConfig
from model.priors import default_boxes

RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
STEPS = (8, 16, 32, 64, 100, 300)
MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
PRIORS = default_boxes(PriorConfig(RATIOS, SSD300_COCO_SCALES, STEPS), (300, 300), MAPS)
ANCHORS = torchvision_anchors(
    DefaultBoxGenerator([list(r) for r in RATIOS], scales=list(SSD300_COCO_SCALES), steps=list(STEPS)),
    (300, 300),
    MAPS,
)


def _batch(seed, counts, num_classes=21):
    g = torch.Generator().manual_seed(seed)
    boxes = [random_boxes(g, n) for n in counts]
    labels = [torch.randint(0, num_classes - 1, (n,), generator=g) for n in counts]
    n = len(PRIORS)
    cls_logits = torch.randn(len(counts), n, num_classes, generator=g) * 2
    regression = torch.randn(len(counts), n, 4, generator=g)
    return boxes, labels, cls_logits, regression


def _has_shared_best_box(boxes):
    return any(
        len(set(box_iou(b, cxcywh_to_xyxy(PRIORS)).argmax(1).tolist())) < len(b) for b in boxes if len(b)
    )


def _torchvision_loss(model, boxes, labels, cls_logits, regression, matched=None):
    # torchvision works in pixels with 1-based labels (0 = background); matching happens in SSD.forward.
    targets = [{"boxes": b * 300, "labels": lab + 1} for b, lab in zip(boxes, labels, strict=True)]
    anchors = [ANCHORS] * len(boxes)
    if matched is None:
        matched = [
            model.proposal_matcher(box_iou(t["boxes"], ANCHORS))
            if len(t["boxes"])
            else torch.full((len(ANCHORS),), -1)
            for t in targets
        ]
    return model.compute_loss(
        targets, {"cls_logits": cls_logits, "bbox_regression": regression}, anchors, list(matched)
    )


@pytest.mark.parametrize(("seed", "counts"), [(0, [3, 7]), (2, [1]), (6, [15, 0, 2, 8])])
def test_equal_to_torchvision_compute_loss(torchvision_ssd, seed, counts):
    boxes, labels, cls_logits, regression = _batch(seed, counts)
    assert not _has_shared_best_box(boxes), "pick a batch without the matcher tie, where torchvision is right"
    expected = _torchvision_loss(torchvision_ssd, boxes, labels, cls_logits, regression)
    ours = MultiBoxLoss()(cls_logits, regression, PRIORS, *pad_targets(boxes, labels))
    torch.testing.assert_close(ours.regression, expected["bbox_regression"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.classification, expected["classification"], rtol=1e-5, atol=0)


def test_equal_to_torchvision_given_our_matching(torchvision_ssd):
    """With ties (two truths sharing a best default box) only the matching differs, by design."""
    boxes, labels, cls_logits, regression = _batch(1, [20, 1, 0, 12])
    assert _has_shared_best_box(boxes)
    gt_boxes, gt_labels = pad_targets(boxes, labels)
    expected = _torchvision_loss(
        torchvision_ssd, boxes, labels, cls_logits, regression, match(gt_boxes, gt_labels, PRIORS)
    )
    ours = MultiBoxLoss()(cls_logits, regression, PRIORS, gt_boxes, gt_labels)
    torch.testing.assert_close(
        ours.total, expected["bbox_regression"] + expected["classification"], rtol=1e-5, atol=0
    )


def test_gradients_equal_torchvision(torchvision_ssd):
    boxes, labels, cls_logits, regression = _batch(5, [4, 9])
    theirs_in = [t.clone().requires_grad_() for t in (cls_logits, regression)]
    ours_in = [t.clone().requires_grad_() for t in (cls_logits, regression)]
    expected = _torchvision_loss(torchvision_ssd, boxes, labels, *theirs_in)
    sum(expected.values()).backward()
    MultiBoxLoss()(*ours_in, PRIORS, *pad_targets(boxes, labels)).total.backward()
    for ours, theirs in zip(ours_in, theirs_in, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_no_objects_gives_a_finite_loss():
    _, _, cls_logits, regression = _batch(3, [0, 0])
    cls_logits.requires_grad_()
    gt_boxes, gt_labels = pad_targets([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    parts = MultiBoxLoss()(cls_logits, regression, PRIORS, gt_boxes, gt_labels)
    assert torch.isfinite(parts.total) and parts.num_positives == 0
    parts.total.backward()
    assert torch.isfinite(cls_logits.grad).all()
    # min_negatives gives background-only images some negatives to learn from.
    mined = MultiBoxLoss(min_negatives=10)(cls_logits, regression, PRIORS, gt_boxes, gt_labels)
    assert torch.isfinite(mined.total) and mined.classification > 0


def test_hard_negatives_are_the_hardest_three_per_positive():
    # One image, one ground truth covering one default box exactly: 1 positive, so 3 negatives.
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]] + [[0.1 * i + 0.05, 0.05, 0.05, 0.05] for i in range(8)])
    gt = torch.tensor([[[0.4, 0.4, 0.6, 0.6]]])
    logits = torch.zeros(1, 9, 2)
    logits[0, 1:, 1] = torch.arange(8, dtype=torch.float)  # negative i is more wrong the larger i
    logits[0, 0, 1] = 5.0  # the positive, confidently right
    parts = MultiBoxLoss()(logits, torch.zeros(1, 9, 4), priors, gt, torch.tensor([[0]]))
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([1] + [0] * 8), reduction="none")
    assert parts.num_positives == 1
    torch.testing.assert_close(parts.classification, ce[0] + ce[6:9].sum())


def test_class_id_out_of_range_is_named():
    boxes, _, cls_logits, regression = _batch(4, [2])
    with pytest.raises(ValueError, match="class id"):
        MultiBoxLoss()(cls_logits, regression, PRIORS, *pad_targets(boxes, [torch.tensor([3, 25])]))


def test_grid_priors_give_the_same_loss():
    from model import build_model

    grid = build_model("ssd300_vgg16", num_classes=21).prior_grid
    boxes, labels, cls_logits, regression = _batch(1, [20, 1, 0, 12])
    targets = pad_targets(boxes, labels)
    dense = MultiBoxLoss()(cls_logits, regression, grid.boxes, *targets)
    fast = MultiBoxLoss()(cls_logits, regression, grid, *targets)
    assert torch.equal(dense.num_positives, fast.num_positives)
    torch.testing.assert_close(fast.total, dense.total, rtol=1e-6, atol=0)


def test_no_objects_with_grid_priors():
    from model import build_model

    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=4)
    cls_logits = torch.randn(2, model.num_priors, 4, requires_grad=True)
    empty = pad_targets([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    parts = MultiBoxLoss()(cls_logits, torch.randn(2, model.num_priors, 4), model.prior_grid, *empty)
    assert torch.isfinite(parts.total) and parts.num_positives == 0
    parts.total.backward()
