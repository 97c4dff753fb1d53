"""Why an artifact and its reference disagree: the first stage of the pipeline where they part.

Run only when verification fails. Both pipelines are cut at the same seams:

1. network outputs (class scores) and 2. decoded boxes: the reference's own (``Reference.raw``)
   against the artifact's, read from a raw export of the same network;
3. per-class candidates (top-k per class above the threshold, empty boxes dropped),
4. NMS survivors and 5. the cut at K: the same eager steps run on each side's scores and boxes;
then each side's final detections against the eager selection of its own scores and boxes, which
catches a post-processing of its own that differs (the reference's, or the graph's selection).

A difference explained by a tie (scores within the tolerance at a cut) is said to be one: float
rounding, not a bug. Anything else points at the network's conversion (stages 1-2), at the
reference's post-processing, or at the exporter's selection graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms

from model.config import PostprocessConfig
from model.postprocess import select_detections

from .reference import Raw, Reference
from .verify import BOX_ATOL, SCORE_ATOL, Outputs, Report, candidates, compare_image

# Float rounding through a whole network moves a raw score by up to ~1e-4 (a handful of the ~10^6
# values of a batch), which verification only sees where such a score is a detection: the raw
# stages are called divergent beyond ten times the detection tolerances.
RAW_FACTOR = 10


Selection = tuple[np.ndarray, np.ndarray]  # box indices, their scores


@dataclass
class _Image:
    """One image's selection, step by step: per group, (prior indices, scores), descending."""

    candidates: dict[int, Selection]
    survivors: dict[int, Selection]
    final: list[tuple[int, int, float]]  # (group, prior, score), the first K


def _select_image(scores: np.ndarray, boxes: np.ndarray, config: PostprocessConfig) -> _Image:
    columns, entering = candidates(scores, boxes, config)
    groups, survivors, pool = {}, {}, []
    for group, top in enumerate(entering):
        column = columns[:, group]
        groups[group] = (top, column[top])
        kept = nms(torch.from_numpy(boxes[top]), torch.from_numpy(column[top]), config.iou_threshold).numpy()
        survivors[group] = (top[kept], column[top[kept]])
        pool += [(group, int(p), float(s)) for p, s in zip(top[kept], column[top[kept]], strict=True)]
    pool.sort(key=lambda t: -t[2])
    return _Image(groups, survivors, pool[: config.max_detections])


def _sets_differ(
    stage: str, where: str, ref: Selection, got: Selection, threshold: float, thin: set[int]
) -> str | None:
    """Compare two (box indices, scores) selections; a sentence when they differ. ``thin``: the
    boxes within rounding of zero width or height on either side (empty on one, not the other)."""
    ref_scores = dict(zip(ref[0].tolist(), ref[1].tolist(), strict=True))
    got_scores = dict(zip(got[0].tolist(), got[1].tolist(), strict=True))
    only_ref = [p for p in ref_scores if p not in got_scores]
    only_got = [p for p in got_scores if p not in ref_scores]
    if not only_ref and not only_got:
        return None
    lone = [(p, ref_scores[p]) for p in only_ref] + [(p, got_scores[p]) for p in only_got]
    everything = np.array(list(ref_scores.values()) + list(got_scores.values()))
    edges = [threshold, *ref[1][-1:], *got[1][-1:]]  # where a cut falls

    def tied(box: int, s: float) -> bool:
        near = np.abs(everything - s) <= SCORE_ATOL * (1 + abs(s))  # itself, and a swap partner?
        at_edge = any(abs(s - e) <= SCORE_ATOL * (1 + abs(s)) for e in edges)
        return near.sum() >= 2 or at_edge or box in thin

    verdict = (
        f"a tie (scores within {SCORE_ATOL:g} of another's or of the cut, or a box within rounding of empty: "
        "float rounding decides, not a bug)"
        if all(tied(box, s) for box, s in lone)
        else "not explained by a tie"
    )

    def listed(scores: dict[int, float], boxes: list[int]) -> str:
        shown = ", ".join(f"box {b} ({scores[b]:.7f})" for b in boxes[:3])
        return (shown + (f" and {len(boxes) - 3} more" if len(boxes) > 3 else "")) or "none"

    return (
        f"{stage}: {where}: {len(ref_scores)} in the reference, {len(got_scores)} in the artifact; "
        f"only in the reference: {listed(ref_scores, only_ref)}; only in the artifact: "
        f"{listed(got_scores, only_got)}; {verdict}"
    )


def _first_raw_difference(name: str, ref: np.ndarray, got: np.ndarray, atol: float, what: str) -> str | None:
    error = np.abs(ref.astype(np.float64) - got)
    atol *= RAW_FACTOR
    allowed = atol * (1 + np.abs(ref)) if what == "class scores" else atol
    over = error > allowed
    if not over.any():
        return None
    where = np.unravel_index(int(np.argmax(np.where(over, error, -1))), ref.shape)
    image, box, column = (int(i) for i in where)
    return (
        f"{name}: {what} differ by up to {error.max():.2e} (tolerance {atol:g}) in {int(over.sum())} "
        f"values; largest at image {image}, box {box}, {'class' if what == 'class scores' else 'coordinate'} "
        f"{column}: {ref[where]:.7f} in the reference, {got[where]:.7f} in the artifact. The network or "
        "its decoding is converted differently: a model or converter problem, before any selection"
    )


