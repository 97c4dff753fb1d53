"""``POST /detect``: the transport adapter of the contract's own route. It reads the images
(service/uploads.py) into the request's ``Call`` and renders the contract's JSON; admission,
deadlines, limits, budgets, decoding, batching, metrics and errors are the core's
(service/pipeline.py).

The door (service/door.py) reads the head with ``head``: the model, its version and
``timeout_ms`` from the query, so that a request that could not finish in time is refused before
its body is read. The image count of a multipart body is not known before it is read, so the
door holds one image's place and the batcher admits the whole count once the body is in.
"""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Query as Param
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import Scope

from .dependencies import CallDep, ModelQuery, VersionQuery
from .door import Head
from .pipeline import Query
from .uploads import Body, Limits, read_uploads, until_disconnect

PATH = "/detect"


def head(scope: Scope) -> Head | None:
    """The door's reading of a ``/detect`` request (None for other paths)."""
    if scope["path"] != PATH:
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))

    def last(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

    timeout = last("timeout_ms")
    try:
        timeout_ms = float(timeout) if timeout is not None else None
    except ValueError:
        timeout_ms = math.nan
    if timeout_ms is not None and not math.isfinite(timeout_ms):
        timeout_ms = -1.0  # refused by the route's validation: the door lets it through
    return Head(PATH, last("model"), last("version"), timeout_ms)


async def detect(
    request: Request,
    call: CallDep,
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
) -> JSONResponse:
    call.resolve(model, version)
    wanted = classes.split(",") if classes is not None else None
    settings = call.state.settings
    query = Query.parse(call.info, settings.score_threshold, score_threshold, max_detections, wanted)
    due = call.set_deadline(timeout_ms)
    call.bytes = call.bytes or call.state.budget.reservation()
    uploads = await read_uploads(request, Limits.of(settings), Body(call.bytes, due))
    found = await call.run(
        [u.data for u in uploads], [u.filename for u in uploads], lambda: until_disconnect(request)
    )
    results = [
        {"filename": u.filename, "width": f.width, "height": f.height, "detections": f.json(query)}
        for u, f in zip(uploads, found, strict=True)
    ]
    call.answered([len(r["detections"]) for r in results])
    return JSONResponse({"model": call.identity(found), "results": results})
