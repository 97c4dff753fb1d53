"""Running a model over a dataset: detections in pixels of the original images, and their metrics."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.base import DetectionDataset
from .postprocess import PostprocessConfig, postprocess
from .ssd import SSD
from .transforms import collate, eval_transforms


@torch.no_grad()
def predict_dataset(
    model: SSD,
    dataset: DetectionDataset,
    *,
    batch_size: int = 32,
    workers: int = 0,
    device: torch.device | str = "cpu",
    config: PostprocessConfig | None = None,
    progress: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Detections for every image of ``dataset``, in order.

    The dataset's transform is replaced by the evaluation one (resize to the model's input).
    ``progress`` shows a bar over the images on stderr once the run has lasted a few seconds.

    Returns:
        per image: ``boxes`` float32 [K, 4] xyxy in pixels of the image as stored, ``scores``
        float32 [K], ``labels`` int64 [K] (0-based class ids).
    """
    view = DetectionDataset(
        dataset.annotations,
        dataset.classes,
        eval_transforms(model.input_size),
        category_ids=dataset.category_ids,
    )
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    results: list[dict[str, np.ndarray]] = []
    # Shown whether or not stderr is a terminal (evaluations run in CI logs too), so it updates
    # rarely, and not at all for a run of a few seconds.
    bar = tqdm(
        total=len(view),
        unit="img",
        desc="evaluate",
        file=sys.stderr,
        mininterval=5.0,
        delay=5.0,
        disable=not progress,
    )
    try:
        for images, _, _, _ in loader:
            detections = postprocess(*model(images.to(device)), model.priors, config).per_image()
            for found in detections:
                ann = view.annotations[len(results)]
                scale = torch.tensor(
                    [ann.width, ann.height, ann.width, ann.height], device=found["boxes"].device
                )
                results.append(
                    {
                        "boxes": (found["boxes"] * scale).cpu().numpy().astype(np.float32),
                        "scores": found["scores"].cpu().numpy().astype(np.float32),
                        "labels": found["labels"].cpu().numpy(),
                    }
                )
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    return results


def ground_truth(dataset: DetectionDataset) -> list[dict[str, np.ndarray]]:
    """The evaluation records of a dataset (crowd and difficult boxes included, flagged)."""
    return [
        {
            "boxes": a.boxes,
            "labels": a.labels,
            "difficult": a.difficult,
            "crowd": a.crowd,
            "width": a.width,
            "height": a.height,
        }
        for a in dataset.annotations
    ]


def evaluate_model(model: SSD, dataset: DetectionDataset, **kwargs: Any) -> dict[str, Any]:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, VOC07 mAP and AP per class of ``model`` on ``dataset``."""
    from .evaluation import evaluate

    return evaluate(ground_truth(dataset), predict_dataset(model, dataset, **kwargs), dataset.classes)
