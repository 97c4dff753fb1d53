"""Recall by object size: which objects a checkpoint finds on a dataset's validation split.

Recall at IoU 0.5 (same class, score >= 0.05) by the side of the ground-truth box, sqrt(w h), in
pixels of the model's input. mAP says how much is lost; this says where: on the synthetic set,
objects under 32 px are the ones SSDlite320's default boxes cannot match.

    uv run ssd bench recall-by-size runs/demo/best.pt data/synth [--split val]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torchvision.ops import box_iou

from model.checkpoint import load_model
from model.data import open_dataset
from model.inference import ground_truth, predict_dataset

EDGES = (0, 16, 24, 32, 48, 64, 128, float("inf"))


def recall_by_size(checkpoint: str, data: str, split: str = "val", min_score: float = 0.05) -> list[dict]:
    model, _ = load_model(checkpoint)
    dataset = open_dataset(data, split)
    height, width = model.input_size
    found = np.zeros(len(EDGES) - 1)
    total = np.zeros(len(EDGES) - 1)
    for pred, truth in zip(predict_dataset(model, dataset), ground_truth(dataset), strict=True):
        if len(truth["boxes"]) == 0:
            continue
        scale = np.array([width / truth["width"], height / truth["height"]] * 2, dtype=np.float32)
        boxes = truth["boxes"] * scale
        side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        keep = pred["scores"] >= min_score
        iou = box_iou(torch.from_numpy(truth["boxes"]), torch.from_numpy(pred["boxes"][keep])).numpy()
        hit = ((iou >= 0.5) & (truth["labels"][:, None] == pred["labels"][keep][None, :])).any(1)
        bins = np.digitize(side, EDGES) - 1
        np.add.at(total, bins, 1)
        np.add.at(found, bins, hit)
    return [
        {"side_px": f"{lo:g}-{hi:g}", "objects": int(n), "recall": round(float(f / n), 3) if n else None}
        for lo, hi, n, f in zip(EDGES[:-1], EDGES[1:], total, found, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd bench recall-by-size", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    print(json.dumps(recall_by_size(args.checkpoint, args.data, args.split), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
