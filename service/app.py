"""The FastAPI app: ``create_app(settings)`` wires the model runtime, the batcher, the metrics and
the routes; the lifespan loads and warms the model before /readyz says 200, and drains the queue
on shutdown."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import errors
from .artifact import ArtifactError
from .batcher import Batcher
from .detect import detect
from .errors import APIError
from .metrics import CONTENT_TYPE, Metrics
from .middleware import ObservabilityMiddleware
from .runtime import GPURequired, ModelRuntime
from .settings import Settings
from .state import State, StateDep

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = ModelRuntime(settings, metrics)
        batcher = Batcher(
            lambda: runtime.detector,
            metrics,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
        )
        decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        app.state.service = State(settings, metrics, runtime, batcher, decode_pool, time.time())
        try:
            await runtime.load(initial=True)
        except GPURequired:
            raise  # SSD_REQUIRE_GPU: refuse to start
        except ArtifactError as exc:
            # Serve health and metrics anyway; /readyz says 503 until a reload or the poller succeeds.
            log.error("no model loaded: %s", exc)
        batcher.start()
        runtime.start_polling()
        try:
            yield
        finally:
            metrics.ready.set(0)
            await runtime.stop()
            await batcher.stop(settings.shutdown_timeout_s)
            decode_pool.shutdown(wait=False)

    app = FastAPI(
        title="SSD detector",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    errors.install(app)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    # Registered on the app itself (not through an APIRouter) so that the metrics middleware
    # can name the route from app.router.routes.
    app.add_api_route("/detect", detect, methods=["POST"])
    _add_operational_routes(app)
    return app


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(state: StateDep) -> JSONResponse:
        if state.runtime.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"error": {"code": "not_ready", "message": "no model loaded and warmed up yet"}},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.get("/metrics")
    async def metrics(state: StateDep) -> Response:
        state.metrics.queue_depth.set(len(state.batcher))
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/model")
    async def model(state: StateDep) -> dict[str, Any]:
        detector = state.runtime.detector
        if detector is None:
            raise APIError(503, "no model is loaded", "not_ready", {"Retry-After": "5"})
        info = detector.info
        return {
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "path": info.path,
            "providers": detector.providers,
            "loaded_at": state.runtime.loaded_at,
            "load_seconds": round(detector.load_seconds, 3),
            "metadata": info.describe(),
        }

    @app.post("/model/reload")
    async def reload(request: Request, state: StateDep) -> dict[str, Any]:
        token = state.settings.admin_token
        if token is None:
            raise APIError(403, "reload is disabled: no SSD_ADMIN_TOKEN is configured", "forbidden")
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(403, "a valid bearer token is required", "forbidden")
        try:
            detector = await state.runtime.load()
        except (ArtifactError, GPURequired) as exc:
            log.error("reload rejected, still serving the previous model: %s", exc)
            raise APIError(
                422, f"reload rejected, the previous model keeps serving: {exc}", "invalid_artifact"
            ) from exc
        info = detector.info
        return {"status": "reloaded", "name": info.name, "version": info.version, "sha256": info.sha256}

    page = resources.files("service").joinpath("index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)