def _own_selection(
    name: str, final: Outputs, raw: Raw, config: PostprocessConfig, threshold: float
) -> str | None:
    """The side's final detections against the eager selection of its own scores and boxes."""
    scores, boxes = (torch.from_numpy(np.ascontiguousarray(a)) for a in raw)
    eager = Outputs(*(t.numpy() for t in select_detections(scores, boxes, config)))
    for i in range(len(final.num_detections)):
        report = Report()
        compare_image(eager.image(i), final.image(i), BOX_ATOL, SCORE_ATOL, threshold, "first", report)
        if report.problems:
            n, m = int(eager.num_detections[i]), int(final.num_detections[i])
            stage = "the cut at K" if n != m else "NMS survivors"
            return (
                f"{stage}: {name}'s own post-processing differs from the per-class selection of its own "
                f"scores and boxes: image {i}: {m} detections where the selection gives {n}; "
                + report.problems[0]
                .replace("reference detection", "the selection's detection")
                .replace("artifact detection", f"{name}'s detection")
            )
    return None


def explain(
    reference: Reference,
    artifact: Callable[[np.ndarray], Outputs],
    artifact_raw: Callable[[np.ndarray], Raw],
    images: np.ndarray,
    config: PostprocessConfig,
) -> str:
    """The first stage at which ``artifact`` parts from ``reference`` on ``images``, in words."""
    ref_scores, ref_boxes = reference.raw(images)
    got_scores, got_boxes = artifact_raw(images)
    for finding in (
        _first_raw_difference("network outputs", ref_scores, got_scores, SCORE_ATOL, "class scores"),
        _first_raw_difference("decoded boxes", ref_boxes, got_boxes, BOX_ATOL, "box coordinates"),
    ):
        if finding:
            return finding
    agree = (
        f"(network outputs agree within {np.abs(ref_scores - got_scores).max(initial=0):.1e}, decoded boxes "
        f"within {np.abs(ref_boxes - got_boxes).max(initial=0):.1e}) "
    )
    finals = (reference.detect(images), artifact(images))
    return agree + _first_selection_difference(
        (ref_scores, ref_boxes), (got_scores, got_boxes), finals, reference.name, config
    )


def _first_selection_difference(
    ref_raw: Raw,
    got_raw: Raw,
    finals: tuple[Outputs, Outputs],
    reference_name: str,
    config: PostprocessConfig,
) -> str:
    """Stages 3 to 5 on each side's scores and boxes, then each side's own post-processing."""
    (ref_scores, ref_boxes), (got_scores, got_boxes) = ref_raw, got_raw
    group_name = "all classes" if config.class_agnostic else "class"
    for i in range(len(ref_scores)):
        sides = (ref_boxes[i], got_boxes[i])
        thin = set(
            np.flatnonzero(
                np.any([np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) <= BOX_ATOL for b in sides], axis=0)
            ).tolist()
        )
        ref = _select_image(ref_scores[i], ref_boxes[i], config)
        got = _select_image(got_scores[i], got_boxes[i], config)
        for stage, ref_groups, got_groups in (
            ("per-class candidates", ref.candidates, got.candidates),
            ("NMS survivors", ref.survivors, got.survivors),
        ):
            for group in ref_groups:
                label = group_name if config.class_agnostic else f"{group_name} {group}"
                finding = _sets_differ(
                    stage,
                    f"image {i}, {label}",
                    ref_groups[group],
                    got_groups[group],
                    config.score_threshold,
                    thin,
                )
                if finding:
                    return finding
        ref_final = (np.array([g * 10**7 + p for g, p, _ in ref.final]), np.array([s for *_, s in ref.final]))
        got_final = (np.array([g * 10**7 + p for g, p, _ in got.final]), np.array([s for *_, s in got.final]))
        finding = _sets_differ(
            f"the cut at K = {config.max_detections}",
            f"image {i}",
            ref_final,
            got_final,
            config.score_threshold,
            {g * 10**7 + p for g in range(ref_scores.shape[2]) for p in thin},
        )
        if finding:
            return finding + " (boxes numbered class * 10^7 + box)"
    for name, final, raw in (
        (reference_name, finals[0], ref_raw),
        ("the artifact's selection graph", finals[1], got_raw),
    ):
        finding = _own_selection(name, final, raw, config, config.score_threshold)
        if finding:
            return finding
    score_error = float(np.abs(ref_scores - got_scores).max(initial=0))
    box_error = float(np.abs(ref_boxes - got_boxes).max(initial=0))
    if score_error > SCORE_ATOL or box_error > BOX_ATOL:
        return (
            "every stage selects the same boxes on both sides; the mismatches are scores or boxes "
            f"outside the tolerance ({SCORE_ATOL:g}, {BOX_ATOL:g}) by float rounding in the network "
            f"(up to {score_error:.1e} and {box_error:.1e}), not a selection problem"
        )
    return "no stage differs on these images when run alone: the difference depends on the batch"
