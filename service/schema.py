"""The OpenAPI schema's description of what the routes answer.

``/detect`` and the OIP's infer route are answered below FastAPI (service/endpoints.py), so
FastAPI never sees their bodies or answers; these models exist to describe them to clients and
code generators, and nothing validates against them at run time. Errors are described as the
service writes them (service/errors.py), in place of FastAPI's ``HTTPValidationError``, which
the service never sends.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/"


class Detection(BaseModel):
    label: str = Field(description="the class name")
    class_id: int = Field(description="0-based index into the model's classes")
    score: float
    box: list[float] = Field(
        min_length=4,
        max_length=4,
        description="x_min, y_min, x_max, y_max in pixels of the original image, after its EXIF orientation",
    )


class ImageResult(BaseModel):
    filename: str | None = Field(description="the multipart part's file name; null for a raw body")
    width: int
    height: int
    detections: list[Detection]
    tiles: list[list[int]] | None = Field(
        None,
        description="with tile: the tiles' rectangles (x0, y0, x1, y1 in pixels of the image), each run "
        "beside the whole image; empty when the image fits in one tile",
    )


class ModelIdentity(BaseModel):
    """The model that answered."""

    name: str = Field(description="the served name")
    version: str = Field(description="its version in the repository")
    architecture: str
    artifact_version: str
    sha256: str = Field(description="of the artifact file")


class DetectResponse(BaseModel):
    model: ModelIdentity
    results: list[ImageResult] = Field(description="one per image, in the order they were sent")


class ErrorDetail(BaseModel):
    code: str = Field(description="the error code (docs/reference.md, Error codes)")
    message: str


class Error(BaseModel):
    """Every answer other than success, outside ``/v2``."""

    error: ErrorDetail


class ProtocolError(BaseModel):
    """The Open Inference Protocol's error, under ``/v2``."""

    error: str


def errors(*statuses: int, model: type[BaseModel] = Error) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's error statuses."""
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}


_WHY = {
    400: "a corrupt image, bytes that are no image, or a malformed body",
    404: "a model or version the repository does not serve",
    413: "too large: the body, an image's bytes or pixels, or the number of images",
    415: "a known image format the service does not read, or a body type that holds no image",
    422: "a parameter of the wrong type or range, or an unknown parameter",
    499: "the client went away",
    503: "nothing can serve, the queue is full, or the request could not finish by its deadline "
    "(with Retry-After)",
    504: "the deadline passed",
}

DETECT = (
    "Detect objects in one image (the raw body, any declared type: images are recognised by their "
    "bytes) or several (multipart/form-data, parts named `file`), answered in order. Unknown query "
    "parameters are 422."
)
INFER = (
    "The Open Inference Protocol's inference: input `images` (BYTES [B], encoded images) or `pixels` "
    "(UINT8 [B, H, W, 3] at the model's input size); outputs `num_detections`, `boxes`, `scores`, "
    "`labels`. Triton's binary tensor extension is supported."
)

# /detect's body: one image as the raw body, or several as multipart parts named ``file``.
DETECT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}

# The OIP's inference request: JSON, or JSON followed by binary tensors (Triton's extension).
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the JSON header (its length in Inference-Header-Content-Length), "
                "then the binary tensors",
            },
        },
    }
}


def openapi(app: FastAPI) -> dict[str, Any]:
    """The app's schema, built once, with FastAPI's validation error replaced by the service's."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _replace_validation_errors(schema)
        app.openapi_schema = schema
    return app.openapi_schema


def _replace_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI's 422 of every route as the service writes it: ``Error`` outside ``/v2``; under it
    the protocol's ``{"error": "..."}`` with 400, the protocol's status for a bad parameter."""
    _, defs = models_json_schema(
        [(Error, "serialization"), (ProtocolError, "serialization")], ref_template=REF + "{model}"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(defs["$defs"])
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.get("responses", {})
            if "422" not in responses:
                continue
            if path.startswith("/v2"):
                del responses["422"]
                responses.setdefault("400", _answer(ProtocolError, _WHY[422]))
            else:
                responses["422"] = _answer(Error, _WHY[422])


def _answer(model: type[BaseModel], why: str) -> dict[str, Any]:
    return {
        "description": why,
        "content": {"application/json": {"schema": {"$ref": REF + model.__name__}}},
    }
