"""The detector under NVIDIA PyTriton (Triton Inference Server's dynamic batcher): a peer for the
serving benchmarks.

    SSD_PYTRITON_PYTHON=/path/to/pytriton-env/bin/python        # see "Where it runs" below
    $SSD_PYTRITON_PYTHON -m bench.peers.pytriton_server --artifact models/demo.onnx --port 8000 \\
        [--max-batch 8] [--max-delay-ms 5] [--threads 2]              # run from the repo root

Request: Triton's KServe v2 HTTP protocol with its binary tensor extension, ``POST
/v2/models/ssd/infer`` with ``Inference-Header-Content-Length: N``: N bytes of JSON header, then
the input ``image`` (BYTES, shape [1, 1]) raw: a 4-byte little-endian length, then the JPEG. No
base64 on either side. Answer: JSON whose output ``result`` (BYTES [1, 1], asked for as JSON data)
holds ours for that image, ``{"model": {...}, "results": [{..., "detections": [...]}]}``.
``GET /v2/models/ssd/ready`` is 200 once the model is loaded and warmed up (``/v2/health/ready``
says 200 before PyTriton has loaded the model: Triton starts with none).

Same as ours: the settings (``SSD_*``), one ``service.artifact.Detector`` (CPU, ``--threads``
intra-op threads, warmed up for batches 1..max), ``service.images.decode`` in a pool of
``SSD_DECODE_THREADS`` threads, ``Detections.to_json`` at ``SSD_SCORE_THRESHOLD``.

What Triton decides, and so differs:

- Batching: Triton's dynamic batcher, ``ModelConfig(max_batch_size=--max-batch)`` and
  ``DynamicBatcher(max_queue_delay_microseconds=--max-delay-ms * 1000)`` (the semantics ours
  copies), one model instance: one batch at a time.
- Decoding happens inside the infer function, for the whole batch (in the decode pool): Triton
  batches tensors, and the JPEG bytes are the tensor.
- Processes: this Python process (the infer function, called by PyTriton's proxy), the
  ``tritonserver`` binary (HTTP on --port, gRPC and metrics on free ports), and Triton's Python
  backend stub, which passes tensors to this process through shared memory (/dev/shm).
- A bad image fails only its own element: ``{"error": {...}}`` in its result (status 200).

Where it runs: PyTriton is not in the ``peers`` dependency group, because it cannot share the
project's lock: no release of nvidia-pytriton resolves with the project's numpy 2.4.6 and
protobuf 7.36.2. Releases 0.5.8 to 0.7.0 (the newest) declare ``numpy>=1.21,<2.0.0``, and the
``tritonclient[grpc]`` versions every release from 0.5 accepts pin protobuf below 7 (2.73.0, the
newest: ``protobuf>=6.30.0,<7.0``). ``uv pip compile`` of ``nvidia-pytriton, numpy==2.4.6,
protobuf==7.36.2`` ends "No solution found when resolving dependencies: ... tritonclient[all]>=2.73.0
depend on protobuf>=6.30.0,<7.0 ... your requirements are unsatisfiable"; put in the group, it makes
``uv lock`` move numpy 2.4.6 -> 1.26.4 and protobuf 7.36.2 -> 6.33.6 for the serving and train
installs too (one lock, one version of each package). So it runs from an environment of its own
beside the project, with the project's onnxruntime, Pillow and pydantic versions (numpy 1.26.4
there, with the same onnxruntime build):

    uv run python -m bench.peers.pytriton_server --make-env      # makes .venv/pytriton
    export SSD_PYTRITON_PYTHON=/elsewhere/bin/python             # or point at another one

``bench.peers`` uses ``SSD_PYTRITON_PYTHON``, else ``.venv/pytriton/bin/python`` when it exists.
The wheels are Linux-only (manylinux_2_35: glibc 2.35 or newer, x86-64 or aarch64) and bundle
Triton 2.51 (``tritonserver``), its CUDA runtime and the Python backend stubs for Python 3.8 to
3.13; no GPU is needed for this CPU model (Triton logs that it finds no CUDA driver, and goes on).
The stub loads the first ``libpython3.X.so.1.0`` on the loader path; ``main`` puts this
interpreter's own first (a pyenv 3.11.7 stdlib under Debian's libpython 3.11.2 fails the model's
load with "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'").
``unavailable()`` says which of these is missing here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

MODEL = "ssd"  # bench.peers.TRITON_MODEL
ROOT = Path(__file__).resolve().parents[2]


def _glibc() -> tuple[int, int] | None:
    try:
        _, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (ValueError, OSError, AttributeError):
        return None


@cache
def unavailable(python: str = sys.executable) -> str | None:
    """Why PyTriton cannot run here with ``python`` (None when it can); imports no pytriton here."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        here = f"{sys.platform} {platform.machine()}"
        return f"nvidia-pytriton ships only Linux x86-64/aarch64 wheels; this is {here}"
    glibc = _glibc()
    if glibc is None or glibc < (2, 35):
        return (
            f"nvidia-pytriton's wheels need glibc 2.35 or newer (manylinux_2_35); this has {glibc or 'none'}"
        )
    probe = "import pytriton.triton, onnxruntime, PIL, pydantic_settings, numpy; print(numpy.__version__)"
    try:
        done = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
        )
    except OSError as exc:
        return f"cannot run {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{python} cannot import PyTriton and the service's dependencies ({last}). PyTriton is not "
            "in the peers group: no nvidia-pytriton release resolves with the project's numpy 2 and "
            "protobuf 7 (0.7.0 declares numpy<2; tritonclient[grpc] pins protobuf<7). Make its own "
            "environment with `uv run python -m bench.peers.pytriton_server --make-env` "
            "(.venv/pytriton) or set SSD_PYTRITON_PYTHON to one; see bench/peers/pytriton_server.py"
        )
    return None


