"""``ssd bench path``: the path of one request through the service's own code, for each transport
that the checked-out code serves: which of its modules a request passes through, and how many
calls cross from one of them into another (hops).

One warm request is profiled (``sys.setprofile`` and ``threading.setprofile``: the event loop and
the decode and inference threads), in-process with the demo model, so that the figure depends on
the code alone, not on the machine. Run it on two commits to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = str(ROOT / "service") + "/"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(ROOT / "models" / "demo.onnx"))
    parser.add_argument("--image", default=str(ROOT / "docs" / "images" / "demo_scene.jpg"))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _module(filename: str) -> str | None:
    if not filename.startswith(SERVICE) or "/proto/" in filename:
        return None
    return "service." + filename[len(SERVICE) :].removesuffix(".py").replace("/", ".")


class Tracer:
    """Calls into the service's modules: the modules entered, and each crossing between two."""

    def __init__(self) -> None:
        self.modules: Counter[str] = Counter()
        self.hops: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def __call__(self, frame, event: str, arg) -> None:
        if event != "call":
            return
        callee = _module(frame.f_code.co_filename)
        if callee is None:
            return
        caller_frame = frame.f_back
        # The nearest caller in the service's code (through library frames: FastAPI calling a
        # route, asyncio resuming a task): the hop is from that module.
        while caller_frame is not None and _module(caller_frame.f_code.co_filename) is None:
            caller_frame = caller_frame.f_back
        caller = _module(caller_frame.f_code.co_filename) if caller_frame is not None else None
        with self.lock:
            self.modules[callee] += 1
            if caller is not None and caller != callee:
                self.hops[(caller, callee)] += 1


async def _one(client, image: bytes) -> int:
    response = await client.post("/detect", content=image, headers={"Content-Type": "image/jpeg"})
    return response.status_code


async def measure(model: str, image_path: str) -> Tracer:
    import httpx

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_path=model, providers=["cpu"]))
    image = Path(image_path).read_bytes()
    tracer = Tracer()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://detector", timeout=60) as client:
            assert await _one(client, image) == 200  # warm: lazy imports and first-time paths
            threading.setprofile(tracer)
            sys.setprofile(tracer)
            try:
                status = await _one(client, image)
            finally:
                sys.setprofile(None)
                threading.setprofile(None)  # type: ignore[arg-type]
            assert status == 200
    return tracer


def main(args: argparse.Namespace) -> int:
    tracer = asyncio.run(measure(args.model, args.image))
    figures = {
        "modules": len(tracer.modules),
        "hops": sum(tracer.hops.values()),
        "calls": sum(tracer.modules.values()),
        "by_module": dict(tracer.modules.most_common()),
        "crossings": {f"{a} -> {b}": n for (a, b), n in tracer.hops.most_common()},
    }
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        print(f"POST /detect: {figures['hops']} hops across {figures['modules']} modules "
              f"({figures['calls']} calls into the service's code)")  # fmt: skip
        for name, count in tracer.modules.most_common():
            print(f"  {name}: {count} calls")
    return 0
