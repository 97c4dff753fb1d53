"""``POST /detect``: read the images (service/uploads.py), run them (service/inference.py), answer
with the contract's JSON.

At the door, before the body is read, a request whose first image could not finish in time is
refused (503 with ``Retry-After``; its body is dropped unread, see ``uploads.discard_body``). The
image count of a multipart body is not known before it is read, so the door admits one image's
worth and the batcher checks the whole count once the body is in, before any decoding.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query as Param
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .batcher import Refused, ShuttingDown
from .door import HELD
from .inference import Query, answered, deadline, door, infer, ready_model, refusal
from .state import ModelQuery, StateDep, served
from .uploads import Limits, discard_body, read_uploads, until_disconnect


async def detect(
    request: Request,
    state: StateDep,
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
) -> JSONResponse:
    chosen = served(state, model)
    info = ready_model(chosen)
    wanted = classes.split(",") if classes is not None else None
    query = Query.parse(info, state.settings.score_threshold, score_threshold, max_detections, wanted)
    due = deadline(state, getattr(request.state, "arrival", None), timeout_ms)

    limits = Limits(state.settings.max_image_bytes, state.settings.max_images_per_request)
    held = getattr(request.state, HELD, None)  # admitted at the door (service/door.py)
    if held is None:
        try:
            door(state, chosen, due)
        except (Refused, ShuttingDown) as exc:
            await discard_body(request, limits.multipart_bytes)
            raise refusal(state, exc) from exc
    try:
        uploads = await read_uploads(request, limits)
    except ClientDisconnect:
        state.metrics.rejected.labels("disconnected").inc()
        raise  # answered 499 (service/errors.py)

    found = await infer(
        state, chosen, [u.data for u in uploads], due, lambda: until_disconnect(request),
        [u.filename for u in uploads], timeout_ms / 1000 if timeout_ms else state.settings.request_timeout_s,
        held,
    )  # fmt: skip
    results = [
        {"filename": u.filename, "width": f.width, "height": f.height, "detections": f.json(query)}
        for u, f in zip(uploads, found, strict=True)
    ]
    answered(chosen, [len(r["detections"]) for r in results])
    served_by = found[-1].detections.model
    return JSONResponse(
        {
            "model": {"name": served_by.name, "version": served_by.version, "sha256": served_by.sha256},
            "results": results,
        }
    )
