"""The checks deploy/image-test.sh makes of a running detector from outside its container, each a
subcommand that exits non-zero with the reason:

    python deploy/image_probe.py same-detections URL_A URL_B PHOTO   # both answer /detect alike
    python deploy/image_probe.py metrics URL                         # /metrics answers
    python deploy/image_probe.py grpc-live HOST:PORT                 # the OIP's gRPC ServerLive
    python deploy/image_probe.py model-sha URL PHOTO                 # the sha256 of the model answering
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx

# The container runs another CPU, maybe another Python; ONNX Runtime's CPU kernels agree to far
# less than this, and a wrong model or preprocessing differs by far more.
TOLERANCE = 1e-3


def detect(url: str, photo: Path) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/detect", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    response.raise_for_status()
    return response.json()


def same_detections(url_a: str, url_b: str, photo: Path) -> str:
    a, b = detect(url_a, photo), detect(url_b, photo)
    if a["model"]["sha256"] != b["model"]["sha256"]:
        raise SystemExit(f"different artifacts: {a['model']['sha256']} and {b['model']['sha256']}")
    found_a, found_b = a["results"][0]["detections"], b["results"][0]["detections"]
    if [d["class_id"] for d in found_a] != [d["class_id"] for d in found_b]:
        raise SystemExit(f"different detections:\n{found_a}\n{found_b}")
    worst = 0.0
    for x, y in zip(found_a, found_b, strict=True):
        worst = max(
            worst,
            abs(x["score"] - y["score"]),
            *(abs(p - q) for p, q in zip(x["box"], y["box"], strict=True)),
        )
    if worst > TOLERANCE:
        raise SystemExit(f"scores or boxes differ by {worst:g}:\n{found_a}\n{found_b}")
    return f"{len(found_a)} detections alike (largest difference {worst:g})"


def metrics(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    ready = [line for line in response.text.splitlines() if line.startswith("detector_ready")]
    if not ready:
        raise SystemExit("/metrics has no detector_ready")
    return ready[0]


def grpc_live(target: str) -> str:
    from service.oip.proto import open_inference_grpc_pb2 as pb
    from service.oip.proto.open_inference_grpc_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(target) as channel:
        live = GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    if not live:
        raise SystemExit("ServerLive: false")
    return "ServerLive: true"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    same = commands.add_parser("same-detections")
    same.add_argument("url_a")
    same.add_argument("url_b")
    same.add_argument("photo", type=Path)
    commands.add_parser("metrics").add_argument("url")
    commands.add_parser("grpc-live").add_argument("target")
    sha = commands.add_parser("model-sha")
    sha.add_argument("url")
    sha.add_argument("photo", type=Path)
    args = parser.parse_args()
    if args.command == "same-detections":
        print(same_detections(args.url_a, args.url_b, args.photo))
    elif args.command == "metrics":
        print(metrics(args.url))
    elif args.command == "grpc-live":
        print(grpc_live(args.target))
    else:
        print(detect(args.url, args.photo)["model"]["sha256"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's gRPC stubs
    main()