ENV = ROOT / ".venv" / "pytriton"  # under .venv/: ignored by git, beside the project's environment


def default_python() -> str:
    """SSD_PYTRITON_PYTHON, else .venv/pytriton's Python if made, else this one."""
    if os.environ.get("SSD_PYTRITON_PYTHON"):
        return os.environ["SSD_PYTRITON_PYTHON"]
    made = ENV / "bin" / "python"
    return str(made) if made.exists() else sys.executable


def make_env(path: Path = ENV) -> int:
    """Makes PyTriton's own environment at ``path`` with uv: PyTriton, and the service's
    dependencies at the versions this (the project's) environment has."""
    from importlib.metadata import PackageNotFoundError, version

    pins = ["nvidia-pytriton==0.7.0"]
    for name in ("onnxruntime-gpu", "onnxruntime", "pillow", "pydantic", "pydantic-settings"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for argv in (
        ["uv", "venv", "--allow-existing", "--python", python, str(path)],
        ["uv", "pip", "install", "--python", str(path / "bin" / "python"), *pins],
    ):
        print("+", " ".join(argv), file=sys.stderr)
        if subprocess.run(argv, check=False).returncode:
            return 1
    print(f"made {path}; bench.peers finds it there (or set SSD_PYTRITON_PYTHON)", file=sys.stderr)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the detector under NVIDIA PyTriton")
    parser.add_argument("--artifact")
    parser.add_argument("--port", type=int, default=8000, help="HTTP (KServe v2)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--make-env", nargs="?", const=str(ENV), metavar="DIR",
        help=f"make PyTriton's environment (default {ENV.relative_to(ROOT)}) and exit",
    )  # fmt: skip
    args = parser.parse_args()
    if args.make_env:
        sys.exit(make_env(Path(args.make_env)))
    if not args.artifact:
        parser.error("--artifact is required")

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    sys.path.insert(0, str(ROOT))
    from service.artifact import Detector
    from service.images import Decoded, ImageError, decode
    from service.settings import Settings

    settings = Settings()
    detector = Detector(args.artifact, providers=["cpu"], intra_op_threads=args.threads)
    info = detector.info
    height, width = info.input_size
    for size in range(1, args.max_batch + 1):  # as ours warms up before /readyz says 200
        detector.run(np.zeros((size, height, width, 3), dtype=np.uint8))
    model = {"name": info.name, "version": info.version, "sha256": info.sha256}
    pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")

    def one(data: bytes) -> Decoded | ImageError:
        try:
            return decode(data, info.input_size, settings.max_image_pixels)
        except ImageError as exc:
            return exc

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        # image: object array [B, 1] of JPEG bytes, the requests of this batch concatenated.
        decoded = list(pool.map(one, (bytes(row[0]) for row in image)))
        good = [d for d in decoded if isinstance(d, Decoded)]
        found = iter(detector.detect(np.stack([d.pixels for d in good])) if good else [])
        out: list[bytes] = []
        for d in decoded:
            answer: dict[str, Any]
            if isinstance(d, ImageError):
                answer = {"error": {"code": d.code, "status": d.status, "message": str(d)}}
            else:
                detections = next(found).to_json(
                    d.width, d.height, settings.score_threshold, info.max_detections
                )
                result = {"filename": None, "width": d.width, "height": d.height, "detections": detections}
                answer = {"model": model, "results": [result]}
            out.append(json.dumps(answer).encode())
        return {"result": np.array(out, dtype=object).reshape(-1, 1)}

    # Triton's Python backend stub links libpython3.X.so.1.0 and finds the first one on the loader
    # path: on this Debian that is the system's 3.11.2, while the stdlib it then imports is this
    # interpreter's (pyenv 3.11.7), and the model fails to load (AttributeError: '_thread.RLock'
    # object has no attribute '_recursion_count'). Put this interpreter's own libpython first.
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and library and (Path(libdir) / library).exists():
        paths = [libdir, os.environ.get("LD_LIBRARY_PATH", "")]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=_free_port(),
        metrics_port=_free_port(),
        log_verbose=0,
    )
    # SIGTERM (how the benchmarks stop a server) leaves through the `with`, which stops Triton
    # and removes the workspace PyTriton copies it into (~/.cache/pytriton/workspace_*).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="result", dtype=bytes, shape=(1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=round(args.max_delay_ms * 1000)),
            ),
            strict=True,
        )
        triton.serve()  # until SIGINT/SIGTERM


if __name__ == "__main__":
    main()
