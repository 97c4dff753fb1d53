"""Parts of a dataset: some of its classes, and a validation share held out of a split.

Both are pure functions of their arguments (a seed, never the global random state), so that
``ssd train`` and ``ssd evaluate`` given the same options see the same images.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import open_dataset, splits
from .base import DatasetError, DetectionDataset, Transform


def parse_classes(text: str) -> list[str]:
    """``--classes a,b,c`` as a list, in the order given; spaces around names are dropped. An
    ``.onnx`` artifact's path stands for its classes in its order: a model trained so can replace
    it (``ssd promote`` compares classes and their order first)."""
    if text.lower().endswith(".onnx"):
        return _artifact_classes(Path(text))
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise DatasetError(f"--classes {text!r}: no class names")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DatasetError(f"--classes names {', '.join(repeated)} more than once")
    return names


def _artifact_classes(path: Path) -> list[str]:
    import json

    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
        classes = json.loads({p.key: p.value for p in model.metadata_props}["classes"])
    except FileNotFoundError:
        raise DatasetError(f"--classes {path}: no such artifact") from None
    except (OSError, ValueError, KeyError, DecodeError) as exc:
        raise DatasetError(
            f"--classes {path}: not an artifact with its classes in its metadata ({exc})"
        ) from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise DatasetError(f"--classes {path}: its metadata's classes are not a list of names")
    return classes


def select_classes(dataset: DetectionDataset, names: Sequence[str]) -> tuple[DetectionDataset, Counter[str]]:
    """The dataset with only the classes ``names``, numbered in that order.

    Boxes of the other classes are dropped (crowd and difficult ones too); images left without
    boxes stay, as background. Returns the dataset and the count of boxes dropped per class
    (crowd boxes left out of the count, as the summary leaves them out)."""
    unknown = [name for name in names if name not in dataset.classes]
    if unknown:
        raise DatasetError(
            f"classes {', '.join(unknown)} are not in the dataset; its classes: {', '.join(dataset.classes)}"
        )
    new_label = np.full(len(dataset.classes), -1, dtype=np.int64)
    for new, name in enumerate(names):
        new_label[dataset.classes.index(name)] = new
    dropped: Counter[str] = Counter()
    annotations = []
    for ann in dataset.annotations:
        labels = new_label[ann.labels] if len(ann.labels) else ann.labels
        keep = labels >= 0
        for old in ann.labels[~keep & ~ann.crowd].tolist():
            dropped[dataset.classes[old]] += 1
        annotations.append(
            dataclasses.replace(
                ann,
                boxes=ann.boxes[keep],
                labels=labels[keep],
                difficult=ann.difficult[keep],
                crowd=ann.crowd[keep],
            )
        )
    ids = [dataset.category_ids[dataset.classes.index(name)] for name in names]
    subset = DetectionDataset(
        annotations,
        names,
        dataset.transform,
        category_ids=ids,
        skipped=dataset.skipped,
        notes=dataset.notes,
    )
    return subset, dropped


def hold_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``count`` images split into (train, validation): ``round(fraction * count)``
    of them, at least 1 and at most ``count - 1``, chosen by ``seed``; both lists sorted."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction {fraction}: must be between 0 and 1")
    if count < 2:
        raise DatasetError(f"{count} image(s): too few to hold any out for validation")
    held = min(count - 1, max(1, round(fraction * count)))
    chosen = set(random.Random(seed).sample(range(count), held))
    return [i for i in range(count) if i not in chosen], sorted(chosen)


def subset(
    dataset: DetectionDataset, indices: Sequence[int], transform: Transform | None
) -> DetectionDataset:
    """The images ``indices`` of ``dataset``, with ``transform``."""
    return DetectionDataset(
        [dataset.annotations[i] for i in indices],
        dataset.classes,
        transform,
        category_ids=dataset.category_ids,
        skipped=dataset.skipped,
        notes=dataset.notes,
    )


@dataclass(frozen=True)
class TrainingSplits:
    """What a run trains and validates on, and how that was decided (for the log, config.yaml
    and the closing summary)."""

    train: DetectionDataset
    val: DetectionDataset | None
    train_split: str
    validation: str  # how the validation images were chosen, in words
    val_fraction: float | None  # the share held out of the training split; None: a split of its own
    dropped: Counter[str] = field(default_factory=Counter)  # boxes of classes left out, per class


def open_training_splits(
    data: str | Path,
    train_split: str | None,
    val_split: str | None,
    *,
    val_fraction: float,
    seed: int,
    images: str | Path | None = None,
    classes: Sequence[str] | None = None,
    transform: Transform | None = None,
) -> TrainingSplits:
    """The training split (with ``transform``) and the validation split of ``data``.

    ``train_split`` None: ``train``, or the data's only split. ``val_split`` None: ``val`` where
    the data has it, else a seeded ``val_fraction`` of the training split held out (none with
    0). A split named explicitly must exist. ``classes``: only these, in this order."""
    available = splits(data)
    unnamed = available == [""]
    train_name = _training_split(data, train_split, available)
    full = open_dataset(data, train_name or "train", images_dir=images)
    dropped: Counter[str] = Counter()
    if classes is not None:
        full, dropped = select_classes(full, classes)
    shown = f"split {train_name!r}" if train_name else "the data"
    if val_split is not None or (not unnamed and "val" in available and train_name != "val"):
        name = val_split or "val"
        if not unnamed and name not in available:
            raise DatasetError(
                f"{data}: no split {name!r} to validate on; splits here: {', '.join(available)}"
            )
        val = open_dataset(data, name, images_dir=images)
        if classes is not None:
            val, _ = select_classes(val, classes)
        # Data named for no split opens under any name: the same images as training.
        validation = "the training images themselves (--val-split)" if unnamed else f"split {name!r}"
        return TrainingSplits(
            subset(full, range(len(full)), transform), val, train_name, validation, None, dropped
        )
    if val_fraction == 0:
        return TrainingSplits(
            subset(full, range(len(full)), transform),
            None,
            train_name,
            "none (--val-fraction 0)",
            0.0,
            dropped,
        )
    kept, held = hold_out(len(full), val_fraction, seed)
    validation = f"{len(held)} images held out of {shown} (--val-fraction {val_fraction:g}, --seed {seed})"
    return TrainingSplits(
        subset(full, kept, transform), subset(full, held, None), train_name, validation, val_fraction, dropped
    )


def _training_split(data: str | Path, asked: str | None, available: list[str]) -> str:
    if available == [""]:
        return ""
    if asked is not None:
        if asked not in available:
            raise DatasetError(f"{data}: no split {asked!r}; splits here: {', '.join(available) or 'none'}")
        return asked
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise DatasetError(
        f"{data}: no split 'train'; splits here: {', '.join(available) or 'none'}; "
        "name one with --train-split"
    )


def open_evaluation_split(
    data: str | Path,
    split: str,
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    images: str | Path | None = None,
) -> DetectionDataset:
    """The images to evaluate on: ``split``, or with ``val_fraction`` the images a training run
    with the same fraction and seed held out of the data's one split."""
    if val_fraction is None:
        available = splits(data)
        if available and available != [""] and split not in available and len(available) == 1:
            raise DatasetError(
                f"{data}: no split {split!r}; the data has one split, {available[0]!r}. A run trained on "
                f"it validated on a share held out of it: pass the same --val-fraction and --seed to "
                f"evaluate those images, or --split {available[0]} for all of it"
            )
        return open_dataset(data, split, images_dir=images)
    available = splits(data)
    if len(available) > 1:
        raise DatasetError(
            f"{data}: --val-fraction holds images out of a dataset with one split; this one has "
            f"{', '.join(available)}: use --split"
        )
    full = open_dataset(data, available[0] if available else split, images_dir=images)
    _, held = hold_out(len(full), val_fraction, seed)
    return subset(full, held, None)


