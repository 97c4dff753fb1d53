"""What a dataset holds, said when it opens: images, objects per class, object sizes, and every
file or box that was left out, with why. A user who pasted a dataset together sees at once a
class with no objects, labels that matched no image, or objects too small for the model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .base import DetectionDataset

# Object size as a fraction of the image side (sqrt of the box's area over the image's): SSD's
# smallest default boxes are about 0.1 of the input side (0.07 for SSD300's first layer), so
# objects below 0.05 are mostly out of its reach.
SIZE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 5%", 0.05),
    ("5-10%", 0.10),
    ("10-30%", 0.30),
    ("30-60%", 0.60),
    (">= 60%", float("inf")),
)


@dataclass
class Summary:
    name: str
    images: int
    without_objects: int
    objects: dict[str, int]
    sizes: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    purpose: str = "train"  # what the split is for: "train" or "val"

    @classmethod
    def of(cls, dataset: DetectionDataset, name: str, purpose: str = "train") -> Summary:
        per_class: Counter[int] = Counter()
        sizes: Counter[str] = Counter()
        without = 0
        for ann in dataset.annotations:
            keep = ~ann.crowd
            labels, boxes = ann.labels[keep], ann.boxes[keep]
            without += len(labels) == 0
            per_class.update(labels.tolist())
            side = np.sqrt(
                (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (ann.width * ann.height)
            )
            for fraction in side.tolist():
                sizes[next(label for label, upper in SIZE_BUCKETS if fraction < upper)] += 1
        return cls(
            name=name,
            images=len(dataset),
            without_objects=without,
            objects={c: per_class.get(i, 0) for i, c in enumerate(dataset.classes)},
            sizes={label: sizes.get(label, 0) for label, _ in SIZE_BUCKETS},
            skipped=list(dataset.skipped),
            notes=list(dataset.notes),
            purpose=purpose,
        )

    def lines(self, max_skipped: int = 20) -> list[str]:
        """The summary as log lines: every skipped file up to ``max_skipped``, then a count."""
        total = sum(self.objects.values())
        lines = [
            f"{self.name}: {self.images} images ({self.without_objects} without objects), "
            f"{total} objects in {len(self.objects)} classes"
        ]
        width = max(len(c) for c in self.objects) if self.objects else 0
        # A class without objects: not learnt from a training split, not measured on a validation one.
        missing = "cannot be learnt from" if self.purpose == "train" else "cannot be evaluated on"
        for name, count in self.objects.items():
            warning = f"  <- no objects: this class {missing} this split" if count == 0 else ""
            lines.append(f"  {name:<{width}}  {count:>7}{warning}")
        if total:
            shares = ", ".join(f"{label} {count / total:.0%}" for label, count in self.sizes.items())
            lines.append(f"  object size (of the image side): {shares}")
        lines += [f"  {note}" for note in self.notes]
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)}")
            lines += [f"    {path}: {reason}" for path, reason in self.skipped[:max_skipped]]
            if len(self.skipped) > max_skipped:
                lines.append(f"    ... and {len(self.skipped) - max_skipped} more")
        return lines
