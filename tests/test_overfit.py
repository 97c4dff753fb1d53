"""End to end on CPU: the model, the matching, the loss and the post-processing learn together."""

import pytest
import torch
from torchvision.ops import box_iou

from model import MultiBoxLoss, PostprocessConfig, build_model, pad_targets
from model.postprocess import postprocess


def _two_images():
    images = torch.full((2, 3, 320, 320), 0.5)
    boxes = [
        torch.tensor([[0.10, 0.10, 0.40, 0.50], [0.55, 0.30, 0.90, 0.80]]),
        torch.tensor([[0.20, 0.25, 0.70, 0.60]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    colours = [torch.tensor([1.0, 0.1, 0.1]), torch.tensor([0.1, 0.2, 1.0])]
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        for box, label in zip(image_boxes, image_labels, strict=True):
            x0, y0, x1, y1 = (box * 320).long().tolist()
            images[i, :, y0:y1, x0:x1] = colours[label][:, None, None]
    return images, boxes, labels


@torch.no_grad()
def _recalibrate_batch_norm(model, images, passes=3):
    """Running statistics lag weights that change this fast; recompute them (precise BN)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for _ in range(passes):
        model(images)
    model.eval()


@pytest.mark.slow
def test_small_model_overfits_two_images():
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    images, boxes, labels = _two_images()
    targets = pad_targets(boxes, labels)
    loss_fn = MultiBoxLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        cls_logits, regression = model(images)
        loss = loss_fn(cls_logits, regression, model.priors, *targets).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]

    _recalibrate_batch_norm(model, images)
    with torch.no_grad():
        detections = postprocess(
            *model(images), model.priors, PostprocessConfig(score_threshold=0.5)
        ).per_image()
    for found, truth_boxes, truth_labels in zip(detections, boxes, labels, strict=True):
        assert len(found["scores"]) == len(truth_boxes), found
        iou = box_iou(truth_boxes, found["boxes"])
        best = iou.argmax(dim=1)
        assert (iou.max(dim=1).values > 0.7).all(), iou
        assert torch.equal(found["labels"][best], truth_labels)
