"""Checking an artifact against its PyTorch reference with ONNX Runtime on the CPU.

The contract: same counts and labels, boxes within 1e-4, scores within 1e-4, for batches of 1, 2,
7 and 16. The reference runs once, on the largest batch: it treats images one by one (eval mode),
so comparing every batch size with it also checks that a batch gives what its images give alone.
Scores are compared as numpy's ``isclose`` does, with rtol = atol = 1e-4: ONNX Runtime's and
PyTorch's convolutions sum in different orders, and through a whole VGG16 a score of 0.88 moves by
up to 4e-5 (the model sweep, tests/test_export_sweep.py, measured up to 1e-4 among a batch's
million raw scores). A bug in the graph (a wrong variance, softmax axis or default box) moves
scores and boxes by orders of magnitude more.

"Ties aside": when two candidates' scores are within the tolerance, float rounding may order
them either way, which can swap which of them survives NMS or the cut at K. Likewise a box that
clipping leaves within rounding of zero width or height is empty on one side and not the other. A
detection without a partner is excused only when such a tie explains it (a same-class detection
with a score within the tolerance, a score at the threshold or at the K-th place, or a box
thinner than the box tolerance); anything else is a mismatch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from model.config import PostprocessConfig
from model.evaluation import box_iou


class VerificationError(RuntimeError):
    pass


class Outputs(NamedTuple):
    """Padded detections as numpy arrays, the artifact's four outputs."""

    num_detections: np.ndarray  # int64 [B]
    boxes: np.ndarray  # float32 [B, K, 4]
    scores: np.ndarray  # float32 [B, K]
    labels: np.ndarray  # int64 [B, K]

    def image(self, i: int) -> Outputs:
        n = int(self.num_detections[i])
        return Outputs(
            self.num_detections[i : i + 1], self.boxes[i, :n], self.scores[i, :n], self.labels[i, :n]
        )


Reference = Callable[[np.ndarray], Outputs]  # uint8 [B, H, W, 3] -> outputs
BATCH_SIZES = (1, 2, 7, 16)
BOX_ATOL = 1e-4
SCORE_ATOL = 1e-4


@dataclass
class Report:
    batch_sizes: list[int] = field(default_factory=list)
    detections: int = 0  # reference detections compared
    excused: int = 0  # unmatched, explained by a tie
    cascades: int = 0  # images whose differences are a cascade of ties (valid_selection)
    max_box_error: float = 0.0
    max_score_error: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"batches {self.batch_sizes}: {self.detections} detections, max box error "
            f"{self.max_box_error:.2e}, max score error {self.max_score_error:.2e}, {self.excused} tie(s)"
            + (f" ({self.cascades} image(s) with a cascade of ties)" if self.cascades else "")
        )


def session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # As the service does (service/artifact.py usable_cores): ONNX Runtime sizes its pool by the
    # machine's cores, not by those this process may run on (taskset, a cpuset).
    usable = len(os.sched_getaffinity(0))
    if usable < (os.cpu_count() or usable):
        options.intra_op_num_threads = usable
    return ort.InferenceSession(str(path), options, providers=list(providers))


def run(sess: ort.InferenceSession, images: np.ndarray) -> Outputs:
    return Outputs(*sess.run(["num_detections", "boxes", "scores", "labels"], {"images": images}))


