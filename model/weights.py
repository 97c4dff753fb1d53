"""Loading torchvision's SSD checkpoints into our models.

A source is either a local file (a state dict, or a dict holding one under "model" as
torchvision's reference scripts save it) or the name of a torchvision weights enum member such
as ``COCO_V1``. Enum weights are downloaded by torchvision, or read from torch's hub cache
(``$TORCH_HOME``) where a machine has no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .build import build_model
from .registry import get_spec
from .ssd import SSD


class WeightsError(RuntimeError):
    """A checkpoint cannot be had or does not fit the model; the message says which and why."""


@dataclass
class LoadedWeights:
    state_dict: dict[str, Tensor]
    source: str  # file path or "SSD300_VGG16_Weights.COCO_V1"
    categories: list[str] | None = None  # torchvision's class names, background first, when known


def read_weights(model_name: str, source: str | Path) -> LoadedWeights:
    path = Path(source)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"} or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise WeightsError(
                f"{path} holds no state dict (expected a dict of tensors, or one under 'model')"
            )
        return LoadedWeights(state, str(path))

    spec = get_spec(model_name)
    if spec.torchvision_name is None:
        raise WeightsError(
            f"torchvision publishes no weights for {model_name}; pass a checkpoint file instead"
        )
    from torchvision.models import get_model_weights

    enum = get_model_weights(spec.torchvision_name)
    try:
        weights = enum[str(source)]
    except KeyError:
        members = ", ".join(m.name for m in enum)
        raise WeightsError(f"{enum.__name__} has no member {source!r}; it has {members}") from None
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError included
        raise WeightsError(
            f"could not download {enum.__name__}.{weights.name} ({exc}). Without network, fetch "
            f"{weights.url} elsewhere and pass the file instead, or put it in torch's hub cache "
            f"({torch.hub.get_dir()}/checkpoints)."
        ) from exc
    return LoadedWeights(
        state, f"{enum.__name__}.{weights.name}", list(weights.meta.get("categories") or []) or None
    )


def num_classes_in(state_dict: dict[str, Tensor], model_name: str, scale_set: str | None = None) -> int:
    """The class count (background included) a torchvision-layout SSD state dict was trained with."""
    spec = get_spec(model_name)
    boxes_at_first_map = spec.prior_config(scale_set).boxes_per_location[0]
    for key in (
        "head.classification_head.module_list.0.weight",
        "head.classification_head.module_list.0.1.weight",
    ):
        if key in state_dict:
            return state_dict[key].shape[0] // boxes_at_first_map
    raise WeightsError(f"not an SSD state dict for {model_name}: no classification head weights")


def load_into(model: SSD, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
    """Strict load that names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} in checkpoint, {tuple(v.shape)} in model"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (first: {wrong[:2]})")
        raise WeightsError(f"{source} does not fit {model.name}: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def build_from_weights(model_name: str, source: str | Path) -> tuple[SSD, LoadedWeights]:
    """Build ``model_name`` with the class count of the checkpoint and load it."""
    loaded = read_weights(model_name, source)
    model = build_model(model_name, num_classes_in(loaded.state_dict, model_name))
    load_into(model, loaded.state_dict, loaded.source)
    return model, loaded
