"""Matching + MultiBox loss, ours against torchvision's, in one run.

What torchvision's SSD does in a training step between the heads and the backward pass: per
image, box_iou + SSDMatcher, then SSD.compute_loss. Ours: MultiBoxLoss (batched matching,
top-k hard negative mining). Same batch for both: SSD300 (8732 default boxes, 21 classes),
32 images with 1 to 20 objects each.

    ssd bench loss [--batch 32] [--repeats 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from bench.machine import emit, machine_info, sample_times
from model import MultiBoxLoss, build_model, match, pad_targets

PROG = "ssd bench loss"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)

    model = build_model("ssd300_vgg16", num_classes=21)
    grid = model.prior_grid.to(device)
    n, classes = model.num_priors, 21
    counts = torch.randint(1, args.max_objects + 1, (args.batch,), generator=g).tolist()
    boxes = []
    for count in counts:
        wh = torch.rand(count, 2, generator=g) * 0.6 + 0.02
        xy = torch.rand(count, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
    labels = [torch.randint(0, classes - 1, (c,), generator=g).to(device) for c in counts]
    cls_logits = torch.randn(args.batch, n, classes, generator=g).to(device).requires_grad_()
    regression = torch.randn(args.batch, n, 4, generator=g).to(device).requires_grad_()

    # torchvision: pixels, 1-based labels, its own anchors and SSD instance (only the loss is used).
    reference = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes).to(
        device
    )
    generator = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    anchors = generator(
        ImageList(torch.zeros(args.batch, 3, 300, 300, device=device), [(300, 300)] * args.batch),
        [torch.zeros(1, 1, s, s, device=device) for s in (38, 19, 10, 5, 3, 1)],
    )
    targets = [{"boxes": b * 300, "labels": lab + 1} for b, lab in zip(boxes, labels, strict=True)]
    gt_boxes, gt_labels = pad_targets(boxes, labels, device=device)
    ours_loss = MultiBoxLoss()

    def torchvision_loss() -> torch.Tensor:
        matched = [
            reference.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors, strict=True)
        ]
        losses = reference.compute_loss(
            targets, {"cls_logits": cls_logits, "bbox_regression": regression}, anchors, matched
        )
        return losses["bbox_regression"] + losses["classification"]

    def ours() -> torch.Tensor:
        return ours_loss(cls_logits, regression, grid, gt_boxes, gt_labels).total

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for label, fn in [("torchvision", torchvision_loss), ("ours", ours)]:

        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn()
            sync()

        def forward_backward(fn=fn) -> None:
            fn().backward()
            cls_logits.grad = regression.grad = None
            sync()

        results[label] = {
            "forward_ms": statistics.median(sample_times(forward, args.repeats)) * 1e3,
            "forward_backward_ms": statistics.median(sample_times(forward_backward, args.repeats)) * 1e3,
        }
    with torch.no_grad():
        agreement = abs(float(ours()) - float(torchvision_loss())) / float(torchvision_loss())
        # Ground truths left with no default box at all: the tie bug of the naive matching rule.
        tv_lost = sum(
            len(
                set(range(len(t["boxes"]))) - set(reference.proposal_matcher(box_iou(t["boxes"], a)).tolist())
            )
            for t, a in zip(targets, anchors, strict=True)
        )
        matched = match(gt_boxes, gt_labels, grid)
        ours_lost = sum(len(set(range(c)) - set(matched[i].tolist())) for i, c in enumerate(counts))

    report = {
        "benchmark": "matching + MultiBox loss, SSD300 (8732 boxes, 21 classes)",
        "batch": args.batch,
        "objects": sum(counts),
        **machine_info(device),
        "results": results,
        "speedup_forward": results["torchvision"]["forward_ms"] / results["ours"]["forward_ms"],
        "speedup_forward_backward": results["torchvision"]["forward_backward_ms"]
        / results["ours"]["forward_backward_ms"],
        # Not zero because torchvision's matching drops ground truths on ties (counted below).
        "relative_loss_difference": agreement,
        "objects_without_a_default_box": {"torchvision": tv_lost, "ours": ours_lost},
    }
    emit(report, args.json)
    return 0
