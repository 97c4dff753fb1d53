"""The FastAPI app: ``create_app(settings)`` wires the model runtime, the batcher, the metrics and
the routes; the lifespan loads and warms the model before /readyz says 200, and drains the queue
on shutdown."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import errors
from .artifact import ArtifactError
from .batcher import Batcher
from .decoding import Decoder
from .detect import detect
from .errors import APIError
from .metrics import CONTENT_TYPE, Metrics
from .middleware import ObservabilityMiddleware
from .runtime import GPURequired, ModelRuntime
from .settings import Settings
from .slow_clients import BodyRateGuard
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
        )
        runtime.on_swap = batcher.calibrate
        decoder = Decoder(
            settings.decode_threads,
            settings.decode_budget_mb * 1024 * 1024,
            settings.max_image_pixels,
            metrics,
        )
        app.state.service = State(settings, metrics, runtime, batcher, decoder, time.time())
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
            decoder.shutdown()

    app = FastAPI(
        title="SSD detector",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    errors.install(app)
    # Inside the metrics middleware (added after it, so nearer the routes): its 408s are counted and logged.
    app.add_middleware(BodyRateGuard, timeout_s=settings.body_timeout_s, min_rate=settings.min_body_rate)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    # Registered on the app itself (not through an APIRouter) so that the metrics middleware
    # can name the route from app.router.routes.
    app.add_api_route("/detect", detect, methods=["POST"])
    _add_operational_routes(app)
    return app


def _add_operational_routes(app: FastAPI) -> None:
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(state: StateDep) -> JSONResponse:
        if state.runtime.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"error": {"code": "not_ready", "message": "no model loaded and warmed up yet"}},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(state: StateDep) -> Response:
        state.metrics.queue_depth.set(len(state.batcher))
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.api_route("/model", methods=["GET", "HEAD"])
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
        # RFC 9110: the scheme is case-insensitive ("bearer" is as good as "Bearer").
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
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

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)
