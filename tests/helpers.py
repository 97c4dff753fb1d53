"""Shared test helpers that are not fixtures."""

from __future__ import annotations

import time

import torch
from torch import nn


def calibrated(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A random ``name`` whose scores vary: batch-norm statistics from six synthetic scenes."""
    from export.calibrated import random_model

    return random_model(name, num_classes, seed)


REGIMES = ("near_uniform", "crowded", "empty", "spread")


def _last_convs(module_list: nn.ModuleList) -> list[nn.Conv2d]:
    """The output convolution of each feature map's head (SSDlite wraps it in a Sequential)."""
    return [[m for m in block.modules() if isinstance(m, nn.Conv2d)][-1] for block in module_list]


@torch.no_grad()
def _output_spread(model: nn.Module, convs: list[nn.Conv2d]) -> list[float]:
    """The standard deviation of each conv's output without its bias, on two synthetic scenes."""
    from export.exporter import sample_images

    spreads: list[float] = []
    hooks = [
        conv.register_forward_hook(
            lambda m, _, out: spreads.append(float((out - m.bias[:, None, None]).std()))
        )
        for conv in convs
    ]
    try:
        images = torch.from_numpy(sample_images(model.input_size, 2, seed=7))
        model(images.permute(0, 3, 1, 2).float() / 255.0)
    finally:
        for hook in hooks:
            hook.remove()
    return spreads


@torch.no_grad()
def set_regime(model: nn.Module, regime: str, seed: int = 0) -> nn.Module:
    """Rewrite the heads' output layers so that the scores fall in ``regime``:

    - near_uniform: logits near 0, every class scored about 1/C (an untrained network);
    - crowded: every default box a confident object of some class, and box regressions that push
      boxes off the image or past the decoding clamp (many clipped to zero area): far more than K
      survivors per image;
    - empty: background everywhere, nothing above the threshold;
    - spread: as a trained model's: logits of a set spread whatever the backbone's scale, one
      confident box shape per cell at most, small smooth box offsets that shrink every box so
      that the confident ones stand apart. NMS then rarely has to choose between overlapping
      near-equal candidates, which float16 rounding would reorder.

    Channels are laid out (box shape, class) and (box shape, coordinate), as torchvision's heads.
    """
    if regime not in REGIMES:
        raise ValueError(regime)
    g = torch.Generator().manual_seed(seed)
    classes = model.num_classes
    cls_convs = _last_convs(model.head.classification_head.module_list)
    reg_convs = _last_convs(model.head.regression_head.module_list)
    if regime == "spread":
        for conv, spread in zip(cls_convs, _output_spread(model, cls_convs), strict=True):
            conv.weight.mul_(1.5 / spread)
        for conv, spread in zip(reg_convs, _output_spread(model, reg_convs), strict=True):
            conv.weight.mul_(0.2 / spread)
            conv.bias.view(-1, 4)[:, 2:] = -5.0  # sizes x exp(-1)
    for conv in cls_convs:
        bias = conv.bias.view(-1, classes)  # [shapes, C]
        if regime == "near_uniform":
            conv.weight.mul_(0.05)
            bias.zero_()
        elif regime == "crowded":
            bias.uniform_(1.0, 4.0, generator=g)
            bias[:, 0] = -6.0
        elif regime == "empty":
            bias[:, 0] = 40.0
        else:  # spread
            bias.zero_()
            bias[:, 0] = 20.0
            bias[0, 0] = 2.0
    if regime == "crowded":
        for conv in reg_convs:
            bias = conv.bias.view(-1, 4)  # [shapes, (dx, dy, dw, dh)]
            bias[0, 0] = 40.0  # 4 box widths to the right: off the image, empty after clipping
            bias[1, 1] = -40.0  # 4 box heights up
            bias[2, 2:] = 30.0  # scale exp(6), past the decoding clamp at exp(log(1000/16))
    return model


class Slow:
    """A detector that takes ``seconds`` more per batch (the batcher's estimates do not learn
    it: it is not the model they were measured on)."""

    def __init__(self, detector, seconds: float) -> None:
        self._detector, self.seconds = detector, seconds

    def __getattr__(self, name: str):
        return getattr(self._detector, name)

    def detect(self, pixels):
        time.sleep(self.seconds)
        return self._detector.detect(pixels)


def slow_down(model, seconds: float) -> None:
    model.runtime.detector = Slow(model.runtime.detector, seconds)
