"""The training defaults, resolved for one run: what each setting became, and why.

Most users pass no flags, so a default has to fit the run in front of it, not the published
recipe's COCO run of hundreds of epochs. ``ssd train`` prints :meth:`Plan.table` at start and
records the values in the run's ``config.yaml``. A flag given on the command line always wins.

The rules (figures in docs/benchmarks.md, "Training defaults on a small dataset"):

- **batch**: 32 per process, halved (down to 8) while an epoch would have fewer than 100 steps: a
  400-image set trains at 8, the 2000-image synthetic set at 16 (the demo model's batch), COCO
  and VOC at 32. From random weights a short run is short of optimizer steps, not of images per
  step: on 400 images, 30 epochs at batch 8 reached mAP@0.5 0.666 where 16 reached 0.469 and
  the old 32 0.293, each epoch taking the same time on a CPU.
- **learning rate** (SGD): the recipe's, scaled to the global batch linearly above the recipe's
  batch (Goyal et al.) and by the square root below it (Krizhevsky 2014, Hoffer et al. 2017):
  linear scaling from SSDlite's batch 192 leaves a batch of 16 at 0.0125, where it barely learns
  in 30 epochs.
- **warm-up**: 5% of the run's optimizer steps, at most 1000 (a fixed 1000 is most of a short run).
- **batch norm**: statistics recomputed on 256 images before each validation (precise BN): with
  SSDlite's momentum of 0.03 the running averages lag weights that still move fast, so without it
  the validation mAP jumps from epoch to epoch (0.38, 0.13, 0.41) and best.pt is chosen on noise;
  by the end of a cosine schedule the two agree. It costs about 17% of a 400-image run on a CPU.
- **starting weights**: for a training set under 10,000 images, the backbone's ImageNet weights
  where they are reachable (torch's hub cache, or the network), said in one line where they are
  not; larger sets follow the recipe (torchvision trains SSDlite from scratch on COCO).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Recipe

log = logging.getLogger("ssd.train")

# The architecture when none is named: small data on a CPU is the usual first run.
MODEL = "ssdlite320_mobilenet_v3_large"
MODEL_WHY = (
    "the smallest and fastest of the family (2.5M parameters, 3234 default boxes), a few minutes an "
    "epoch for a few hundred images on a CPU, with ImageNet weights for its backbone; ssd300_vgg16 "
    "or ssd512_vgg16 are more accurate where a GPU trains them"
)
VAL_FRACTION = 0.1  # held out for validation where the data has one split
MIN_STEPS_PER_EPOCH = 100
MAX_AUTO_BATCH, MIN_AUTO_BATCH = 32, 8
WARMUP_FRACTION, MAX_WARMUP = 0.05, 1000
PRECISE_BN_IMAGES = 256  # what the demo model's 16 batches of 16 took
PRETRAINED_BELOW = 10_000  # training images
DOWNLOAD_TIMEOUT_S = 10.0  # a network that drops packets must not hold the start of a run


@dataclass(frozen=True)
class Setting:
    value: Any
    why: str


@dataclass(frozen=True)
class Plan:
    """What the defaults became for one run. ``batch_size`` is per process; ``warmup`` counts
    optimizer steps; ``precise_bn`` batches (0: off); ``backbone_weights``: None (random),
    ``"imagenet"`` or a file."""

    batch_size: Setting
    lr: Setting
    warmup: Setting
    precise_bn: Setting
    backbone_weights: Setting
    steps_per_epoch: int
    total_steps: int

    def table(self) -> list[str]:
        steps = f"{self.steps_per_epoch} per epoch, {self.total_steps} in all"
        rows = [
            ("batch", str(self.batch_size.value), self.batch_size.why),
            ("steps", steps, ""),
            ("warm-up", f"{self.warmup.value} steps", self.warmup.why),
            ("lr", f"{self.lr.value:.4g}", self.lr.why),
            ("batch norm", _bn_text(self.precise_bn.value), self.precise_bn.why),
            ("start", _weights_text(self.backbone_weights.value), self.backbone_weights.why),
        ]
        width = max(len(value) for _, value, _ in rows)
        return [f"{name:>10}  {value:<{width}}  {why}".rstrip() for name, value, why in rows]


def _bn_text(batches: int) -> str:
    return f"recomputed on {batches} batches" if batches else "running averages"


def _weights_text(weights: str | None) -> str:
    return "random" if weights is None else "ImageNet backbone" if weights == "imagenet" else str(weights)


def batch_size(given: int | None, images: int, world: int) -> Setting:
    if given is not None:
        return Setting(given, "--batch-size")
    batch = MAX_AUTO_BATCH
    while batch > MIN_AUTO_BATCH and images // (batch * world) < MIN_STEPS_PER_EPOCH:
        batch //= 2
    if batch == MAX_AUTO_BATCH:
        return Setting(batch, "the default")
    if images < batch * world:  # a handful of images: one batch of all of them
        return Setting(max(1, images // world), f"{images} images: all of them in one step")
    return Setting(
        batch,
        f"{images} images: halved from 32 toward {MIN_STEPS_PER_EPOCH} steps an epoch (8 at least)",
    )


def learning_rate(given: float | None, optimizer: str, recipe: Recipe, global_batch: int) -> Setting:
    if given is not None:
        return Setting(given, "--lr")
    if optimizer == "adamw":
        return Setting(1e-3 * global_batch / 32, "AdamW: 1e-3 at batch 32, scaled linearly")
    ratio = global_batch / recipe.reference_batch
    if ratio >= 1:
        return Setting(
            recipe.lr * ratio,
            f"the recipe's {recipe.lr:g} at batch {recipe.reference_batch}, scaled linearly",
        )
    return Setting(
        recipe.lr * math.sqrt(ratio),
        f"the recipe's {recipe.lr:g} at batch {recipe.reference_batch}, scaled by the square root "
        f"to {global_batch}",
    )


def warmup(given: int | None, total_steps: int) -> Setting:
    if given is not None:
        return Setting(min(given, total_steps), "--warmup-iters")
    steps = max(1, min(MAX_WARMUP, round(WARMUP_FRACTION * total_steps)))
    return Setting(steps, f"{WARMUP_FRACTION:.0%} of the run's steps (at most {MAX_WARMUP})")


def precise_bn(given: int | None, has_batch_norm: bool, batch: int) -> Setting:
    if given is not None:
        return Setting(given, "--precise-bn")
    if not has_batch_norm:
        return Setting(0, "the model has no batch norm")
    batches = max(1, math.ceil(PRECISE_BN_IMAGES / batch))
    return Setting(
        batches, f"{PRECISE_BN_IMAGES} images before each validation: running averages lag a short run"
    )


def fetch_imagenet(backbone: str) -> str:
    """Make the ImageNet weights of ``backbone`` available to ``build_model(..., "imagenet")``;
    returns where they came from. Raises OSError when they cannot be had."""
    import torch.hub

    from .backbones import imagenet_weights

    weights = imagenet_weights(backbone)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return f"from {cached}"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        log.info(
            "fetching the ImageNet weights of %s (at most %g s without an answer)",
            backbone,
            DOWNLOAD_TIMEOUT_S,
        )
        # torch.hub writes its "Downloading: ..." to stdout, which is the run's summary's.
        with contextlib.redirect_stdout(sys.stderr):
            weights.get_state_dict(progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)
    return f"downloaded to {cached}"


def starting_weights(
    given: str | None,
    recipe: Recipe,
    backbone: str,
    images: int,
    fetch: Callable[[str], str] = fetch_imagenet,
) -> Setting:
    """``given``: "auto" (the default), "recipe", "imagenet", "none" or a file. ImageNet weights
    are fetched here, so that the table says what the run really starts from: where "auto" or
    the recipe wants them and they cannot be had, random weights and the reason; where
    ``--backbone-weights`` asked for them by name, WeightsError."""
    explicit = given not in ("auto", None)
    if explicit:
        weights = recipe.backbone_weights if given == "recipe" else given
        why = f"--backbone-weights {given}"
        if weights != "imagenet":
            return Setting(None if weights in (None, "none") else weights, why)
    elif images >= PRETRAINED_BELOW:
        why = f"{images} images: the recipe's"
        if recipe.backbone_weights is None:
            return Setting(None, why + " (from scratch)")
    else:
        why = f"{images} images: a pretrained start"
    try:
        source = fetch(backbone)
    except (OSError, RuntimeError) as exc:  # URLError, timeouts, a corrupt download (hash check)
        from .backbones import imagenet_weights

        name = Path(imagenet_weights(backbone).url).name
        where = f"put {name} in torch's hub cache (checkpoints/) or pass --backbone-weights FILE"
        if explicit:
            from .weights import WeightsError

            raise WeightsError(
                f"{why}: ImageNet weights for {backbone} are not reachable ({exc}); {where}"
            ) from exc
        return Setting(None, f"ImageNet weights for {backbone} are not reachable ({exc}); {where}")
    return Setting("imagenet", f"{why} ({source})")


def plan(given: Any, recipe: Recipe, images: int, world: int, has_batch_norm: bool, weights: Setting) -> Plan:
    """Resolve ``given`` (a TrainConfig: None fields are defaults) for a run on ``images``
    training images in ``world`` processes, starting from ``weights`` (:func:`starting_weights`,
    resolved first: the model is built from them, and whether it has batch norm is known after)."""
    batch = batch_size(given.batch_size, images, world)
    steps_per_epoch = images // (batch.value * world)
    total = steps_per_epoch * given.epochs
    return Plan(
        batch_size=batch,
        lr=learning_rate(given.lr, given.optimizer, recipe, batch.value * world),
        warmup=warmup(given.warmup_iters, total),
        precise_bn=precise_bn(given.precise_bn, has_batch_norm, batch.value),
        backbone_weights=weights,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
    )
