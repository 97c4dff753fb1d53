"""Prometheus metrics, with the names and labels docs/reference.md lists ("Metrics").

Each app owns a ``CollectorRegistry`` (no module-level global registry), so that tests can run
several apps in one process. Histogram buckets span 1 ms to 30 s: SSD requests on a GPU take a
few milliseconds, on a busy CPU seconds, and the tail is what alerts look at.

Series that concern one model carry a ``model`` label (the served name): each model's batcher and
runtime get ``Metrics.of(name)``, the same metrics with that label bound.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
DETECTION_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)
TILE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter(
            "detector_requests", "Requests answered", ["route", "code", "model"], registry=registry
        )
        self.request_duration = Histogram(
            "detector_request_duration_seconds",
            "Request latency, from the request's head read to its answer sent",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("detector_requests_in_flight", "Requests being handled", registry=registry)
        self.images = Counter("detector_images", "Images run through the model", ["model"], registry=registry)
        self.queue_depth = Gauge(
            "detector_queue_depth", "Images waiting for a batch", ["model"], registry=registry
        )
        self.queue_wait = Histogram(
            "detector_queue_wait_seconds",
            "Time an image waits in the queue before its batch starts",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.preprocess = Histogram(
            "detector_preprocess_duration_seconds",
            "Decoding and resizing one image",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "detector_inference_duration_seconds",
            "One batch in the ONNX Runtime session",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "detector_batch_size", "Images per batch", ["model"], buckets=BATCH_BUCKETS, registry=registry
        )
        self.batches = Counter("detector_batches", "Batches run", ["model"], registry=registry)
        self.rejected = Counter(
            "detector_rejected_requests",
            "Requests refused or dropped before inference",
            ["reason"],
            registry=registry,
        )
        self.detections = Histogram(
            "detector_detections_per_image",
            "Detections returned per image",
            ["model"],
            buckets=DETECTION_BUCKETS,
            registry=registry,
        )
        self.tiles = Histogram(
            "detector_tiles_per_image",
            "Tiles a tiled image was cut into (each costs one model input, the whole image one more)",
            ["model"],
            buckets=TILE_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "detector_model_info",
            "The model being served (value 1)",
            ["model", "version", "sha256", "provider"],
            registry=registry,
        )
        self.reloads = Counter(
            "detector_model_reloads", "Model loads after the first", ["model", "result"], registry=registry
        )
        self._info: dict[str, tuple[str, str, str, str]] = {}  # each model's model_info labels
        # Label Studio's ML backend (service/labelstudio/):
        self.labelstudio_tasks = Counter(
            "detector_labelstudio_tasks",
            "Label Studio tasks answered by predict: with a prediction, or with an error",
            ["result"],
            registry=registry,
        )
        self.labelstudio_unlabelled = Counter(
            "detector_labelstudio_unlabelled_detections",
            "Detections left out of Label Studio predictions: their class has no label in the project",
            ["model", "class"],
            registry=registry,
        )
        self.labelstudio_events = Counter(
            "detector_labelstudio_webhook_events",
            "Label Studio webhook events received, by action",
            ["action"],
            registry=registry,
        )
        self.ready = Gauge(
            "detector_ready",
            "1 when /readyz says 200 (the default model serves, not draining)",
            registry=registry,
        )

    def of(self, model: str) -> ModelMetrics:
        """The series of one model (created at 0, so that rates and alerts see them at once)."""
        for result in ("success", "failure"):
            self.reloads.labels(model, result)
        return ModelMetrics(
            model,
            self,
            images=self.images.labels(model),
            queue_depth=self.queue_depth.labels(model),
            queue_wait=self.queue_wait.labels(model),
            inference=self.inference.labels(model),
            batch_size=self.batch_size.labels(model),
            batches=self.batches.labels(model),
            detections=self.detections.labels(model),
            tiles=self.tiles.labels(model),
        )

    def forget(self, model: str) -> None:
        """A model no longer served: its series go (a removed model is not a stuck one)."""
        for family in (self.images, self.queue_depth, self.queue_wait, self.inference, self.batch_size,
                       self.batches, self.detections, self.tiles):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(model)
        for result in ("success", "failure"):
            with contextlib.suppress(KeyError):
                self.reloads.remove(model, result)
        for family, names in ((self.requests, ("route", "code", "model")),
                              (self.request_duration, ("route", "model")),
                              (self.labelstudio_unlabelled, ("model", "class"))):  # fmt: skip
            gone = {
                tuple(sample.labels[n] for n in names)
                for metric in family.collect()
                for sample in metric.samples
                if sample.labels.get("model") == model
            }
            for labels in gone:
                with contextlib.suppress(KeyError):
                    family.remove(*labels)
        self._drop_info(model)

    def set_model(self, model: str, version: str, sha256: str, provider: str) -> None:
        """``model`` (the served name) now runs this artifact."""
        self._drop_info(model)
        self._info[model] = (model, version, sha256, provider)
        self.model_info.labels(*self._info[model]).set(1)

    def _drop_info(self, model: str) -> None:
        labels = self._info.pop(model, None)
        if labels is not None:
            self.model_info.remove(*labels)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class ModelMetrics:
    """The per-model series of ``Metrics``, with the model's label bound (``Metrics.of``)."""

    model: str
    shared: Metrics
    images: Any
    queue_depth: Any
    queue_wait: Any
    inference: Any
    batch_size: Any
    batches: Any
    detections: Any
    tiles: Any

    @property
    def rejected(self) -> Counter:
        return self.shared.rejected

    def reload(self, result: str) -> None:
        self.shared.reloads.labels(self.model, result).inc()
