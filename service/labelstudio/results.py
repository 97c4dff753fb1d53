"""One task's detections as a Label Studio prediction: ``rectanglelabels`` regions in Label
Studio's coordinates (percent of the image's width and height, after EXIF orientation, as Label
Studio shows the image), each with its score; the prediction's score is its highest box's
(0 with none), and its ``model_version`` names the artifact that ran."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..pipeline import Found, Query
from .config import LabelMap, Target


def model_version(identity: dict[str, str]) -> str:
    """``{served name}-v{repository version}-{sha256[:12]}``: a new artifact (a reload, a
    promotion) is a new version to Label Studio, which then predicts its tasks again."""
    return f"{identity['name']}-v{identity['version']}-{identity['sha256'][:12]}"


def prediction(
    found: Found, query: Query, target: Target, labels: LabelMap, version: str, dropped: Counter[int]
) -> dict[str, Any]:
    """The task's prediction; the classes without a label are counted in ``dropped``."""
    boxes, scores, classes = found.arrays(query)
    width, height = found.width, found.height
    boxes = np.clip(boxes.astype(np.float64), 0, [width, height, width, height])
    regions = []
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), classes.tolist(), strict=True):
        name = labels.labels[label] if label < len(labels.labels) else None
        if name is None:
            dropped[label] += 1
            continue
        regions.append(
            {
                "id": f"ssd{len(regions)}",
                "from_name": target.from_name,
                "to_name": target.to_name,
                "type": "rectanglelabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "score": score,
                "value": {
                    "x": x1 / width * 100,
                    "y": y1 / height * 100,
                    "width": (x2 - x1) / width * 100,
                    "height": (y2 - y1) / height * 100,
                    "rotation": 0,
                    "rectanglelabels": [name],
                },
            }
        )
    best = max((r["score"] for r in regions), default=0.0)
    return {"result": regions, "score": best, "model_version": version}
