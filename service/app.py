"""The FastAPI app: ``create_app(settings)`` wires the model runtime, the batcher, the metrics and
the routes; the lifespan loads and warms the model before /readyz says 200, and drains the queue
on shutdown."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import detect, errors, schema
from .accounting import Accounting
from .artifact import ArtifactError
from .budget import RequestBudget
from .decoding import Decoder
from .dependencies import ModelQuery, StateDep, VersionQuery, known_query, require_operator, served
from .door import Door
from .endpoints import InferenceRoutes
from .errors import APIError
from .labelstudio.routes import Backend as LabelStudioBackend
from .labelstudio.routes import router as labelstudio_router
from .metrics import CONTENT_TYPE, Metrics
from .middleware import ObservabilityMiddleware
from .oip import rest as oip_rest
from .pipeline import not_ready
from .repository import Repository, describe
from .runtime import GPURequired
from .settings import MB, Settings
from .slow_clients import BodyRateGuard
from .state import State

log = logging.getLogger(__name__)
Route = TypeVar("Route", bound=Callable[..., Any])


def create_app(settings: Settings | None = None, grpc_host: str = "127.0.0.1") -> FastAPI:
    """The app; with ``SSD_GRPC_PORT`` set, its lifespan also serves the OIP's gRPC on
    ``grpc_host`` (``ssd serve`` passes its own ``--host``)."""
    settings = settings or Settings()
    metrics = Metrics()
    accounting = Accounting(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository = Repository(settings, metrics)
        decoder = Decoder(
            settings.decode_threads,
            settings.decode_budget_mb * 1024 * 1024,
            settings.max_image_pixels,
            metrics,
        )
        budget = RequestBudget(settings.request_budget_mb * MB)
        app.state.service = State(settings, metrics, repository, decoder, time.time(), accounting, budget)
        app.state.labelstudio = LabelStudioBackend.of(settings)
        # A model that fails to load is logged: health and metrics are served anyway, and
        # /readyz says 503 until a reload or the poller succeeds. SSD_REQUIRE_GPU unmet raises.
        await repository.start()
        grpc_server = None
        if settings.grpc_port:
            from .oip import grpc as oip_grpc  # grpcio only where gRPC is served

            grpc_server = await oip_grpc.start(app.state.service, grpc_host, settings.grpc_port)
        # What startup made (modules, the model's session, the warm-up's arrays) lives as long as
        # the process: out of the collector's sight, so that its full collections, which stop
        # the event loop, do not walk it again and again.
        gc.freeze()
        try:
            yield
        finally:
            state: State = app.state.service
            if grpc_server is not None:
                await grpc_server.stop(state.time_left_to_stop())
            await repository.stop(state.time_left_to_stop())
            decoder.shutdown()
            await app.state.labelstudio.aclose()
            # Back in the collector's sight: an app stopped in a process that goes on (the test
            # suite starts hundreds) is garbage, its sessions' arenas included; frozen, each one
            # stayed for good (the suite's process grew by 11 GB over the conformance tests).
            gc.unfreeze()

    app = FastAPI(
        title="SSD detector",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    errors.install(app)
    # Each added outside the one before. The inference routes innermost (service/endpoints.py):
    # every layer below stands in front of them as of every route. The body guard inside the
    # accounting: its 408s are counted and logged. The door outside both (service/door.py): a
    # refusal skips them.
    inference = [detect.ENDPOINT, oip_rest.ENDPOINT]
    app.add_middleware(InferenceRoutes, endpoints=inference)
    app.add_middleware(BodyRateGuard, timeout_s=settings.body_timeout_s, min_rate=settings.min_body_rate)
    app.add_middleware(ObservabilityMiddleware, accounting=accounting)
    app.add_middleware(Door, heads=[e.head for e in inference])
    app.add_api_route(
        detect.PATH,
        detect.declaration,
        methods=["POST"],
        summary="Detect objects",
        description=schema.DETECT,
        operation_id="detect",
        response_model=schema.DetectResponse,
        responses=schema.errors(400, 404, 413, 415, 422, 503, 504),
        openapi_extra=schema.DETECT_BODY,
    )
    app.include_router(oip_rest.router)
    app.include_router(labelstudio_router)
    _add_operational_routes(app)
    app.openapi = lambda: schema.openapi(app)  # type: ignore[method-assign]
    return app


def get_and_head(app: FastAPI, path: str, **options: Any) -> Callable[[Route], Route]:
    """A GET route that answers HEAD too, HEAD left out of the OpenAPI schema: one route with
    both methods gives both operations the same id (a schema that code generators reject)."""

    def add(endpoint: Route) -> Route:
        app.add_api_route(path, endpoint, methods=["GET"], **options)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **options)
        return endpoint

    return add


def _add_operational_routes(app: FastAPI) -> None:
    @get_and_head(app, "/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get_and_head(app, "/readyz")
    async def readyz(state: StateDep) -> JSONResponse:
        why = state.not_ready()
        if why is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"error": {"code": "not_ready", "message": why}},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @get_and_head(app, "/metrics")
    async def metrics(state: StateDep) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @get_and_head(app, "/model", dependencies=[Depends(known_query)])
    async def model(
        state: StateDep, model: ModelQuery = None, version: VersionQuery = None
    ) -> dict[str, Any]:
        chosen = served(state, model, version)
        detector = chosen.detector
        if detector is None:
            raise not_ready(chosen.why_not_ready())
        info = detector.info
        return {
            **chosen.identity(),
            "path": info.path,
            "providers": detector.providers,
            "loaded_at": chosen.runtime.loaded_at,
            "load_seconds": round(detector.load_seconds, 3),
            "metadata": info.describe(),
            "default": state.repository.default_name,
            "models": [
                {"name": m.name, "version": str(m.version), "state": m.state, "error": m.error}
                for m in state.repository.models()
            ],
        }

    @app.post("/model/reload", dependencies=[Depends(known_query)])
    async def reload(
        request: Request, state: StateDep, model: ModelQuery = None, version: VersionQuery = None
    ) -> dict[str, Any]:
        require_operator(request, state.settings, "reload")
        chosen = served(state, model, version)
        try:
            await state.repository.reload(chosen)
        except (ArtifactError, GPURequired) as exc:
            log.error("reload of %s rejected, still serving the previous model: %s", chosen.name, exc)
            raise APIError(
                422, f"reload rejected, the previous model keeps serving: {exc}", "invalid_artifact"
            ) from exc
        log.info("reloaded %s", describe(chosen))
        return {"status": "reloaded", **chosen.identity()}

    page = resources.files("service").joinpath("index.html").read_text()

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)
