"""Training images/s: our training step against torchvision's own SSD training step, in one run.

Same model (torchvision's ssdlite320_mobilenet_v3_large architecture and initial weights, loaded
into ours), same batch of images and boxes, same SGD optimizer, same machine and process. Each
step is forward, loss, backward and optimizer step; data loading is left out (it is the same for
both). Both run with the same malloc settings (model/malloc.py), applied first.

    ssd bench train [--model ssdlite320_mobilenet_v3_large] [--batch 32] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import detection

from bench.machine import emit, machine_info
from model import MultiBoxLoss, build_model, pad_targets
from model.malloc import keep_freed_memory

PROG = "ssd bench train"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="ssdlite320_mobilenet_v3_large",
        choices=["ssdlite320_mobilenet_v3_large", "ssd300_vgg16"],
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, theirs, ours, ...)")
    parser.add_argument("--max-objects", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-channels-last", action="store_true", help="run ours in NCHW like torchvision")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    tuned = keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)

    builder = getattr(detection, args.model)
    reference = builder(weights=None, weights_backbone=None, num_classes=7).to(device).train()
    ours = build_model(args.model, num_classes=7).to(device).train()
    if not args.no_channels_last:
        ours.use_channels_last()
    ours.load_state_dict(reference.state_dict())
    size = ours.input_size

    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, 3, *size, generator=g).to(device)
    boxes, labels = [], []
    for _ in range(args.batch):
        n = int(torch.randint(1, args.max_objects + 1, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.5 + 0.05
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, 6, (n,), generator=g).to(device))
    gt_boxes, gt_labels = pad_targets(boxes, labels, device=device)
    scale = torch.tensor([size[1], size[0], size[1], size[0]], device=device)
    targets = [{"boxes": b * scale, "labels": lab + 1} for b, lab in zip(boxes, labels, strict=True)]
    image_list = list(images)
    loss_fn, grid = MultiBoxLoss(), ours.prior_grid

    def our_step(optimizer: torch.optim.Optimizer) -> None:
        cls_logits, regression = ours(images)
        loss = loss_fn(cls_logits, regression, grid, gt_boxes, gt_labels).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def their_step(optimizer: torch.optim.Optimizer) -> None:
        losses = reference(image_list, targets)
        loss = losses["bbox_regression"] + losses["classification"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    runs = {
        "ours": (our_step, torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)),
        "torchvision": (their_step, torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step, optimizer in runs.values():  # warm-up: first steps allocate and pick kernels
        for _ in range(2):
            step(optimizer)
    for _ in range(args.rounds):
        for name, (step, optimizer) in runs.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step(optimizer)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)

    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    report = {
        "benchmark": f"training step (forward, loss, backward, SGD), {args.model}",
        "batch": args.batch,
        **machine_info(device),
        "malloc_tuned": tuned,
        "ours_channels_last": not args.no_channels_last,
        "images_per_s": rates,
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "speedup": rates["ours"] / rates["torchvision"],
    }
    emit(report, args.json)
    return 0
