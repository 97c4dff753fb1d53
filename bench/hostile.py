"""``ssd bench hostile``: every attack case at once, beside a client sending normal requests.

The cases and the fuzzer live in attacks/ (tests/test_hostile.py runs the same cases one test
each). Here they run on several attack threads, plus a seeded mutation fuzzer over the photos,
against a live ``ssd serve`` with the default settings.

    ssd bench hostile [--model models/demo.onnx] [--fuzz 300] [--threads 4] [--json OUT]

prints the server's peak resident memory (goal: under 1 GB), the p50 of normal /detect requests
during the attacks against unloaded (goal: within 2x), and every case whose outcome was wrong;
exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from attacks.catalogue import RSS_LIMIT, Case, Result, cases, run_case
from attacks.client import Target, ready
from attacks.fuzz import fuzz_cases
from attacks.payloads import MB, NO_PHOTOS, PHOTOS, photos
from attacks.watch import proc_status

# ---------------------------------------------------------------------------------------------
# The whole suite.


@dataclass
class Suite:
    results: list[Result]
    peak_rss_bytes: int | None  # the server's VmHWM after the suite
    ready_after: bool
    seconds: float

    @property
    def wrong(self) -> list[Result]:
        return [r for r in self.results if not r.ok and not r.skipped]


def run_suite(
    base_url: str,
    pid: int | None = None,
    *,
    admin_token: str | None = None,
    model_path: Path | None = None,
    sources: Sequence[bytes] | None = None,
    fuzz: int = 0,
    seed: int = 0,
    threads: int = 1,
    selected: Sequence[Case] | None = None,
) -> Suite:
    """Every case (or ``selected``) and ``fuzz`` fuzzed photos against ``base_url``; the
    non-exclusive ones on ``threads`` threads at once, then the exclusive ones one by one."""
    started = time.perf_counter()
    sources = list(sources) if sources is not None else photos()
    target = Target(base_url, pid, admin_token, model_path, sources)
    chosen = list(selected if selected is not None else cases())
    if fuzz:
        chosen += fuzz_cases(seed, fuzz, sources)
    shared = [c for c in chosen if not c.exclusive]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        done = pool.map(lambda c: run_case(c, target), shared)
        by_name = {case.name: result for case, result in zip(shared, done, strict=True)}
    for case in chosen:
        if case.exclusive:
            by_name[case.name] = run_case(case, target)
    return Suite(
        [by_name[c.name] for c in chosen],
        proc_status(pid, "VmHWM") if pid else None,
        ready(target),
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# The benchmark.


class NormalClient:
    """One client sending the same photo to /detect in a loop while the block runs: what an
    ordinary user sees while the attacks go on."""

    def __init__(self, base_url: str, photo: bytes) -> None:
        self.base_url, self.photo = base_url, photo
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = str(
                        client.post(
                            "/detect", content=self.photo, headers={"content-type": "image/jpeg"}
                        ).status_code
                    )
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                if status == "200":
                    self.latencies.append(time.perf_counter() - started)
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> NormalClient:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def unloaded_latencies(base_url: str, photo: bytes, count: int, warmup: int = 5) -> list[float]:
    import httpx

    out = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(warmup + count):
            started = time.perf_counter()
            response = client.post("/detect", content=photo, headers={"content-type": "image/jpeg"})
            response.raise_for_status()
            if i >= warmup:
                out.append(time.perf_counter() - started)
    return out


def _default_env(token: str) -> dict[str, str]:
    """The service's own default for what the peer command sets for throughput benchmarks (a
    larger queue): this one measures the service as deployed."""
    from service.settings import Settings

    env = {"SSD_ADMIN_TOKEN": token}
    for name in ("max_queue_size",):
        if name in Settings.model_fields:
            env[f"SSD_{name.upper()}"] = str(Settings.model_fields[name].default)
    return env


def main(args: argparse.Namespace) -> int:
    from bench import machine
    from bench.peers import PEERS
    from bench.server import Server, ServerSettings
    from bench.workload import FALLBACK

    sources = photos(Path(args.images)) if args.images else photos()
    normal = sources[0] if sources else FALLBACK.read_bytes()
    fuzz = args.fuzz if sources else 0
    if args.fuzz and not sources:
        print(f"ssd bench hostile: no fuzzing, it {NO_PHOTOS}", file=sys.stderr)
    token = "hostile-bench-token"
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ssd-hostile-") as tmp:
        # A copy: the tampered-artifact case replaces the served file.
        served = Path(tmp) / "model.onnx"
        shutil.copy2(args.model, served)
        with Server(PEERS["ours"], served, ServerSettings(), log=log, env=_default_env(token)) as server:
            assert server.process is not None
            pid = server.process.pid
            unloaded = unloaded_latencies(server.base, normal, args.requests)
            with NormalClient(server.base, normal) as during:
                suite = run_suite(
                    server.base,
                    pid,
                    admin_token=token,
                    model_path=served,
                    sources=sources,
                    fuzz=fuzz,
                    seed=args.seed,
                    threads=args.threads,
                )
    p50_unloaded = statistics.median(unloaded) * 1000
    p50_during = statistics.median(during.latencies) * 1000 if during.latencies else float("nan")
    peak = suite.peak_rss_bytes or 0
    goals = {
        "every_case_right": not suite.wrong,
        "peak_rss_under_1gb": peak < RSS_LIMIT,
        "p50_within_2x": p50_during <= 2 * p50_unloaded,
        "ready_after": suite.ready_after,
    }
    report = {
        "machine": machine.machine_info(),
        "command": "ssd bench " + " ".join(sys.argv[2:]),
        "artifact": str(Path(args.model).resolve()),
        "photos": f"{len(sources)} from {args.images or PHOTOS}" if sources else str(FALLBACK),
        "cases": len(suite.results) - fuzz,
        "fuzz_cases": fuzz,
        "skipped": {r.name: r.skipped for r in suite.results if r.skipped},
        "attack_threads": args.threads,
        "suite_seconds": round(suite.seconds, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "normal_p50_unloaded_ms": round(p50_unloaded, 1),
        "normal_p50_during_ms": round(p50_during, 1),
        "normal_p50_ratio": round(p50_during / p50_unloaded, 2),
        "normal_during": {"requests": sum(during.statuses.values()), "by_status": during.statuses},
        "goals": goals,
        "wrong": [asdict(r) for r in suite.wrong],
        "results": [asdict(r) for r in suite.results],
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "results", "wrong")}))
    for result in suite.wrong:
        print(f"wrong: {result.describe()}", file=sys.stderr)
    print(
        f"ssd bench hostile: {len(suite.results)} cases, {len(suite.wrong)} wrong; peak RSS "
        f"{peak / MB:.0f} MB (goal < {RSS_LIMIT // MB}); normal p50 {p50_during:.1f} ms during, "
        f"{p50_unloaded:.1f} ms unloaded (goal: within 2x); server log {log}",
        file=sys.stderr,
    )
    return 0 if all(goals.values()) else 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/demo.onnx")
    parser.add_argument(
        "--images", default=None, help="folder of JPEG photos (default: photos/val2017, the repository's own)"
    )
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzed photos sent beside the cases")
    parser.add_argument("--seed", type=int, default=0, help="the fuzzer's seed")
    parser.add_argument("--threads", type=int, default=4, help="attacks in flight at once")
    parser.add_argument("--requests", type=int, default=30, help="normal requests timed unloaded")
    parser.add_argument("--log", default="runs/bench/hostile-server.log", help="the server's output")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the figures and every result here")
