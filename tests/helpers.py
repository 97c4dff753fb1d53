"""Shared test helpers that are not fixtures."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give a randomly initialised network batch-norm statistics from ``images`` (float
    [B, 3, H, W] in [0, 1]) and put it in eval mode.

    With default running statistics (mean 0, variance 1) a random MobileNetV3 in eval mode shrinks
    its activations by ~1e-14 by the last feature map, so every score is 1/C: nothing to compare.
    """
    from model.train import recompute_batch_norm

    recompute_batch_norm(model, [images])
    return model.eval()


def calibrated(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A random ``name`` whose scores vary: batch-norm statistics from six synthetic scenes."""
    from export.exporter import sample_images
    from model.registry import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    images = torch.from_numpy(sample_images(model.input_size, 6, seed=seed + 100))
    return calibrate_batch_norm(model, images.permute(0, 3, 1, 2).float() / 255.0)
