"""``ssd promote CANDIDATE.onnx --over SERVED.onnx --data DATA``: replace the served artifact
only with one that is not worse.

Both artifacts are evaluated the same way (release/evaluate.py: the service's decoding and
session) on the same split. The candidate replaces the served file (copied beside it, then
renamed over it, so that a service watching it never reads half a file) when it detects the same
classes and its metric is at least the served one's minus ``--min-delta``; otherwise the served
file is left as it is, the reason is printed, and the exit code is 1. ``--force`` replaces it
regardless (still evaluating the candidate, so that what was installed is on record). Where
nothing is served yet, the candidate is installed.

Exit codes: 0 promoted (or forced), 1 kept, 2 a file or the data cannot be used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.files import remove_stale, staged

from .options import add_evaluation_split

if TYPE_CHECKING:
    from model.data import DetectionDataset

METRICS = ("map", "map50", "map75", "voc07_map")


@dataclass
class Decision:
    promoted: bool
    reason: str
    metric: str
    candidate: float | None
    served: float | None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("candidate", help="the newly exported .onnx artifact")
    parser.add_argument("--over", required=True, metavar="SERVED", help="the served .onnx file to replace")
    parser.add_argument("--data", required=True, help="the dataset both are evaluated on")
    add_evaluation_split(parser)
    parser.add_argument(
        "--metric", choices=METRICS, default="map", help="what is compared (default map, COCO's mAP@[.5:.95])"
    )
    parser.add_argument(
        "--min-delta",
        type=float,
        default=0.0,
        help="replace when candidate >= served - MIN_DELTA (default 0: not worse at all)",
    )
    parser.add_argument("--force", action="store_true", help="replace the served file whatever the scores")
    parser.add_argument("--batch-size", type=_positive, default=8)


def install(candidate: Path, served: Path) -> None:
    """Copy ``candidate`` over ``served`` atomically (model/files.py)."""
    with staged(served) as tmp:
        shutil.copyfile(candidate, tmp)


def decide(
    candidate: Path,
    served: Path,
    dataset: DetectionDataset,
    metric: str = "map",
    min_delta: float = 0.0,
    force: bool = False,
    batch_size: int = 8,
) -> Decision:
    """Evaluate and compare; replaces ``served`` when the decision is to promote. Raises
    ArtifactError when the candidate is not a loadable artifact."""
    from model.data import DatasetError
    from model.data.subsets import class_difference, fit_classes
    from service.artifact import ArtifactError, Detector

    from .evaluate import evaluate_detector

    def score(detector: Detector) -> float:
        return float(evaluate_detector(detector, dataset, batch_size, progress=True)[metric])

    def promoted(reason: str, new: float | None, old: float | None = None) -> Decision:
        install(candidate, served)
        return Decision(True, reason, metric, new, old)

    new = Detector(candidate)
    # Classes first: a candidate that cannot replace the served model is refused before a
    # minute of evaluation.
    try:  # a candidate of some of the data's classes (ssd train --classes) is scored on those
        dataset, note = fit_classes(dataset, new.info.classes, "the candidate")
    except DatasetError as exc:
        if not force:
            return Decision(False, f"{exc}; {served} kept (--force replaces it)", metric, None, None)
        return promoted(f"{exc}; replaced (--force)", None)
    if note:
        print(f"ssd promote: {note}", file=sys.stderr)
    old: Detector | None = None
    broken = None
    if served.exists():
        try:
            old = Detector(served)
        except ArtifactError as exc:  # a broken served file serves nothing: anything loadable is better
            broken = exc
    if old is not None and list(old.info.classes) != list(new.info.classes):
        difference = class_difference(new.info.classes, old.info.classes, "the candidate", "the served model")
        if not force:
            return Decision(False, f"{difference}; {served} kept (--force replaces it)", metric, None, None)
        return promoted(f"{difference}; replaced (--force)", None)
    new_score = score(new)
    if not served.exists():
        return promoted(f"nothing was served at {served}: installed", new_score)
    if old is None:
        return promoted(f"the served file is not a loadable artifact ({broken}): replaced", new_score)
    old_score = score(old)
    compared = f"{metric} {new_score:.4f} against the served {old_score:.4f} (min delta {min_delta:g})"
    if new_score >= old_score - min_delta:
        return promoted(compared, new_score, old_score)
    if force:
        return promoted(f"{compared}: worse; replaced (--force)", new_score, old_score)
    return Decision(
        False, f"{compared}: worse; {served} kept (--force replaces it)", metric, new_score, old_score
    )


def run(args: argparse.Namespace) -> int:
    from model.data import DatasetError
    from model.data.subsets import open_evaluation_split
    from service.artifact import ArtifactError

    candidate, served = Path(args.candidate), Path(args.over)
    try:
        if candidate.resolve() == served.resolve():
            raise ValueError(f"the candidate is the served file itself ({served})")
        for stale in remove_stale(served):
            print(f"ssd promote: removed {stale}, left by an interrupted promote", file=sys.stderr)
        dataset = open_evaluation_split(
            args.data, args.split, val_fraction=args.val_fraction, seed=args.seed, images=args.images
        )
        decision = decide(
            candidate, served, dataset, args.metric, args.min_delta, args.force, args.batch_size
        )
    except (ArtifactError, DatasetError, ValueError, OSError) as exc:
        print(f"ssd promote: {exc}", file=sys.stderr)
        return 2
    verb = "promoted" if decision.promoted else "kept the served model"
    print(f"ssd promote: {verb}: {decision.reason}", file=sys.stderr)
    print(json.dumps(asdict(decision)))
    return 0 if decision.promoted else 1
