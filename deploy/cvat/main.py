"""CVAT's automatic annotation through the detector: a nuclio function that forwards each image
CVAT sends to the service's POST /detect and answers in CVAT's detector format.

CVAT sends ``{"image": BASE64, "threshold": 0.5}`` and expects a list of
``{"confidence", "label", "points": [x1, y1, x2, y2], "type": "rectangle"}`` in pixels. The
model runs in the service (batching, limits, metrics); this function holds no model and needs
nothing beyond Python's standard library. ``SSD_DETECTOR_URL`` says where the service is.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT_S = 30.0  # the function's eventTimeout in function.yaml


def init_context(context: Any) -> None:
    context.user_data.detector = os.environ.get("SSD_DETECTOR_URL", "http://detector:8000").rstrip("/")
    context.logger.info(f"forwarding to {context.user_data.detector}/detect")


def _answer(context: Any, body: Any, status: int = 200) -> Any:
    return context.Response(
        body=json.dumps(body), headers={}, content_type="application/json", status_code=status
    )


def detections(detector: str, image: bytes, threshold: float) -> list[dict[str, Any]]:
    """The detector's answer for ``image`` in CVAT's shapes."""
    query = urllib.parse.urlencode({"score_threshold": threshold})
    request = urllib.request.Request(
        f"{detector}/detect?{query}", data=image, headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
        result = json.load(answer)["results"][0]
    return [
        {
            "confidence": str(d["score"]),
            "label": d["label"],
            "points": [float(v) for v in d["box"]],
            "type": "rectangle",
        }
        for d in result["detections"]
    ]


def handler(context: Any, event: Any) -> Any:
    body = event.body if isinstance(event.body, dict) else json.loads(event.body or b"{}")
    try:
        image = base64.b64decode(body["image"], validate=True)
        threshold = float(body.get("threshold", 0.5))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        return _answer(context, {"error": f"a base64 image and a numeric threshold are needed ({exc})"}, 400)
    if not 0.0 <= threshold <= 1.0:
        return _answer(context, {"error": "threshold: from 0 to 1"}, 400)
    try:
        return _answer(context, detections(context.user_data.detector, image, threshold))
    except urllib.error.HTTPError as exc:
        # The detector's own error (a corrupt image, a size limit, overload) goes back to CVAT.
        message = exc.read().decode("utf-8", "replace")[:2000]
        context.logger.warn(f"detector answered {exc.code}: {message}")
        return _answer(context, {"error": f"the detector answered {exc.code}: {message}"}, exc.code)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        context.logger.error(f"detector unreachable: {exc}")
        return _answer(context, {"error": f"the detector is unreachable: {exc}"}, 502)
