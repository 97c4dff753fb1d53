import pytest
import torch
from conftest import random_boxes
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from model.box_coding import cxcywh_to_xyxy, xyxy_to_cxcywh
from model.config import SSD300_COCO_SCALES, PriorConfig
from model.matching import match, pad_targets
from model.priors import PriorGrid, default_boxes

PRIORS = default_boxes(
    PriorConfig(((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), SSD300_COCO_SCALES, (8, 16, 32, 64, 100, 300)),
    (300, 300),
    [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)],
)


def test_equal_to_torchvision_matcher_on_a_padded_batch():
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 20, 1, 13]
    boxes = [random_boxes(g, n) for n in counts]
    labels = [torch.randint(0, 20, (n,), generator=g) for n in counts]
    gt_boxes, gt_labels = pad_targets(boxes, labels)
    ours = match(gt_boxes, gt_labels, PRIORS)
    reference = SSDMatcher(0.5)
    anchors = cxcywh_to_xyxy(PRIORS)
    for i, b in enumerate(boxes):
        expected = reference(box_iou(b, anchors)) if len(b) else torch.full((len(PRIORS),), -1)
        assert torch.equal(ours[i], expected.clamp(min=-1)), f"image {i}"


def test_threshold_is_inclusive():
    priors = torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0]])  # left and right halves
    # IoU with the left half exactly 0.5 (box covers the left half and half as much again).
    gt = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.75, 1.0]]])
    matched = match(gt[:, 1:], torch.tensor([[0]]), priors)
    iou = box_iou(gt[0, 1:], cxcywh_to_xyxy(priors))
    assert iou[0, 0] == 2 / 3 and matched[0, 0] == 0
    half = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])  # IoU 0.5 with both halves
    assert match(half, torch.tensor([[0]]), priors).tolist() == [[0, 0]]


def test_shared_best_default_box_does_not_leave_a_truth_unmatched():
    """amdegroot/ssd.pytorch #193 / #354: two ground truths whose best default box is the same.

    Both overlap each default box by less than 0.5, so each has only its forced match. With the
    naive rule the later one overwrites the earlier, which is left with no default box at all.
    """
    priors = xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]]))
    gt = torch.tensor([[[0.05, 0.05, 0.30, 0.30], [0.10, 0.10, 0.40, 0.35]]])
    iou = box_iou(gt[0], cxcywh_to_xyxy(priors))
    assert iou.argmax(dim=1).tolist() == [0, 0] and (iou < 0.5).all()  # the tie really is there

    naive = SSDMatcher(0.5)(iou)  # torchvision's rule, which has the bug
    assert set(naive.tolist()) - {-1} != {0, 1}, "the reference no longer loses a truth: fixture is stale"

    matched = match(gt, torch.tensor([[3, 7]]), priors)[0]
    assert set(matched.tolist()) - {-1} == {0, 1}, matched
    # The higher IoU keeps the contested box; the other takes its next best.
    winner = int(iou[:, 0].argmax())
    assert matched[0] == winner and matched[1] == 1 - winner


def test_identical_truths_each_get_a_default_box():
    g = torch.Generator().manual_seed(3)
    box = random_boxes(g, 1)
    gt = box.expand(4, 4)[None]  # four copies of one box: all want the same default box
    matched = match(gt, torch.zeros(1, 4, dtype=torch.long), PRIORS)[0]
    assert set(matched.tolist()) - {-1} == {0, 1, 2, 3}


def test_padding_is_never_matched_and_empty_images_are_background():
    gt_boxes, gt_labels = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.zeros(0, 4)],
        [torch.tensor([2]), torch.zeros(0, dtype=torch.long)],
    )
    matched = match(gt_boxes, gt_labels, PRIORS)
    assert (matched[1] == -1).all()
    assert set(matched[0].tolist()) == {-1, 0}


def _grids():
    for name in ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "ssd512_vgg16"):
        from model import build_model

        yield build_model(name, num_classes=3).prior_grid


GRIDS = list(_grids())


def _awkward_boxes(g, count):
    """Ordinary boxes plus the cases the area bound must get right: tiny, huge, thin, off-image."""
    boxes = [random_boxes(g, count)]
    tiny = random_boxes(g, 4) * 0.02 + torch.rand(1, 2, generator=g).repeat(1, 2) * 0.9  # ~1% of the side
    huge = torch.tensor([[0.0, 0.0, 1.0, 1.0], [-0.2, -0.1, 1.1, 1.2]])
    thin = torch.tensor([[0.1, 0.45, 0.9, 0.47], [0.30, 0.0, 0.31, 1.0]])  # aspect ratios of 40 and 100
    return torch.cat([*boxes, tiny, huge, thin])


@pytest.mark.parametrize("grid", GRIDS, ids=["ssd300", "ssdlite320", "ssd512"])
def test_grid_iou_is_box_iou_to_the_bit(grid):
    boxes = _awkward_boxes(torch.Generator().manual_seed(0), 30)
    assert torch.equal(grid.iou(boxes), box_iou(boxes, cxcywh_to_xyxy(grid.boxes)))


@pytest.mark.parametrize("grid", GRIDS, ids=["ssd300", "ssdlite320", "ssd512"])
@pytest.mark.parametrize("seed", range(4))
def test_grid_matching_equals_dense_matching(grid, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = [_awkward_boxes(g, n) for n in (0, 3, 25)] + [
        random_boxes(g, 1).expand(5, 4),
        random_boxes(g, 40),
    ]
    boxes[0] = boxes[0][:0]  # an empty image
    labels = [torch.zeros(len(b), dtype=torch.long) for b in boxes]
    gt_boxes, gt_labels = pad_targets(boxes, labels)
    for threshold in (0.5, 0.35):
        dense = match(gt_boxes, gt_labels, grid.boxes, threshold)
        assert torch.equal(match(gt_boxes, gt_labels, grid, threshold), dense)


def test_grid_refuses_boxes_that_are_not_a_grid():
    shuffled = PRIORS[torch.randperm(len(PRIORS), generator=torch.Generator().manual_seed(0))]
    layout = ([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)], [4, 6, 6, 6, 4, 4])
    PriorGrid(PRIORS, *layout)
    with pytest.raises(ValueError, match="not laid out on a grid"):
        PriorGrid(shuffled, *layout)
    with pytest.raises(ValueError, match="hold 8731 default boxes, not 8732"):
        PriorGrid(PRIORS, layout[0], [4, 6, 6, 6, 4, 3])


@pytest.mark.parametrize("grid", GRIDS[:1], ids=["ssd300"])
def test_grid_matching_without_objects_or_without_overlaps(grid):
    empty = pad_targets([torch.zeros(0, 4)] * 3, [torch.zeros(0, dtype=torch.long)] * 3)
    assert (match(*empty, grid) == -1).all()
    # Specks far smaller than any default box: no IoU reaches 0.5, yet each gets its forced box.
    specks = torch.tensor([[[0.500, 0.500, 0.502, 0.502], [0.1, 0.1, 0.101, 0.103]]])
    labels = torch.tensor([[0, 1]])
    matched = match(specks, labels, grid)
    assert torch.equal(matched, match(specks, labels, grid.boxes))
    assert sorted(set(matched[0].tolist()) - {-1}) == [0, 1]
