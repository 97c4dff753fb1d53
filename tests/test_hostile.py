"""Hostile inputs against a live ``ssd serve`` (bench/hostile.py holds the cases; ``ssd bench
hostile`` runs them all at once beside normal load).

One server for the module, on a copy of the demo model, with ``SSD_ADMIN_TOKEN`` set and every
other setting at its default (CPU provider only, so that no machine waits for a GPU). Each case
must get its expected answer, leave the server ready, and keep its peak resident memory under 1 GB.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.hostile import (
    COCO_MINI,
    NO_PHOTOS,
    RSS_LIMIT,
    Case,
    Target,
    cases,
    fuzz_cases,
    photos,
    proc_status,
    ready,
    run_case,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
TOKEN = "hostile-test-token"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if not DEMO.exists():
        pytest.skip(f"the demo model is absent: {DEMO}")
    folder = tmp_path_factory.mktemp("hostile")
    model = folder / "model.onnx"  # a copy: the tampered-artifact case replaces the served file
    shutil.copy2(DEMO, model)
    port = _free_port()
    # The caller's own SSD_ settings are dropped: the limits under test are the defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env |= {"SSD_MODEL_PATH": str(model), "SSD_ADMIN_TOKEN": TOKEN, "SSD_PROVIDERS": "cpu"}
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    target = Target(f"http://127.0.0.1:{port}", process.pid, TOKEN, model, photos())
    try:
        deadline = time.monotonic() + 60
        while not _up(target):
            if process.poll() is not None:
                pytest.fail(f"ssd serve exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ssd serve not ready within 60 s: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield target
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _up(target: Target) -> bool:
    try:
        return ready(target, timeout=1)
    except httpx.TransportError:
        return False


def _aftermath(target: Target) -> list[str]:
    """What every case must leave behind: a ready server whose peak memory stayed under 1 GB."""
    problems = []
    if not _up(target):
        problems.append("/readyz is not 200 afterwards")
    assert target.pid is not None
    peak = proc_status(target.pid, "VmHWM")
    if peak is None:
        problems.append("the server process is gone")
    elif peak >= RSS_LIMIT:
        problems.append(f"the server's peak resident memory (VmHWM) is {peak / 2**20:.0f} MB, over 1 GB")
    return problems


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_hostile_case(server: Target, case: Case) -> None:
    result = run_case(case, server)
    if result.skipped:
        pytest.skip(result.skipped)
    after = _aftermath(server)
    assert result.ok and not after, "; ".join([result.describe(), *after])


def _fuzz(server: Target, seed: int, count: int) -> None:
    if not server.photos:
        pytest.skip(NO_PHOTOS)
    results = [run_case(c, server) for c in fuzz_cases(seed, count, server.photos)]
    wrong = [r.describe() for r in results if not r.ok]
    after = _aftermath(server)
    assert not wrong and not after, f"{len(wrong)} of {count} wrong:\n" + "\n".join(wrong + after)


def test_fuzzed_photos_quick(server: Target) -> None:
    _fuzz(server, seed=1, count=40)


@pytest.mark.slow
def test_fuzzed_photos_many(server: Target) -> None:
    _fuzz(server, seed=2, count=300)


def test_mutations_are_reproducible() -> None:
    """The same seed gives the same bytes (a failure can be replayed), different seeds differ."""
    if not COCO_MINI.is_dir():
        pytest.skip(NO_PHOTOS)
    from bench.hostile import mutations

    sources = photos()[:3]
    first = list(mutations(7, 12, sources))
    assert first == list(mutations(7, 12, sources))
    assert first != list(mutations(8, 12, sources))
    assert {content_type for _, _, content_type in first} <= {"image/jpeg", "image/png", "image/webp"}
