"""Random models whose scores vary: what the benchmarks and tests export when no trained weights
can be had (none can be downloaded here). In export/, the first layer that has both the model and
the exporter's synthetic scenes."""

from __future__ import annotations

import torch

from export.exporter import sample_images
from model.build import build_model
from model.ssd import SSD
from model.train import recompute_batch_norm


@torch.no_grad()
def random_model(name: str, num_classes: int, seed: int = 0, images: int = 6) -> SSD:
    """A randomly initialised ``name`` in eval mode, its batch-norm statistics recomputed on
    ``images`` synthetic scenes. With the default running statistics (mean 0, variance 1) a
    random MobileNetV3 shrinks its activations by ~1e-14 by the last feature map, so every score
    would be 1/C: nothing to compare, nothing to time."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    pixels = torch.from_numpy(sample_images(model.input_size, images, seed=seed + 100))
    recompute_batch_norm(model, [pixels.permute(0, 3, 1, 2).float() / 255.0])
    return model.eval()
