"""The SSD network: backbone, multi-scale heads and the default boxes they predict against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import PriorConfig
from .priors import PriorGrid, default_boxes


class SSD(nn.Module):
    """Single Shot MultiBox Detector.

    ``forward`` takes images already resized to ``input_size`` with values in [0, 1] and returns
    the raw head outputs; :class:`~model.loss.MultiBoxLoss` (with ``model.prior_grid``) and
    :func:`~model.postprocess.postprocess` (with ``model.priors``) turn them into a loss or
    detections. Normalisation (each backbone's own mean and std) happens inside, so that
    training, evaluation and the exported graph all feed the network the same way.

    Parameters are named as in torchvision's SSD (``backbone.*``, ``head.*``); the priors, mean
    and std are non-persistent buffers, so torchvision's state dicts load as they are.

    Args:
        name: registry name (``ssd300_vgg16``, ...).
        backbone: returns an OrderedDict of feature maps, largest first.
        head: torchvision-style head: list of feature maps -> {"cls_logits", "bbox_regression"}.
        num_classes: outputs per default box, background (index 0) included, as in torchvision.
        input_size: (H, W) the network is built for.
        prior_config: default box layout; the boxes are computed here for ``input_size``.
        feature_sizes: (h, w) of each feature map at ``input_size``.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        input_size: tuple[int, int],
        image_mean: Sequence[float],
        image_std: Sequence[float],
        prior_config: PriorConfig,
        feature_sizes: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.prior_config = prior_config
        self.feature_sizes = [tuple(s) for s in feature_sizes]
        self.frozen_base = False
        self.channels_last = False
        self.register_buffer(
            "priors", default_boxes(prior_config, self.input_size, self.feature_sizes), persistent=False
        )
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_priors(self) -> int:
        return self.priors.shape[0]

    @property
    def prior_grid(self) -> PriorGrid:
        """The priors with their layout: what the loss matches against fastest."""
        cached = self.__dict__.get("_prior_grid")
        if cached is None or cached.boxes.device != self.priors.device:
            cached = PriorGrid(self.priors, self.feature_sizes, self.prior_config.boxes_per_location)
            self.__dict__["_prior_grid"] = cached
        return cached

    def normalize(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the backbone's input distribution."""
        return (images - self.image_mean) / self.image_std

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            images: float [B, 3, H, W], values in [0, 1], (H, W) = ``input_size``.

        Returns:
            cls_logits [B, N, num_classes] and bbox_regression [B, N, 4], N = number of priors.
        """
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"{self.name} takes {self.input_size} (H, W) inputs, got {tuple(images.shape[-2:])}"
            )
        images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = list(self.backbone(images).values())
        out = self.head(features)
        return out["cls_logits"], out["bbox_regression"]

    def use_channels_last(self, enabled: bool = True) -> SSD:
        """Run the convolutions on NHWC tensors: 1.4x faster SSDlite training steps on our 2-core
        CPU (oneDNN's depthwise kernels prefer it), and what tensor cores prefer on GPUs. The
        outputs are the same up to float rounding; state dicts are unaffected."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def freeze_base(self, frozen: bool = True) -> None:
        """Stop training the base network (``backbone.features``); its batch norms stay in eval mode."""
        self.frozen_base = frozen
        for p in self.backbone.features.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> SSD:
        super().train(mode)
        if self.frozen_base:
            self.backbone.features.eval()
        return self
