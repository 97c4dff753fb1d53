"""What the benchmarks share: what they ran on (recorded with every figure), how they time and report."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str | object = "cpu") -> dict[str, Any]:
    """The machine and software a figure was measured on (torch's part only where torch is installed)."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "device": str(device),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return info
    info |= {"torch": str(torch.__version__), "torch_threads": torch.get_num_threads()}
    if torch.device(str(device)).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(str(device)))
    return info


def sample_times(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def emit(report: dict[str, Any], path: str | None) -> None:
    """Print a benchmark's report, and write it to ``path`` as well when one is given."""
    print(json.dumps(report, indent=2))
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
