"""Label Studio's ML-backend protocol under ``/labelstudio`` (Label Studio joins each endpoint's
name onto the backend URL it is given: ``http://detector:8000/labelstudio``).

What Label Studio calls (label_studio/ml/api_connector.py), with its timeouts:

==========  ======  ===========================================================================
endpoint    its     what it is answered
            timeout
==========  ======  ===========================================================================
health      1 s     GET: 200 ``{"status": "UP"}`` while the service is ready, else 503
setup       3 s     POST: the project's labelling config and ``extra_params`` checked and kept;
                    the served model's ``model_version``. No admission, no model work
predict     100 s   POST: one item per task (service/labelstudio/predict.py)
versions    3 s     GET: the ``model_version`` of each loaded version of the project's model
webhook     --      POST with ``Authorization: Bearer SSD_ADMIN_TOKEN``: counted by action in
                    ``detector_labelstudio_webhook_events_total``; it starts nothing (retraining
                    is the train job's)
==========  ======  ===========================================================================

Label Studio shows only the status line of an error (``422 Client Error: ...``), not its body,
so each refusal is also logged here with its reason.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..budget import Reservation
from ..dependencies import StateDep, require_operator, served
from ..errors import APIError
from ..pipeline import Call, Found, Query, not_ready
from ..settings import Settings
from ..state import State
from ..uploads import Body, read_raw
from .client import LabelStudio
from .config import MAX_CONFIG_CHARS, ConfigError, LabelMap, Target, match, parse
from .predict import Ask, Task, predict
from .projects import Projects, ProjectSettings
from .results import model_version

log = logging.getLogger(__name__)
PREFIX = "/labelstudio"
SETUP_BYTES = 2 * MAX_CONFIG_CHARS + 64 * 1024  # the config (twice: escaped in JSON) and the rest
VERSIONS_BYTES = 64 * 1024
# Label Studio's webhook actions (its webhooks/models.py); any other is counted as "other", so
# that the metric's labels stay a bounded set whatever a caller sends.
ACTIONS = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED",
    "REVIEW_UPDATED", "REVIEWS_DELETED", "START_TRAINING",
})  # fmt: skip


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI description of a JSON body the route reads itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_STRING = {"type": "string"}
SETUP_BODY = _body({
    "type": "object",
    "properties": {
        "project": {"type": "string", "description": "Label Studio's project id, ID.TIMESTAMP"},
        "schema": {"type": "string", "description": "the project's labelling config (XML)"},
        "extra_params": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "model": _STRING, "version": _STRING, "score_threshold": {"type": "number"},
                "max_detections": {"type": "integer"}, "tile": _STRING, "tile_overlap": {"type": "number"},
                "from_name": _STRING, "labels": {"type": "object", "additionalProperties": _STRING},
            },
        },
        "hostname": {"type": "string", "description": "not used"},
        "access_token": {"type": "string", "description": "not used"},
    },
})  # fmt: skip
PREDICT_BODY = _body({
    "type": "object",
    "required": ["tasks"],
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "data"],
                "properties": {"id": {"type": "integer"}, "data": {"type": "object"}},
            },
        },
        "project": _STRING,
        "label_config": _STRING,
    },
})  # fmt: skip
WEBHOOK_BODY = _body({"type": "object", "properties": {"action": _STRING}})


@dataclass
class Backend:
    """What the Label Studio routes keep: each project's settings, the Label Studio that task
    images come from (None: SSD_LABELSTUDIO_URL not set), and the operator's class renames."""

    studio: LabelStudio | None
    renamed: dict[str, str]
    projects: Projects = field(default_factory=Projects)

    @classmethod
    def of(cls, settings: Settings) -> Backend:
        studio = None
        if settings.labelstudio_url:
            studio = LabelStudio(settings.labelstudio_url, settings.labelstudio_token)
        return cls(studio, dict(settings.labelstudio_labels))

    async def aclose(self) -> None:
        if self.studio is not None:
            await self.studio.aclose()


async def get_backend(request: Request) -> Backend:
    return request.app.state.labelstudio


BackendDep = Annotated[Backend, Depends(get_backend)]
router = APIRouter(prefix=PREFIX, tags=["Label Studio ML backend"])


async def _json(request: Request, state: State, limit: int) -> dict[str, Any]:
    """The body as a JSON object, at most ``limit`` bytes, held against the request budget while
    it is read and parsed."""
    held: Reservation = state.budget.reservation()
    try:
        raw = await read_raw(request, limit, Body(held, time.monotonic() + state.settings.request_timeout_s))
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"the body is not JSON: {exc}", "bad_request") from None
    finally:
        held.release()
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "bad_request")
    return body


def _project(body: dict[str, Any]) -> str | None:
    project = body.get("project")
    return project if isinstance(project, str) and len(project) <= 64 else None


