"""Options ``ssd evaluate`` and ``ssd promote`` share (light: the parser is built without torch,
which the serving install lacks)."""

from __future__ import annotations

import argparse


def add_evaluation_split(parser: argparse.ArgumentParser) -> None:
    """The options that choose the images a model is evaluated on (``open_evaluation_split``),
    the same for ``ssd evaluate`` and ``ssd promote``."""
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="the images a training run held out of the data's one split with this --val-fraction "
        "and --seed (ssd train's closing summary gives both)",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --val-fraction: the run's seed")
    parser.add_argument("--images", default=None, help="COCO: the image folder, if not beside the JSON")
