"""``POST /detect``: the transport adapter of the contract's own route. It reads the images
(service/uploads.py) into the request's ``Call`` and renders the contract's JSON; admission,
deadlines, limits, budgets, decoding, batching, metrics and errors are the core's
(service/pipeline.py).

The door (service/door.py) reads the head with ``head``: the model, its version and
``timeout_ms`` from the query, so that a request that could not finish in time is refused before
its body is read. The image count of a multipart body is not known before it is read, so the
door holds one image's place and the batcher admits the whole count once the body is in.

The route is answered below FastAPI (service/endpoints.py): ``Params`` reads its query.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Query as Param
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from . import drawing
from .dependencies import ModelQuery, VersionQuery, unknown_query
from .door import Head
from .endpoints import Endpoint
from .errors import APIError
from .pipeline import Call, Query
from .tiling import Tiling
from .uploads import Body, Limits, read_uploads, until_disconnect

PATH = "/detect"
MODEL_CHARS, VERSION_CHARS = 128, 20  # as ModelQuery and VersionQuery declare them


def _query(scope: Scope) -> dict[str, str]:
    """The request's query parameters, the last of a repeated one (as everywhere), parsed once
    per request: the door, the routing and ``Params`` all read them."""
    state = scope.setdefault("state", {})
    query = state.get("detect_query")
    if query is None:
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        query = state["detect_query"] = dict(pairs)
    return query


def head(scope: Scope) -> Head | None:
    """The door's reading of a ``/detect`` request (None for other paths)."""
    if scope["path"] != PATH:
        return None
    query = _query(scope)
    timeout = query.get("timeout_ms")
    try:
        timeout_ms = float(timeout) if timeout is not None else None
    except ValueError:
        timeout_ms = math.nan
    if timeout_ms is not None and not math.isfinite(timeout_ms):
        timeout_ms = -1.0  # refused by the route's validation: the door lets it through
    return Head(PATH, query.get("model"), query.get("version"), timeout_ms)


@dataclass(frozen=True)
class Params:
    """``/detect``'s query, checked for type (ranges are the model's: ``Query.parse``, and the
    deadline's: ``Call.set_deadline``)."""

    score_threshold: float | None = None
    max_detections: int | None = None
    classes: str | None = None
    timeout_ms: float | None = None
    model: str | None = None
    version: str | None = None
    tile: str | None = None
    tile_overlap: float | None = None

    @classmethod
    def parse(cls, scope: Scope) -> Params:
        """422 naming the parameter for a value of the wrong type, and for a parameter the route
        does not take (a typo, ``threshold`` for ``score_threshold``, must not be answered as
        if it were not there)."""
        query = _query(scope)
        unknown = query.keys() - NAMES
        if unknown:
            raise unknown_query(unknown, NAMES)
        model, version = query.get("model"), query.get("version")
        if model is not None and len(model) > MODEL_CHARS:
            raise _invalid(f"model: at most {MODEL_CHARS} characters")
        if version is not None and len(version) > VERSION_CHARS:
            raise _invalid(f"version: at most {VERSION_CHARS} characters")
        return cls(
            _number(query, "score_threshold"),
            _integer(query, "max_detections"),
            query.get("classes"),
            _number(query, "timeout_ms"),
            model,
            version,
            query.get("tile"),
            _number(query, "tile_overlap"),
        )


NAMES = frozenset(Params.__dataclass_fields__)
DRAWN = ("image/jpeg", "image/png")  # the answers /detect draws, besides its JSON


def _invalid(message: str) -> APIError:
    return APIError(422, message, "invalid_parameters")


def _number(query: dict[str, str], key: str) -> float | None:
    value = query.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _invalid(f"{key}: a finite number is needed, not {value!r}")
    return number


def _integer(query: dict[str, str], key: str) -> int | None:
    value = query.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _invalid(f"{key}: an integer is needed, not {value!r}") from None


