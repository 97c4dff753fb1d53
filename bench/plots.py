"""The benchmarks' plots (matplotlib, from the train group; without it, reports are written unplotted)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np


def _pyplot() -> ModuleType | None:
    try:
        import matplotlib
    except ImportError:
        print("ssd bench: matplotlib is not installed (the train group has it); no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(report: dict, path: Path) -> Path | None:
    """Throughput and p99 against concurrency, one line per server."""
    plt = _pyplot()
    if plt is None:
        return None

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in report["servers"].items():
        points = runs.get("closed_loop", [])
        if not points:
            continue
        x = [p["concurrency"] for p in points]
        left.plot(x, [p["images_per_s"] for p in points], marker="o", label=name)
        right.plot(x, [p["p99_ms"] for p in points], marker="o", label=name)
    limit = report.get("limit", {}).get("session_images_per_s")
    if limit:
        left.axhline(limit, color="grey", linestyle="--", label="ONNX session alone")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients (closed loop)")
        axis.legend()
        axis.grid(alpha=0.3)
    left.set(ylabel="images/s", title="Throughput")
    right.set(ylabel="p99 latency (ms)", title="p99 latency", yscale="log")
    m = report["machine"]
    fig.suptitle(
        f"{Path(report['artifact']).name} on {m['cores']} cores, {m['cpu']}, {m['date']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(timeline: dict[str, list[float]], title: str, path: Path) -> Path | None:
    """A run over time: answered and rejected requests/s, p99 of the answered, resident memory."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    t = np.asarray(timeline["t"])
    top.plot(t, timeline["ok_per_s"], label="answered 200 /s")
    top.plot(t, timeline["rejected_per_s"], label="rejected 503 /s")
    top.plot(t, timeline["failed_per_s"], label="other errors /s")
    top.set(ylabel="requests/s")
    top.legend()
    middle.plot(t, timeline["p99_ms"], label="p99 of answered")
    middle.plot(t, timeline["p50_ms"], label="p50 of answered")
    middle.set(ylabel="latency (ms)")
    middle.legend()
    if timeline.get("rss_t"):
        bottom.plot(timeline["rss_t"], timeline["rss_mb"])
    bottom.set(ylabel="server RSS (MB)", xlabel="seconds")
    for axis in (top, middle, bottom):
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
