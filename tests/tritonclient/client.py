"""Triton's Python client, unmodified, against ``ssd serve``: run from the tritonclient environment
(``make tritonclient-env``) by tests/test_tritonclient.py, which asserts on what it prints.

    python tests/tritonclient/client.py HTTP_ADDRESS GRPC_ADDRESS MODEL SPEC.json

SPEC.json: {"images": [paths], "pixels": path.npy, "parameters": {...}, "burst": N}. Prints one
JSON object: health, metadata, inference by BYTES and UINT8 over both protocols, errors, a burst.
Nothing here knows our service: it is what a Triton user would write.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

OUTPUTS = ["num_detections", "boxes", "scores", "labels"]


def arrays(result: Any) -> dict[str, list]:
    return {name: result.as_numpy(name).tolist() for name in OUTPUTS}


def bytes_input(module: Any, images: list[bytes]) -> Any:
    tensor = module.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def pixels_input(module: Any, pixels: np.ndarray) -> Any:
    tensor = module.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def error(call: Any) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def main() -> int:
    http_address, grpc_address, model, spec_path = sys.argv[1:5]
    spec = json.loads(Path(spec_path).read_text())
    images = [Path(path).read_bytes() for path in spec["images"]]
    pixels = np.load(spec["pixels"])
    parameters = spec["parameters"]
    http = httpclient.InferenceServerClient(http_address, concurrency=spec["burst"])
    grpc = grpcclient.InferenceServerClient(grpc_address)
    out: dict[str, Any] = {}

    out["health"] = {
        "http": [http.is_server_live(), http.is_server_ready(), http.is_model_ready(model),
                 http.is_model_ready("no-such-model")],
        "grpc": [grpc.is_server_live(), grpc.is_server_ready(), grpc.is_model_ready(model)],
    }  # fmt: skip
    out["metadata"] = {
        "http_server": http.get_server_metadata(),
        "http_model": http.get_model_metadata(model),
        "grpc_server": grpc.get_server_metadata(as_json=True),
        "grpc_model": grpc.get_model_metadata(model, as_json=True),
    }

    out["infer"] = {}
    for name, module, client in (("http", httpclient, http), ("grpc", grpcclient, grpc)):
        # The client's defaults: every output, binary over HTTP; the service's custom parameters.
        by_bytes = client.infer(model, [bytes_input(module, images)], parameters=parameters, request_id="r-1")
        by_pixels = client.infer(model, [pixels_input(module, pixels)], parameters=parameters)
        out["infer"][name] = {
            "bytes": arrays(by_bytes),
            "pixels": arrays(by_pixels),
            "id": by_bytes.get_response()["id"] if name == "http" else by_bytes.get_response().id,
        }
    # Named outputs, one asked as JSON: HTTP honours each output's binary_data flag.
    named = http.infer(
        model,
        [bytes_input(httpclient, images[:1])],
        outputs=[httpclient.InferRequestedOutput("num_detections", binary_data=False),
                 httpclient.InferRequestedOutput("scores", binary_data=True)],
        parameters=parameters,
    )  # fmt: skip
    out["named_outputs"] = {
        "outputs": [o["name"] for o in named.get_response()["outputs"]],
        "num_detections": named.as_numpy("num_detections").tolist(),
        "boxes_absent": named.as_numpy("boxes") is None,
    }

    out["errors"] = {
        "http_unknown_model": error(
            lambda: http.infer("no-such-model", [bytes_input(httpclient, images[:1])])
        ),
        "grpc_unknown_model": error(
            lambda: grpc.infer("no-such-model", [bytes_input(grpcclient, images[:1])])
        ),
        "http_not_an_image": error(lambda: http.infer(model, [bytes_input(httpclient, [b"not an image"])])),
        "grpc_not_an_image": error(lambda: grpc.infer(model, [bytes_input(grpcclient, [b"not an image"])])),
        "http_bad_input": error(lambda: http.infer(model, [pixels_input(httpclient, pixels[:, :8])])),
        "grpc_bad_parameter": error(
            lambda: grpc.infer(
                model, [bytes_input(grpcclient, images[:1])], parameters={"classes": "unicorn"}
            )
        ),
        "grpc_deadline": error(
            lambda: grpc.infer(model, [bytes_input(grpcclient, images[:1])], client_timeout=0.000001)
        ),
        "http_timeout_parameter": error(
            lambda: http.infer(model, [bytes_input(httpclient, images[:1])], timeout=1)  # 1 µs
        ),
        "grpc_unimplemented": error(lambda: grpc.get_inference_statistics(model)),
    }
    # Triton's model configuration and repository index, as its tools read them.
    out["config"] = {
        "http": http.get_model_config(model),
        "grpc": grpc.get_model_config(model, as_json=True),
        "grpc_classes": grpc.get_model_config(model).config.parameters["classes"].string_value,
    }
    out["index"] = {
        "http": http.get_model_repository_index(),
        "grpc": grpc.get_model_repository_index(as_json=True),
    }

    # A burst: N concurrent requests over each protocol (the HTTP client's own async_infer pool,
    # gRPC's from threads).
    burst = spec["burst"]
    started = time.monotonic()
    pending = [http.async_infer(model, [bytes_input(httpclient, images[:1])]) for _ in range(burst)]
    http_counts = [int(p.get_result().as_numpy("num_detections")[0]) for p in pending]
    with ThreadPoolExecutor(burst) as pool:
        grpc_counts = list(
            pool.map(
                lambda _: int(
                    grpc.infer(model, [bytes_input(grpcclient, images[:1])]).as_numpy("num_detections")[0]
                ),
                range(burst),
            )
        )
    out["burst"] = {"http": http_counts, "grpc": grpc_counts, "seconds": time.monotonic() - started}
    http.close()
    grpc.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