async def handle(request: Request, call: Call, head: Head) -> Response:
    """``POST /detect``: the images of the body, their detections as the contract's JSON."""
    params = Params.parse(request.scope)
    call.resolve(params.model, params.version)
    wanted = params.classes.split(",") if params.classes is not None else None
    settings = call.state.settings
    query = Query.parse(
        call.info, settings.score_threshold, params.score_threshold, params.max_detections, wanted
    )
    tiling = Tiling.parse(params.tile, params.tile_overlap, settings.tile, settings.tile_overlap)
    drawn = drawn_type(request.headers.get("accept"))
    due = call.set_deadline(params.timeout_ms)
    call.bytes = call.bytes or call.state.budget.reservation()
    uploads = await read_uploads(request, Limits.of(settings), Body(call.bytes, due))
    if drawn is not None and len(uploads) > 1:
        raise _invalid(f"Accept: {drawn} draws one image; this request has {len(uploads)} (ask for JSON)")
    found = await call.run(
        [u.data for u in uploads],
        [u.filename for u in uploads],
        lambda: until_disconnect(request),
        tiling,
        query.threshold,
    )
    results = [
        {"filename": u.filename, "width": f.width, "height": f.height, "detections": f.json(query)}
        | ({"tiles": [list(r) for r in f.tiles]} if tiling is not None else {})
        for u, f in zip(uploads, found, strict=True)
    ]
    call.answered([len(r["detections"]) for r in results])
    if drawn is not None:
        return await _drawn(call, uploads[0].data, results[0], drawn, call.identity(found))
    return JSONResponse({"model": call.identity(found), "results": results})


def drawn_type(accept: str | None) -> str | None:
    """The image type the client prefers by its ``Accept`` (``image/jpeg``, ``image/png``;
    ``image/*`` is JPEG), else None: JSON, as for ``*/*``, ``application/json`` or no header.
    The highest quality wins, the first listed on a tie."""
    ranked = []
    for position, item in enumerate((accept or "").split(",")):
        kind, *options = (part.strip().lower() for part in item.split(";"))
        q = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    q = float(option[2:])
                except ValueError:
                    q = 0.0
        if q > 0 and kind in (*DRAWN, "image/*", "application/json", "application/*", "*/*"):
            ranked.append((-q, position, kind))
    if not ranked:
        return None
    kind = min(ranked)[2]
    return "image/jpeg" if kind == "image/*" else kind if kind in DRAWN else None


async def _drawn(call: Call, data: bytes, result: dict, media_type: str, model: dict) -> Response:
    """The image with its answer drawn on it, at most drawing.MAX_SIDE on its longest side: the
    image decoded again at that size (within the decode budget), drawn and encoded off the loop."""
    width, height = drawing.drawn_size(result["width"], result["height"])
    decoded = await call.state.decoder.decode(data, (height, width))

    def render() -> bytes:
        image = Image.fromarray(decoded.pixels)
        scale = width / result["width"]
        return drawing.encode(
            drawing.draw(image, result["detections"], result.get("tiles", ()), scale), media_type
        )

    content = await asyncio.get_running_loop().run_in_executor(call.state.decoder.pool, render)
    # Which model answered, and how many it found, where a JSON answer would have said it.
    headers = {
        "X-Model": model["name"],
        "X-Model-Version": str(model["version"]),
        "X-Model-Sha256": model["sha256"],
        "X-Detections": str(len(result["detections"])),
    }
    return Response(content, media_type=media_type, headers=headers)


ENDPOINT = Endpoint(head, handle)


async def declaration(
    score_threshold: Annotated[
        float | None,
        Param(ge=0.0, le=1.0, allow_inf_nan=False, description="from the model's floor to 1"),
    ] = None,
    max_detections: Annotated[int | None, Param(ge=1)] = None,
    classes: Annotated[str | None, Param(description="comma-separated class names to keep")] = None,
    timeout_ms: Annotated[
        float | None,
        Param(gt=0, allow_inf_nan=False, description="the request's deadline from its arrival, ms"),
    ] = None,
    model: ModelQuery = None,
    version: VersionQuery = None,
    tile: Annotated[
        str | None,
        Param(
            pattern=r"^(?i:off|auto|\d{1,5}x\d{1,5})$",
            description="tiled inference: auto (tiles of the model's input size), off, or WIDTHxHEIGHT "
            "(default SSD_TILE)",
        ),
    ] = None,
    tile_overlap: Annotated[
        float | None,
        Param(ge=0.0, lt=1.0, description="the tiles' overlap, a share of a tile (default SSD_TILE_OVERLAP)"),
    ] = None,
) -> None:
    """Detect objects in one image (the body) or several (multipart/form-data, parts named
    ``file``).

    FastAPI's declaration of the route for the OpenAPI schema; a POST is answered by ``handle``
    (service/endpoints.py), which takes these parameters (``NAMES``: a test keeps the two the same).
    """
    raise AssertionError("POST /detect is answered by service.detect.handle")
