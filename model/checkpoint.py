"""Training checkpoints: written atomically, read back into a ready model.

A checkpoint is a dict saved with torch.save: ``model`` (state dict), ``model_name``,
``num_classes`` (background included), ``scale_set``, ``pretrained_layout`` (the backbone built
as for pretrained weights), ``classes`` (names, background excluded), ``epoch`` (completed
epochs), ``config``, ``metrics`` (the last validation metrics) and, for resuming, ``optimizer``,
``scheduler``, ``scaler``, ``best_map``, ``rng`` (one state per process) and ``history``.
:func:`training_state` writes that dict, :func:`read_checkpoint` reads it back.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .build import build_model
from .files import staged
from .ssd import SSD


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or is not one of ours; the message names the file."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: readers never see half a file."""
    with staged(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    model: torch.nn.Module,
    *,
    model_name: str,
    classes: list[str],
    scale_set: str | None,
    pretrained_layout: bool,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    best_map: float,
    rng: list[dict[str, Any]],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint of a training run after ``epoch`` epochs (see the module docstring)."""
    return {
        "model": model.state_dict(),
        "model_name": model_name,
        "num_classes": len(classes) + 1,
        "scale_set": scale_set,
        "pretrained_layout": pretrained_layout,
        "classes": classes,
        "epoch": epoch,
        "config": config,
        "metrics": metrics,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "best_map": best_map,
        "rng": rng,
        "history": history,
    }


def check_fits(
    checkpoint: dict[str, Any],
    path: Path | str,
    model_name: str,
    classes: list[str],
    scale_set: str | None,
    use: str,
) -> None:
    """Raise CheckpointError unless ``checkpoint`` is a ``model_name`` on ``classes`` with
    ``scale_set``: what ``use`` (``--resume``, ``--init-from``) needs."""
    theirs = (checkpoint["model_name"], checkpoint["classes"], checkpoint.get("scale_set"))
    if theirs != (model_name, classes, scale_set):
        raise CheckpointError(
            f"{path} is a {theirs[0]} (scale set {theirs[2]}) on classes {theirs[1]}; "
            f"{use} needs a {model_name} (scale set {scale_set}) on {classes}"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold RNG states (numpy arrays, tuples), so they are not weights-only.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    missing = {"model", "model_name", "num_classes", "classes"} - set(
        checkpoint if isinstance(checkpoint, dict) else {}
    )
    if missing:
        raise CheckpointError(f"{path} is not an ssd training checkpoint (missing {sorted(missing)})")
    return checkpoint


def load_model(path: str | Path) -> tuple[SSD, dict[str, Any]]:
    """The model of a checkpoint, in eval mode on the CPU, and the checkpoint's other entries."""
    checkpoint = read_checkpoint(path)
    model = build_model(
        checkpoint["model_name"],
        checkpoint["num_classes"],
        scale_set=checkpoint.get("scale_set"),
        pretrained_layout=checkpoint.get("pretrained_layout", False),
    )
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
