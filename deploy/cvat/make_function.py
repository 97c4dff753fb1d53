"""Write CVAT's nuclio function.yaml for an artifact: its labels are the artifact's classes, in
its order, so that CVAT maps each detection to a task label by name.

    uv run python deploy/cvat/make_function.py models/demo.onnx > deploy/cvat/function.yaml

(``make cvat-function MODEL=...``; tests/test_cvat.py holds the committed file to the demo model.)
"""

from __future__ import annotations

import argparse
import json
import sys

import onnx

TEMPLATE = """\
# CVAT's automatic annotation by the SSD detector: a nuclio function forwarding each image to the
# service's POST /detect (main.py). Generated from the artifact's classes by make_function.py;
# deploy with `nuctl deploy --project-name cvat --path deploy/cvat --platform local`, the detector
# reachable at SSD_DETECTOR_URL from CVAT's network.
metadata:
  name: {name}
  namespace: cvat
  annotations:
    name: {title}
    type: detector
    framework: onnx
    spec: |
{spec}

spec:
  description: SSD detector ({model}) served by ssd serve, through its POST /detect
  runtime: "python:3.11"
  handler: main:handler
  eventTimeout: 30s
  env:
    - name: SSD_DETECTOR_URL
      value: http://detector:8000
  build:
    image: cvat.{name}
    baseImage: python:3.11-slim
  triggers:
    myHttpTrigger:
      maxWorkers: 2
      kind: http
      workerAvailabilityTimeoutMilliseconds: 10000
      attributes:
        maxRequestBodySize: 33554432 # 32 MB
  platform:
    attributes:
      restartPolicy:
        name: always
        maximumRetryCount: 3
      mountMode: volume
"""


def classes_of(path: str) -> tuple[str, list[str]]:
    """The artifact's model name and classes, from its metadata."""
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return meta["model"], json.loads(meta["classes"])


def function_yaml(path: str, name: str = "ssd-detector") -> str:
    model, classes = classes_of(path)
    labels = [{"id": i, "name": c, "type": "rectangle"} for i, c in enumerate(classes)]
    spec = "\n".join(f"      {line}" for line in json.dumps(labels, indent=2).splitlines())
    return TEMPLATE.format(name=name, title=f"SSD detector ({model})", spec=spec, model=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx artifact the detector serves")
    parser.add_argument("--name", default="ssd-detector", help="the function's name in CVAT")
    args = parser.parse_args()
    sys.stdout.write(function_yaml(args.model, args.name))


if __name__ == "__main__":
    main()
