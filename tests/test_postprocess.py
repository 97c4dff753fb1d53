import pytest
import torch
from test_loss import ANCHORS, PRIORS

from model import PostprocessConfig
from model.postprocess import postprocess, select_detections


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


# ---- the per-group NMS against a straightforward reference ---------------------------------------


def _reference_nms_by_group(boxes, scores, groups, iou_threshold):
    """NMS over each group's members, found by comparison (model/postprocess.py until it ran NMS
    on runs of candidates): the reference the faster code must equal, tie for tie."""
    from torchvision.ops import nms

    kept = [
        members[nms(boxes[members], scores[members], iou_threshold)]
        for members in (torch.nonzero(groups == g).squeeze(1) for g in torch.unique(groups))
    ]
    if not kept:
        return torch.empty(0, dtype=torch.int64)
    kept_all = torch.cat(kept)
    return kept_all[torch.sort(scores[kept_all], descending=True, stable=True).indices]


def _reference_select(scores, boxes, config):
    from model.postprocess import class_offsets

    labels = None
    if config.class_agnostic:
        scores, labels = scores.max(dim=-1, keepdim=True)
    batch, num_priors, num_groups = scores.shape
    top_scores, top_prior = scores.topk(min(config.topk_candidates, num_priors), dim=1)
    image, rank, group = (top_scores > config.score_threshold).nonzero(as_tuple=True)
    prior = top_prior[image, rank, group]
    cand_scores = top_scores[image, rank, group]
    cand_boxes = boxes[image, prior]
    label = group if labels is None else labels[image, prior, 0]
    if config.remove_empty:
        nonempty = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
        image, group, label, cand_scores, cand_boxes = (
            t[nonempty] for t in (image, group, label, cand_scores, cand_boxes)
        )
    shifted = cand_boxes + class_offsets(num_groups)[group]
    kept = _reference_nms_by_group(shifted, cand_scores, image * num_groups + group, config.iou_threshold)
    kept = kept[torch.sort(image[kept], stable=True).indices]
    num = torch.zeros(batch, dtype=torch.int64)
    out_boxes = torch.zeros(batch, config.max_detections, 4)
    out_scores = torch.zeros(batch, config.max_detections)
    out_labels = torch.full((batch, config.max_detections), -1, dtype=torch.int64)
    for i in range(batch):
        mine = kept[image[kept] == i][: config.max_detections]
        num[i] = len(mine)
        out_boxes[i, : len(mine)] = cand_boxes[mine]
        out_scores[i, : len(mine)] = cand_scores[mine]
        out_labels[i, : len(mine)] = label[mine]
    return num, out_boxes, out_scores, out_labels


def _scores_and_boxes(seed, batch, num_classes, regime):
    """Decoded outputs in a score regime. Crowded: most default boxes are candidates of every
    class, large regressions clip many boxes to zero area, and scores and boxes are rounded to
    coarse grids, so that equal scores and identical boxes abound (ties decide NMS order)."""
    from model.postprocess import decode_outputs

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, len(PRIORS), num_classes, generator=g) * 0.5
    regression = torch.randn(batch, len(PRIORS), 4, generator=g) * (2.0 if regime == "crowded" else 0.5)
    if regime == "sparse":  # background almost everywhere, a few dozen confident objects per image
        logits[..., 0] += 9.0
        for i in range(batch):
            where = torch.randint(0, len(PRIORS), (40,), generator=g)
            logits[i, where, torch.randint(1, num_classes, (40,), generator=g)] += 12.0
    elif regime == "empty":
        logits[..., 0] += 40.0
    scores, boxes = decode_outputs(logits, regression, PRIORS)
    if regime == "crowded":
        scores = (scores * 2048).round() / 2048
        boxes = (boxes * 64).round() / 64
    return scores, boxes


@pytest.fixture
def one_thread():
    """The reference issues thousands of small parallel operations; with a second thread each
    waits for the other core, 20x slower when that core is busy (a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("regime", ["crowded", "sparse", "empty"])
@pytest.mark.parametrize("num_classes", [2, 21, 91])
def test_equal_to_the_reference_per_group_nms(num_classes, regime, class_agnostic, batch):
    seed = num_classes * 100 + batch * 10 + ["crowded", "sparse", "empty"].index(regime)
    scores, boxes = _scores_and_boxes(seed, batch, num_classes, regime)
    for config in (
        PostprocessConfig(class_agnostic=class_agnostic),
        PostprocessConfig(class_agnostic=class_agnostic, max_detections=50, topk_candidates=100),
    ):
        ours = select_detections(scores, boxes, config)
        expected = _reference_select(scores, boxes, config)
        for name, a, b in zip(("num_detections", "boxes", "scores", "labels"), ours, expected, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differ ({config})"
        if regime == "empty":
            assert int(ours.num_detections.sum()) == 0
        elif regime == "sparse":
            assert (ours.num_detections > 0).all() and (ours.num_detections < config.max_detections).all()
        else:
            assert (ours.num_detections == config.max_detections).all()
