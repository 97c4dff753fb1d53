"""The detector under BentoML (1.4 SDK) with adaptive batching: a peer for the serving benchmarks.

    BENTOML_DO_NOT_TRACK=True SSD_MODEL_PATH=models/demo.onnx SSD_PROVIDERS=cpu \\
        bentoml serve bench.peers.bentoml_service:Detect --port 3000
    python -m bench.peers.bentoml_service --artifact models/demo.onnx --port 3000   # the same

Request: ``POST /detect`` with ``Content-Type: image/jpeg`` and the JPEG as the raw body (a
BentoML *root input*: the API's one positional-only argument takes the whole body). Answer: a JSON
array of one element, ours for that image: ``[{"model": {...}, "results": [{"filename": null,
"width", "height", "detections": [...]}]}]`` (a batchable API answers with the request's slice of
the batch's list). ``GET /readyz`` is 200 once the model is loaded and warmed up.

Same as ours: the settings (``SSD_*``, read by ``service.settings.Settings``), one
``service.artifact.Detector`` (providers, intra-op threads, warmed up for batches 1..max), decoding
with ``service.images.decode`` in a pool of ``SSD_DECODE_THREADS`` threads, detections formatted by
``Detections.to_json`` at ``SSD_SCORE_THRESHOLD``.

What BentoML decides, and so differs:

- Batching: BentoML's CorkDispatcher, one batch at a time, at most ``SSD_MAX_BATCH_SIZE``
  requests. Its wait adapts to a regression of past batch times; it has no fixed queue delay, so
  ``SSD_MAX_QUEUE_DELAY_MS`` does not apply. Its ``max_latency_ms`` is a deadline: requests
  that would miss it are refused with 503. It is set to ``SSD_REQUEST_TIMEOUT_S``, the deadline
  ours answers 504 at.
- Decoding happens inside the batched call (in the decode pool, all images of the batch at
  once), not as each request arrives as ours does: in one process BentoML hands the batched API
  the raw inputs; decoding before the batch would need a second Service in front of this one (a
  second process, and the pixels sent between them).
- Processes: ``bentoml serve`` runs an arbiter (circus) and one worker process (``workers=1``)
  that serves HTTP (uvicorn) and runs the model; the batched function runs in one thread
  (``threads=1``), like our one inference thread. Its access log, Prometheus metrics and
  OpenTelemetry context stay as BentoML sets them.
- A bad image fails only its own request's result: its element is ``{"error": {...}}`` (status
  200), since one batched call answers every request of the batch.

Set ``BENTOML_DO_NOT_TRACK=True``: BentoML otherwise reports usage over the network.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BeforeValidator, WithJsonSchema

from service.artifact import Detector
from service.images import ImageError, decode
from service.settings import Settings

SETTINGS = Settings()


def _one(value: object) -> object:
    return [value] if isinstance(value, bytes | bytearray) else value


# One JPEG per request, as the raw body: a "string"/"binary" root input gets the body as it is;
# each request's value is a list of one, which BentoML concatenates into the batch.
JPEGs = Annotated[list[bytes], BeforeValidator(_one), WithJsonSchema({"type": "string", "format": "binary"})]


@bentoml.service(
    name="ssd_detect",
    workers=1,
    threads=1,
    traffic={"timeout": SETTINGS.request_timeout_s},
)
class Detect:
    def __init__(self) -> None:
        s = SETTINGS
        self.detector = Detector(s.model_path, providers=s.providers, intra_op_threads=s.intra_op_threads)
        height, width = self.detector.info.input_size
        for batch in range(1, s.max_batch_size + 1):  # as ours warms up before /readyz says 200
            self.detector.run(np.zeros((batch, height, width, 3), dtype=np.uint8))
        self.decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        info = self.detector.info
        self.model = {"name": info.name, "version": info.version, "sha256": info.sha256}

    def _decode(self, data: bytes) -> Any:
        try:
            return decode(data, self.detector.info.input_size, SETTINGS.max_image_pixels)
        except ImageError as exc:
            return exc

    @bentoml.api(
        route="/detect",
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=int(SETTINGS.request_timeout_s * 1000),
    )
    def detect(self, images: JPEGs, /) -> list[dict[str, Any]]:
        decoded = list(self.decode_pool.map(self._decode, images))
        good = [d for d in decoded if not isinstance(d, ImageError)]
        found = iter(self.detector.detect(np.stack([d.pixels for d in good])) if good else [])
        info = self.detector.info
        out: list[dict[str, Any]] = []
        for d in decoded:
            if isinstance(d, ImageError):
                out.append({"error": {"code": d.code, "status": d.status, "message": str(d)}})
                continue
            detections = next(found).to_json(d.width, d.height, SETTINGS.score_threshold, info.max_detections)
            result = {"filename": None, "width": d.width, "height": d.height, "detections": detections}
            out.append({"model": self.model, "results": [result]})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the detector under BentoML (bentoml serve)")
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--max-batch", type=int, help="SSD_MAX_BATCH_SIZE")
    parser.add_argument("--threads", type=int, help="SSD_INTRA_OP_THREADS")
    args = parser.parse_args()
    os.environ.update({"SSD_MODEL_PATH": str(Path(args.artifact).resolve()), "BENTOML_DO_NOT_TRACK": "True"})
    os.environ.setdefault("SSD_PROVIDERS", "cpu")
    if args.max_batch:
        os.environ["SSD_MAX_BATCH_SIZE"] = str(args.max_batch)
    if args.threads:
        os.environ["SSD_INTRA_OP_THREADS"] = str(args.threads)
    cli = Path(sys.executable).with_name("bentoml")
    argv = [str(cli), "serve", f"{__spec__.name}:Detect", "--host", args.host, "--port", str(args.port)]
    os.chdir(Path(__file__).resolve().parents[2])  # the repo root: `service` and `bench` import from it
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
