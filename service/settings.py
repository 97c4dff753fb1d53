"""The service's settings: environment variables with the prefix ``SSD_`` (docs/reference.md, "Settings")."""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore", protected_namespaces=())

    model_path: str = "models/demo.onnx"
    # Execution providers in order of preference: tensorrt, cuda, cpu.
    providers: Annotated[list[str], NoDecode] = ["cuda", "cpu"]
    require_gpu: bool = False  # refuse to start when the CUDA provider did not load
    max_batch_size: int = Field(8, ge=1, le=256)
    max_queue_delay_ms: float = Field(5.0, ge=0)
    # Images queued or being decoded at most: a memory bound, high enough that deadlines, not the
    # count, decide admission in ordinary use (256 images of 320x320 are 79 MB of pixels).
    max_queue_size: int = Field(256, ge=1)
    # The default deadline of a request, from its arrival; a request's timeout_ms may only shorten it.
    request_timeout_s: float = Field(10.0, gt=0)
    max_image_bytes: int = Field(20 * MB, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    # The largest body (HTTP) or message (gRPC) of one request, whatever it holds: 413 past it.
    max_request_bytes: int = Field(64 * MB, ge=1024)
    # Request bytes held by all requests at once, every transport together (service/budget.py):
    # a request that does not fit waits for room until its deadline, then 503.
    request_budget_mb: int = Field(256, ge=1)
    score_threshold: float = Field(0.5, ge=0, le=1)
    # Tiled inference (service/tiling.py): the default of a request's tile and tile_overlap, and
    # the most tiles one image may be cut into (tile=auto grows its tiles to stay within it).
    tile: str = Field("off", pattern=r"^(?i:off|auto|\d{1,5}x\d{1,5})$")
    tile_overlap: float = Field(0.2, ge=0, lt=1)
    max_tiles_per_image: int = Field(32, ge=1, le=1024)
    # ONNX Runtime CPU threads (default: its own, or the usable cores where fewer: artifact.usable_cores)
    intra_op_threads: int | None = Field(None, ge=1)
    admin_token: SecretStr | None = None  # bearer token for POST /model/reload
    model_poll_s: float = Field(0.0, ge=0)  # watch the artifact file or folder; 0 = do not watch
    # A repository folder (NAME/VERSION/model.onnx or NAME.onnx) instead of model_path:
    model_dir: str | None = None
    model_name: str | None = None  # the served name of model_path (default: its metadata's)
    default_model: str | None = None  # the model of routes that name none
    grpc_port: int = Field(0, ge=0, le=65535)  # the OIP's gRPC service; 0 = off
    # Beyond the contract:
    decode_threads: int = Field(4, ge=1)  # image decoding and resizing
    # The estimated peak memory of the images being decoded at once (decoded pixels times the
    # bytes per pixel of their mode); an image that would pass it waits for its turn, one larger
    # than all of it decodes alone.
    decode_budget_mb: int = Field(384, ge=1)
    # Slow clients, cut off by ssd serve itself (a proxy in front is welcome, not required):
    # From the connection (or a kept-alive one's next first byte) to the end of the request's headers:
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)  # a body may take this long, plus 1 s per min_body_rate bytes
    min_body_rate: int = Field(32 * 1024, ge=1)  # bytes/s
    keepalive_timeout_s: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line and headers; past it, 431
    # SIGTERM: readiness answers 503 for drain_s while every route still serves (a load balancer
    # takes a few seconds to stop routing here), then the listeners close and the work in
    # progress has shutdown_timeout_s, all of it together, to finish.
    drain_s: float = Field(5.0, ge=0)
    shutdown_timeout_s: float = Field(30.0, ge=0)
    log_json: bool = False  # one JSON object per log line
    # Label Studio's ML backend (/labelstudio): the Label Studio task images are fetched from
    # (nowhere else), its token (a personal access token or a legacy one), and model classes
    # renamed to the projects' labels ("person=Person,car=Vehicle", or a JSON object).
    labelstudio_url: str | None = None
    labelstudio_token: SecretStr | None = None
    labelstudio_labels: Annotated[dict[str, str], NoDecode] = {}
    # How long one predict may take before it answers with the tasks done: Label Studio waits
    # 100 s (its ML_TIMEOUT_PREDICT) and stores nothing of a request it gave up on. The chunk
    # under way may take SSD_REQUEST_TIMEOUT_S more; the tasks left are asked for again.
    labelstudio_predict_s: float = Field(80.0, gt=0)

    @field_validator("providers", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("labelstudio_labels", mode="before")
    @classmethod
    def _renames(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = [p for p in (part.strip() for part in text.split(",")) if p]
        if not all("=" in p for p in pairs):
            raise ValueError("CLASS=LABEL pairs separated by commas, or a JSON object, are needed")
        return dict((k.strip(), v.strip()) for k, v in (p.split("=", 1) for p in pairs))

    @field_validator("labelstudio_url", mode="after")
    @classmethod
    def _studio(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL is needed")
        return value

    @field_validator("admin_token", "labelstudio_token", mode="after")
    @classmethod
    def _empty_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _one_source(self) -> Settings:
        if self.model_dir and "model_path" in self.model_fields_set:
            raise ValueError("set SSD_MODEL_PATH or SSD_MODEL_DIR, not both")
        if self.max_request_bytes > self.request_budget_mb * MB:
            raise ValueError(
                f"SSD_MAX_REQUEST_BYTES ({self.max_request_bytes}) passes the whole budget of request "
                f"bytes in flight, SSD_REQUEST_BUDGET_MB ({self.request_budget_mb}): no request that "
                "large could ever be read"
            )
        return self