def compare_image(
    ref: Outputs,
    got: Outputs,
    box_atol: float,
    score_atol: float,
    score_threshold: float,
    where: str,
    report: Report,
) -> None:
    """Match one image's detections (``Outputs.image``) one to one and record the differences."""
    used = np.zeros(len(got.scores), dtype=bool)
    unmatched_ref: list[int] = []
    report.detections += len(ref.scores)
    for i in range(len(ref.scores)):
        close = (
            ~used
            & (got.labels == ref.labels[i])
            & (np.abs(got.scores - ref.scores[i]) <= score_atol * (1.0 + abs(ref.scores[i])))
            & (np.abs(got.boxes - ref.boxes[i]).max(axis=1, initial=0.0) <= box_atol)
        )
        if not close.any():
            unmatched_ref.append(i)
            continue
        j = int(np.argmax(close))
        used[j] = True
        report.max_box_error = max(report.max_box_error, float(np.abs(got.boxes[j] - ref.boxes[i]).max()))
        report.max_score_error = max(report.max_score_error, float(abs(got.scores[j] - ref.scores[i])))

    def tie(side: Outputs, i: int, other: Outputs) -> bool:
        s, label = side.scores[i], side.labels[i]
        at_edge = abs(s - score_threshold) <= score_atol or (
            len(side.scores) > 0 and abs(s - side.scores[-1]) <= score_atol
        )
        same = np.concatenate(
            [
                np.delete(side.scores, i)[np.delete(side.labels, i) == label],
                other.scores[other.labels == label],
            ]
        )
        x1, y1, x2, y2 = side.boxes[i]
        thin = min(x2 - x1, y2 - y1) <= box_atol
        return at_edge or thin or bool((np.abs(same - s) <= score_atol).any())

    for name, side, other, indices in (
        ("reference", ref, got, unmatched_ref),
        ("artifact", got, ref, np.flatnonzero(~used).tolist()),
    ):
        for i in indices:
            if tie(side, i, other):
                report.excused += 1
            else:
                report.problems.append(
                    f"{where}: {name} detection (label {side.labels[i]}, score {side.scores[i]:.6f}, "
                    f"box {np.round(side.boxes[i], 5).tolist()}) has no counterpart"
                )


