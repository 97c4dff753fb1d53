"""Label Studio's ``predict``: its tasks' images fetched from Label Studio and run through the
core (service/pipeline.py), at most ``SSD_MAX_IMAGES_PER_REQUEST`` at a time.

Label Studio sends every task it wants predictions for in one request (all of a project's, when
someone asks it to), and stores nothing unless the answer has exactly one item per task
(label_studio/ml/models.py). So the tasks are cut into chunks, and each chunk is one inference
request of the core, with its own ``Call``: the door, the request bytes, admission of its image
count, and a deadline of ``SSD_REQUEST_TIMEOUT_S`` from the chunk's start. A task whose image
cannot be fetched or decoded gets an item with an ``error`` and no ``result``, which Label Studio
logs and skips, storing the others' predictions. When the core refuses a chunk (503, 504), a
chunk before it has already been answered: the tasks left get that error as theirs, and a
later ``predict`` (they have no prediction of this model version) asks for them again. When
it refuses the first, the request is answered with the refusal itself.

Label Studio waits 100 s for the answer and stores nothing of a request it gave up on, however
much was done; so no chunk starts after ``SSD_LABELSTUDIO_PREDICT_S`` (80 s), and the tasks left
get an error and are asked for again by the next ``predict``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..errors import APIError
from ..pipeline import BadImage, Call, Found, Query
from ..state import State
from ..tiling import Tiling
from ..uploads import until_disconnect
from .client import FetchError, LabelStudio
from .config import LabelMap, Target
from .results import prediction

log = logging.getLogger(__name__)
ROUTE = "/labelstudio/predict"


@dataclass(frozen=True)
class Task:
    """A task as Label Studio sends it: its id and its data (the image URL under the key the
    labelling config shows)."""

    id: int
    data: dict[str, Any]

    @classmethod
    def parse(cls, tasks: Any) -> list[Task]:
        if not isinstance(tasks, list) or not tasks:
            raise APIError(422, "tasks: a non-empty list of tasks is needed", "invalid_parameters")
        out = []
        for i, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise APIError(
                    422, f"tasks[{i}]: an object with a data object is needed", "invalid_parameters"
                )
            ident = task.get("id")
            if not isinstance(ident, int) or isinstance(ident, bool):
                raise APIError(422, f"tasks[{i}]: an integer id is needed", "invalid_parameters")
            out.append(cls(ident, task["data"]))
        return out


@dataclass(frozen=True)
class Ask:
    """What one ``predict`` asks of the core, the same for each of its chunks."""

    model: str | None
    version: str | None
    query: Callable[[Call], Query]  # checked against the model each chunk resolves
    tiling: Tiling | None
    target: Target
    labels: Callable[[Call], LabelMap]
    model_version: Callable[[Call, list[Found]], str]


async def predict(
    request: Request, state: State, studio: LabelStudio | None, tasks: list[Task], ask: Ask
) -> list[dict[str, Any]]:
    """One item per task, in order: its prediction, or its error."""
    items: list[dict[str, Any] | None] = [None] * len(tasks)
    size, budget = state.settings.max_images_per_request, state.settings.labelstudio_predict_s
    began = time.monotonic()
    for start in range(0, len(tasks), size):
        if start and time.monotonic() - began > budget:
            _left(
                items,
                tasks,
                start,
                f"within this request's {budget:g} s (SSD_LABELSTUDIO_PREDICT_S); ask again",
            )
            break
        chunk = list(range(start, min(start + size, len(tasks))))
        try:
            await _chunk(request, state, studio, tasks, chunk, ask, items)
        except APIError as exc:
            if exc.status < 500 or start == 0:
                raise
            # Counted once under its reason (service/accounting.py), though the answer is a 200.
            request.scope["state"]["call"].fail(exc)
            _left(items, tasks, start, f": {exc.message}")
            break
    return [item or {"error": "not predicted"} for item in items]


def _left(items: list[dict[str, Any] | None], tasks: list[Task], start: int, why: str) -> None:
    """The tasks from ``start`` on, not predicted by this request: each gets the reason."""
    log.warning("labelstudio: %d tasks left for a later predict: not predicted%s", len(tasks) - start, why)
    for i in range(start, len(tasks)):
        items[i] = {"error": f"task {tasks[i].id}: not predicted{why}"}


async def _chunk(
    request: Request,
    state: State,
    studio: LabelStudio | None,
    tasks: list[Task],
    chunk: list[int],
    ask: Ask,
    items: list[dict[str, Any] | None],
) -> None:
    """One chunk of tasks through the core, each item written into ``items``."""
    call = Call(state, ROUTE)
    previous = request.scope.setdefault("state", {}).get("call")
    if previous is not None:
        previous.close()
    # The request's accounting (service/middleware.py) records the chunk that answered last.
    request.scope["state"]["call"] = call
    call.resolve(ask.model, ask.version)
    query = ask.query(call)
    due = call.set_deadline(None)
    call.bytes = state.budget.reservation()
    settings = state.settings
    async with call.door(due):
        # Every fetch ends before the chunk goes on (none left holding request bytes); a refusal
        # of the whole chunk (the request budget's 503) is raised once all have.
        fetched = await asyncio.gather(
            *(_fetch(studio, tasks[i], ask.target, settings.max_image_bytes, call, due) for i in chunk),
            return_exceptions=True,
        )
        for outcome in fetched:
            if isinstance(outcome, BaseException) and not isinstance(outcome, FetchError):
                raise outcome
        work = []
        for i, outcome in zip(chunk, fetched, strict=True):
            if isinstance(outcome, FetchError):
                items[i] = {"error": f"task {tasks[i].id}: {outcome}"}
            else:
                work.append((i, outcome))
        found: list[Found] = []
        while work and not found:
            try:
                found = await call.run(
                    [data for _, data in work],
                    [f"task {tasks[i].id}" for i, _ in work],
                    lambda: until_disconnect(request),
                    ask.tiling,
                    query.threshold,
                )
            except BadImage as exc:  # that task's error; the others run again without it
                i = work.pop(exc.index)[0]
                items[i] = {"error": exc.message}
    if not found:
        return
    labels, version = ask.labels(call), ask.model_version(call, found)
    dropped: Counter[int] = Counter()
    for (i, _), one in zip(work, found, strict=True):
        items[i] = prediction(one, query, ask.target, labels, version, dropped)
    call.answered([len(items[i]["result"]) for i, _ in work])  # type: ignore[index]
    metrics = state.metrics.labelstudio_unlabelled
    for label, count in dropped.items():
        metrics.labels(call.label, call.info.label(label)).inc(count)


async def _fetch(
    studio: LabelStudio | None, task: Task, target: Target, limit: int, call: Call, due: float
) -> bytes | FetchError:
    """The task's image, or why not (a fetch that fails is that task's error alone)."""
    value = task.data.get(target.data_key)
    if value is None:
        return FetchError(f"the task has no {target.data_key!r} in its data (the Image tag's value)")
    if studio is None:
        return FetchError("no Label Studio to fetch images from: SSD_LABELSTUDIO_URL is not set")
    assert call.bytes is not None
    try:
        return await studio.fetch(studio.resolve(value), limit, call.bytes, due)
    except FetchError as exc:
        return exc
    except APIError as exc:
        if exc.status == 413:  # this image alone is more than the whole budget of request bytes
            return FetchError(exc.message)
        raise