def class_difference(ours: Sequence[str], theirs: Sequence[str], our_name: str, their_name: str) -> str:
    """How two class lists differ, briefly: the names one has and the other lacks (a few of each,
    then a count), or the first place where the same names stand in another order."""
    ours, theirs = list(ours), list(theirs)
    missing = [c for c in theirs if c not in ours]
    extra = [c for c in ours if c not in theirs]
    parts = []
    if extra:
        parts.append(f"{our_name} has {_few(extra)} that {their_name} lacks")
    if missing:
        parts.append(f"{their_name} has {_few(missing)} that {our_name} lacks")
    if not parts:
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        parts.append(
            f"the same {len(ours)} classes in another order (class {at} is {ours[at]!r} in {our_name}, "
            f"{theirs[at]!r} in {their_name})"
        )
    return "; ".join(parts)


def _few(names: Sequence[str], shown: int = 5) -> str:
    listed = ", ".join(names[:shown])
    return (
        f"{len(names)} classes ({listed}{f', and {len(names) - shown} more' if len(names) > shown else ''})"
    )


def fit_classes(
    dataset: DetectionDataset, classes: Sequence[str], model_name: str
) -> tuple[DetectionDataset, str | None]:
    """The dataset as a model of ``classes`` sees it: itself when the classes are the same; its
    selection when the model's are some of the data's (a run with ``--classes``), with a note
    saying so; else DatasetError naming the difference."""
    if list(classes) == list(dataset.classes):
        return dataset, None
    if all(name in dataset.classes for name in classes):
        selected, dropped = select_classes(dataset, classes)
        note = (
            f"{model_name} detects {len(classes)} of the data's {len(dataset.classes)} classes: "
            f"evaluated on those, {sum(dropped.values())} objects of the others left out"
        )
        return selected, note
    raise DatasetError(
        f"{model_name} and the data name other classes: "
        + class_difference(classes, dataset.classes, model_name, "the data")
    )