def _target(config: Any, settings: ProjectSettings) -> Target:
    try:
        return parse(config, settings.from_name)
    except ConfigError as exc:
        raise APIError(422, f"label_config: {exc}", "invalid_parameters") from None


def _labels(backend: Backend, settings: ProjectSettings, classes: list[str], target: Target) -> LabelMap:
    """The project's label of each class; 422 when none has one (every prediction would be empty)."""
    try:
        # The operator's renames serve every project: one whose labels lack a rename's target
        # leaves that class out. A project's own (extra_params.labels) must name its labels.
        present = {c: label for c, label in backend.renamed.items() if label in target.labels}
        labels = match(classes, target.labels, {**present, **settings.labels})
    except ConfigError as exc:
        raise APIError(422, str(exc), "invalid_parameters") from None
    if len(labels.unlabelled) == len(classes):
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise APIError(
            422,
            f"none of the model's {len(classes)} classes ({shown}) is a label of RectangleLabels "
            f"{target.from_name!r} ({', '.join(target.labels[:8])}); map them with SSD_LABELSTUDIO_LABELS "
            "or extra_params.labels",
            "invalid_parameters",
        )
    return labels


def _refused(what: str, project: str | None, exc: APIError) -> APIError:
    log.warning("labelstudio %s refused (project %s): %d %s", what, project or "-", exc.status, exc.message)
    return exc


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    why = state.not_ready()
    if why is not None:
        return JSONResponse({"status": "DOWN", "error": why}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "UP", "model_class": "ssd-detector"})


@router.post("/setup", openapi_extra=SETUP_BODY)
async def setup(request: Request, state: StateDep, backend: BackendDep) -> dict[str, Any]:
    body = await _json(request, state, SETUP_BYTES)
    project = _project(body)
    try:
        settings = ProjectSettings.parse(
            body.get("extra_params"), state.settings.tile, state.settings.tile_overlap
        )
        target = _target(body.get("schema"), settings)
        model = served(state, settings.model, settings.version)
        if model.detector is None:
            raise not_ready(model.why_not_ready())
        classes = model.detector.info.classes
        labels = _labels(backend, settings, classes, target)
    except APIError as exc:
        raise _refused("setup", project, exc) from None
    if project is not None:
        backend.projects.set(project, settings, body.get("schema"))
    described = labels.describe(classes)
    log.info("labelstudio project %s set up: %s, %s", project or "-", target.from_name, described)
    return {"model_version": model_version(model.identity()), "labels": described}


@router.post("/predict", openapi_extra=PREDICT_BODY)
async def predict_tasks(request: Request, state: StateDep, backend: BackendDep) -> dict[str, Any]:
    body = await _json(request, state, state.settings.max_request_bytes)
    project = _project(body)
    try:
        tasks = Task.parse(body.get("tasks"))
        settings, schema = backend.projects.get(project)
        target = _target(body.get("label_config") or schema, settings)
        defaults = state.settings
        tiling = settings.tiling(defaults.tile, defaults.tile_overlap)

        def query(call: Call) -> Query:
            return Query.parse(
                call.info, defaults.score_threshold, settings.score_threshold, settings.max_detections
            )

        def labels(call: Call) -> LabelMap:
            return _labels(backend, settings, call.info.classes, target)

        def version(call: Call, found: list[Found]) -> str:
            return model_version(call.identity(found))

        ask = Ask(settings.model, settings.version, query, tiling, target, labels, version)
        items = await predict(request, state, backend.studio, tasks, ask)
    except APIError as exc:
        raise _refused("predict", project, exc) from None
    failed = sum("error" in item for item in items)
    state.metrics.labelstudio_tasks.labels("predicted").inc(len(items) - failed)
    state.metrics.labelstudio_tasks.labels("error").inc(failed)
    if failed:
        first = next(item["error"] for item in items if "error" in item)
        log.warning(
            "labelstudio predict: %d of %d tasks not predicted; the first: %s", failed, len(items), first
        )
    return {"results": items}


@router.get("/versions")
async def versions(request: Request, state: StateDep, backend: BackendDep) -> dict[str, Any]:
    # Label Studio sends the project in a GET's body.
    body = await _json(request, state, VERSIONS_BYTES)
    settings, _ = backend.projects.get(_project(body))
    model = served(state, settings.model)
    found = [
        model_version(m.identity())
        for m in state.repository.models()
        if m.name == model.name and m.detector is not None
    ]
    return {"versions": found}


@router.post("/webhook", openapi_extra=WEBHOOK_BODY)
async def webhook(request: Request, state: StateDep) -> dict[str, Any]:
    require_operator(request, state.settings, "the Label Studio webhook")
    body = await _json(request, state, state.settings.max_request_bytes)
    action = body.get("action")
    counted = action if isinstance(action, str) and action in ACTIONS else "other"
    state.metrics.labelstudio_events.labels(counted).inc()
    return {"status": "ok", "action": counted}
