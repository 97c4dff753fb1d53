"""Hostile inputs against a live ``ssd serve`` (attacks/ holds the cases; ``ssd bench
hostile`` runs them all at once beside normal load).

One server for the module, on a copy of the demo model, with ``SSD_ADMIN_TOKEN`` set and every
other setting at its default (CPU provider only, so that no machine waits for a GPU). Each case
must get its expected answer, leave the server ready, and keep its peak resident memory under 1 GB.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live import free_port, live_server

from attacks.catalogue import RSS_LIMIT, Case, cases, run_case
from attacks.client import Target, ready
from attacks.fuzz import fuzz_cases
from attacks.payloads import NO_PHOTOS, PHOTOS, photos
from attacks.watch import proc_status

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
TOKEN = "hostile-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if not DEMO.exists():
        pytest.skip(f"the demo model is absent: {DEMO}")
    folder = tmp_path_factory.mktemp("hostile")
    model = folder / "model.onnx"  # a copy: the tampered-artifact case replaces the served file
    shutil.copy2(DEMO, model)
    grpc_port = free_port()
    settings = {"SSD_MODEL_PATH": str(model), "SSD_ADMIN_TOKEN": TOKEN, "SSD_GRPC_PORT": str(grpc_port)}
    with live_server(folder, settings) as live:
        yield Target(live.url, live.process.pid, TOKEN, model, photos(), f"127.0.0.1:{grpc_port}")


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


@pytest.mark.timing
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_hostile_case(server: Target, case: Case) -> None:
    result = run_case(case, server)
    if result.skipped:
        pytest.skip(result.skipped)
    after = _aftermath(server)
    assert result.ok and not after, "; ".join([result.describe(), *after])


def _fuzz(server: Target, seed: int, count: int, protocol: str = "detect") -> None:
    assert server.photos, NO_PHOTOS  # committed (photos/): their absence is a failure, not a skip
    results = [run_case(c, server) for c in fuzz_cases(seed, count, server.photos, protocol)]
    wrong = [r.describe() for r in results if not r.ok]
    after = _aftermath(server)
    assert not wrong and not after, f"{len(wrong)} of {count} wrong:\n" + "\n".join(wrong + after)


def test_fuzzed_photos_quick(server: Target) -> None:
    _fuzz(server, seed=1, count=40)


@pytest.mark.slow
def test_fuzzed_photos_many(server: Target) -> None:
    _fuzz(server, seed=2, count=300)


@pytest.mark.parametrize("protocol", ["oip-rest", "oip-grpc"])
def test_fuzzed_photos_through_the_open_inference_protocol(server: Target, protocol: str) -> None:
    """The same mutations as tensors of the OIP (REST and gRPC): its statuses, its error form."""
    _fuzz(server, seed=3, count=40, protocol=protocol)


def test_mutations_are_reproducible() -> None:
    """The same seed gives the same bytes (a failure can be replayed), different seeds differ."""
    assert PHOTOS.is_dir(), NO_PHOTOS
    from attacks.fuzz import mutations

    sources = photos()[:3]
    first = list(mutations(7, 12, sources))
    assert first == list(mutations(7, 12, sources))
    assert first != list(mutations(8, 12, sources))
    assert {content_type for _, _, content_type in first} <= {"image/jpeg", "image/png", "image/webp"}