def candidates(
    scores: np.ndarray, boxes: np.ndarray, config: PostprocessConfig
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One image's NMS input, as the selection forms it: the scored columns [N, G] (per class, or
    each box's best class when class-agnostic) and, per column, the boxes that enter NMS, best
    first (its top k, above the threshold, not empty)."""
    columns = scores.max(axis=1, keepdims=True) if config.class_agnostic else scores
    k = min(config.topk_candidates, columns.shape[0])
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    groups = []
    for column in columns.T:
        top = np.argsort(-column, kind="stable")[:k]
        groups.append(top[(column[top] > config.score_threshold) & nonempty[top]])
    return columns, groups


def valid_selection(
    got: Outputs,
    scores: np.ndarray,
    boxes: np.ndarray,
    config: PostprocessConfig,
    box_atol: float = BOX_ATOL,
    score_atol: float = SCORE_ATOL,
    iou_atol: float = 1e-3,
) -> str | None:
    """Whether one image's detections ``got`` are what the selection makes of the reference's
    ``scores`` [N, C] and ``boxes`` [N, 4] when scores within the tolerance may be taken in either
    order: None if so, else the reason.

    Greedy NMS over near-equal overlapping candidates can keep either one, and the choice then
    cascades (the one kept suppresses others), so one float rounding can change several
    detections that are no tie themselves. A result is such a valid selection when every
    detection is a candidate (top-k of its class above the threshold, ties at the k-th place
    allowed), no two kept boxes of a class overlap beyond the IoU threshold, and every candidate
    left out that scores above the last kept one is suppressed by a kept box of its class scoring
    at least as high, ties allowed. IoUs get ``iou_atol`` either way (boxes agree to 1e-4 only).
    """
    if (np.diff(got.scores) > 0).any():
        return "scores are not in descending order"
    columns, entering = candidates(scores, boxes, config)
    best = scores.argmax(axis=1)
    k = min(config.topk_candidates, columns.shape[0])
    floor = got.scores[-1] - score_atol if len(got.scores) == config.max_detections else -np.inf
    kept: dict[int, list[int]] = {}
    for j, (label, box, score) in enumerate(zip(got.labels, got.boxes, got.scores, strict=True)):
        group = 0 if config.class_agnostic else int(label)
        column = columns[:, group]
        kth = np.partition(column, -k)[-k]
        close = (
            (np.abs(column - score) <= score_atol * (1 + abs(score)))
            & (np.abs(boxes - box).max(axis=1) <= box_atol)
            & (column >= kth - score_atol)
            & (not config.class_agnostic or best == label)
        )
        if not close.any():
            return f"detection {j} (label {label}, score {score:.6f}) is no candidate of the reference's"
        kept.setdefault(group, []).append(int(np.argmax(close)))
    for group in range(columns.shape[1]):
        column = columns[:, group]
        mine = np.array(kept.get(group, []), dtype=np.int64)
        overlap = box_iou(boxes[mine], boxes[mine])
        np.fill_diagonal(overlap, 0.0)
        if (overlap > config.iou_threshold + iou_atol).any():
            return f"two detections of class {group} overlap by IoU {overlap.max():.3f}: NMS would keep one"
        left_out = entering[group]
        left_out = np.setdiff1d(left_out[column[left_out] > floor], mine)
        if not len(left_out):
            continue
        suppressed = (box_iou(boxes[left_out], boxes[mine]) > config.iou_threshold - iou_atol) & (
            column[mine][None, :] >= column[left_out][:, None] - score_atol
        )
        missing = left_out[~suppressed.any(axis=1)] if len(mine) else left_out
        if len(missing):
            p = int(missing[0])
            return (
                f"candidate {p} of class {group} (score {column[p]:.6f}) is neither kept nor suppressed "
                "by a kept box scoring as high"
            )
    return None


def verify(
    sess: ort.InferenceSession,
    reference: Reference,
    images: np.ndarray,
    config: PostprocessConfig,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    box_atol: float = BOX_ATOL,
    score_atol: float = SCORE_ATOL,
) -> Report:
    """Compare the artifact at each batch size (the first images) with the reference. An image
    whose detections differ beyond ties is checked once more as a selection of the reference's
    own scores and boxes (``valid_selection``; where the reference gives them, ``raw``), which
    excuses tie cascades. Raises VerificationError listing mismatches."""
    report = Report(batch_sizes=list(batch_sizes))
    largest = max(batch_sizes)
    if largest > len(images):
        raise ValueError(f"batch {largest} needs {largest} images, {len(images)} given")
    ref = reference(images[:largest])
    raw = getattr(reference, "raw", None)
    ref_raw: tuple[np.ndarray, np.ndarray] | None = None
    for b in batch_sizes:
        got = run(sess, images[:b])
        for i in range(b):
            where = f"batch {b}, image {i}"
            found = Report()
            compare_image(
                ref.image(i), got.image(i), box_atol, score_atol, config.score_threshold, where, found
            )
            report.detections += found.detections
            report.excused += found.excused
            report.max_box_error = max(report.max_box_error, found.max_box_error)
            report.max_score_error = max(report.max_score_error, found.max_score_error)
            if not found.problems:
                continue
            if raw is not None and ref_raw is None:
                ref_raw = raw(images[:largest])
            reason = (
                valid_selection(got.image(i), ref_raw[0][i], ref_raw[1][i], config, box_atol, score_atol)
                if ref_raw is not None
                else "no raw outputs to check it against"
            )
            if reason is None:
                report.excused += len(found.problems)  # a cascade of ties
                report.cascades += 1
            else:
                report.problems += [*found.problems, f"{where}: not a valid selection either: {reason}"]
    if report.problems:
        shown = "\n  ".join(report.problems[:10])
        more = f"\n  ... and {len(report.problems) - 10} more" if len(report.problems) > 10 else ""
        raise VerificationError(
            f"the artifact does not match PyTorch ({len(report.problems)} mismatches):\n  {shown}{more}"
        )
    return report


def agreement(ref: Outputs, got: Outputs, min_score: float = 0.3, box_atol: float = 2e-3) -> tuple[int, int]:
    """How many of the reference's detections above ``min_score`` the other run has too (same
    label, boxes within ``box_atol``): (found, total). For float16 against float32 artifacts."""
    found = total = 0
    for i in range(len(ref.num_detections)):
        r, g = ref.image(i), got.image(i)
        used = np.zeros(len(g.scores), dtype=bool)
        for j in np.flatnonzero(r.scores > min_score):
            total += 1
            close = (
                ~used
                & (g.labels == r.labels[j])
                & (np.abs(g.boxes - r.boxes[j]).max(axis=1, initial=0.0) <= box_atol)
            )
            if close.any():
                used[int(np.argmax(close))] = True
                found += 1
    return found, total
