"""The benchmarks' own machinery: the load generator's counts, the /metrics arithmetic, the peer
comparison, and `ssd bench serve|overload|soak` end to end on the demo model (short runs)."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen
from bench.serve import at_equal_p99, median_sweep, point_by_point
from bench.server import batch_sizes, metric_sum

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects
    count = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Handler.lock:
            _Handler.count += 1
            n = _Handler.count
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
            return
        status = 503 if n % 4 == 0 else 200  # every fourth request is refused
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _Handler.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _request(path: str = "/detect") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc".encode()


def test_open_loop_sends_the_rate_and_counts_every_status(http_server):
    result = loadgen.run(loadgen.Load(port=http_server, requests=(_request(),), seconds=1.0, rate=60))
    assert result.status.size == 60 == _Handler.count  # arrivals at fixed intervals, none dropped
    assert (result.status == 503).sum() == 15
    summary = loadgen.summarize(result)
    assert summary["ok"] == 45 and summary["errors"] == {"503": 15}
    assert "rejected_p99_ms" in summary
    # Scheduled arrivals: the n-th at n / rate seconds, whenever its answer came.
    assert np.diff(np.sort(result.started)) == pytest.approx(np.full(59, 1 / 60))


def test_closed_loop_keeps_the_clients_busy_and_reads_chunked_bodies(http_server):
    result = loadgen.run(
        loadgen.Load(port=http_server, requests=(_request("/chunked"),), seconds=0.5, clients=3)
    )
    assert result.status.size == _Handler.count > 10
    assert (result.status == 200).all()
    assert (result.latency > 0).all()


def test_a_refused_connection_is_recorded_not_raised():
    from bench.server import free_port

    result = loadgen.run(loadgen.Load(port=free_port(), requests=(_request(),), seconds=0.3, rate=20))
    assert result.status.size == 6 and (result.status == loadgen.CONNECTION_FAILED).all()


def test_load_needs_exactly_one_pace():
    with pytest.raises(ValueError):
        loadgen.Load(port=1, requests=(b"x",), seconds=1)
    with pytest.raises(ValueError):
        loadgen.Load(port=1, requests=(b"x",), seconds=1, clients=1, rate=1.0)


METRICS_BEFORE = """\
detector_batch_size_bucket{le="1.0"} 2.0
detector_batch_size_bucket{le="2.0"} 2.0
detector_batch_size_bucket{le="4.0"} 3.0
detector_batch_size_bucket{le="8.0"} 3.0
detector_batch_size_bucket{le="+Inf"} 3.0
detector_batch_size_count 3.0
detector_batch_size_sum 5.0
"""
METRICS_AFTER = """\
detector_batch_size_bucket{le="1.0"} 4.0
detector_batch_size_bucket{le="2.0"} 4.0
detector_batch_size_bucket{le="4.0"} 6.0
detector_batch_size_bucket{le="8.0"} 15.0
detector_batch_size_bucket{le="+Inf"} 15.0
detector_batch_size_count 15.0
detector_batch_size_sum 93.0
"""


def test_batch_sizes_between_two_scrapes():
    assert batch_sizes(METRICS_BEFORE, METRICS_AFTER) == {
        "mean_batch_size": round(88 / 12, 2),
        "batches_by_size": {"<=1": 2, "<=4": 1, "<=8": 9},
    }
    assert batch_sizes("", METRICS_AFTER) == {}  # a peer without our /metrics
    assert metric_sum('a_total{x="1"} 2\na_total{x="2"} 3\na_totally 9\n', "a_total") == 5


def test_peers_are_compared_at_equal_or_better_p99():
    ours = [
        {"concurrency": 1, "ok": 10, "images_per_s": 20.0, "p99_ms": 40.0},
        {"concurrency": 8, "ok": 10, "images_per_s": 70.0, "p99_ms": 150.0},
        {"concurrency": 16, "ok": 10, "images_per_s": 80.0, "p99_ms": 300.0},
    ]
    theirs = [
        {"concurrency": 1, "ok": 10, "images_per_s": 15.0, "p99_ms": 50.0},
        {"concurrency": 16, "ok": 10, "images_per_s": 50.0, "p99_ms": 200.0},
    ]
    compared = at_equal_p99(ours, theirs)
    # Their best point is 50 images/s at p99 200 ms; ours at p99 <= 200 ms is 70 images/s.
    assert compared["ratio"] == 1.4 and compared["ours_concurrency"] == 8
    assert (
        at_equal_p99(ours, [{"concurrency": 1, "ok": 5, "images_per_s": 10.0, "p99_ms": 10.0}])["ratio"]
        == 0.0
    )


def test_repeated_sweeps_are_merged_point_by_point_at_the_median():
    def point(clients, rate, p99):
        return {
            "concurrency": clients,
            "ok": 10,
            "images_per_s": rate,
            "p50_ms": p99 / 2,
            "p90_ms": p99,
            "p99_ms": p99,
        }

    runs = [
        {"closed_loop": [point(1, 50.0, 30.0), point(8, 80.0, 200.0)], "open_loop": []},
        {"closed_loop": [point(1, 40.0, 25.0), point(8, 90.0, 100.0)], "open_loop": []},
        {"closed_loop": [point(1, 45.0, 20.0), point(8, 70.0, 150.0)], "open_loop": []},
    ]
    merged = median_sweep(runs)["closed_loop"]
    assert [p["images_per_s"] for p in merged] == [45.0, 80.0]
    assert [p["p99_ms"] for p in merged] == [25.0, 150.0]  # each percentile's own median
    assert merged[1]["images_per_s_runs"] == [80.0, 90.0, 70.0]
    assert median_sweep(runs[:1]) is runs[0]

    peer = {"closed_loop": [point(1, 30.0, 40.0), point(8, 100.0, 120.0)]}
    slow = {"closed_loop": [point(1, 35.0, 50.0), {**point(8, 0.0, 0.0), "ok": 0}]}
    rows = point_by_point({"ours": {"closed_loop": merged}, "a": peer, "b": slow}, ["a", "b"])
    assert [(r["best_peer"], r["ratio"]) for r in rows] == [("b", round(45 / 35, 3)), ("a", 0.8)]
    assert rows[1]["peer_p99_ms"] == 120.0 and rows[1]["ours_p99_ms"] == 150.0


def _bench(tmp_path, *argv):
    done = subprocess.run(
        [sys.executable, "-m", "cli", "bench", *argv, "--model", str(DEMO), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.timing
@pytest.mark.slow
def test_bench_serve_end_to_end(tmp_path):
    _bench(
        tmp_path,
        "serve",
        "--peers",
        "none",
        "--concurrency",
        "1",
        "4",
        "--open-loop",
        "0.5",
        "--seconds",
        "2",
    )
    report = json.loads((tmp_path / "serve.json").read_text())
    ours = report["servers"]["ours"]
    assert [p["concurrency"] for p in ours["closed_loop"]] == [1, 4]
    for point in ours["closed_loop"] + ours["open_loop"]:
        assert point["ok"] > 0 and point["errors"] == {}
        assert point["p50_ms"] <= point["p99_ms"] <= point["max_ms"]
        assert point["mean_batch_size"] >= 1 and point["rss_mb"] > 50
    # Four clients keep more than one image per batch.
    assert ours["closed_loop"][1]["mean_batch_size"] > ours["closed_loop"][0]["mean_batch_size"]
    assert report["limit"]["session_images_per_s"] > 0
    assert report["machine"]["cores"] and report["machine"]["date"]
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@pytest.mark.timing
@pytest.mark.slow
def test_bench_overload_refuses_fast_and_soak_stays_clean(tmp_path):
    # Capacity measured first, so that the offered 10x is well past what this machine serves,
    # however fast or busy it is (a capacity given as 20 images/s was under 2x what a bigger
    # machine serves, which then refused nothing).
    _bench(tmp_path, "overload", "--factor", "10", "--seconds", "3", "--measure-seconds", "2")
    report = json.loads((tmp_path / "overload.json").read_text())
    overload = report["overload"]
    # Refused, and next to nothing admitted then missed its deadline. Not nothing: when one
    # batch stalls (the machine paused), the pace may jump up to 4x (service/estimates.py), and
    # with the queue at its 256-image bound the images joining it then look past their deadline
    # and are dropped (504). One run of the suite saw 17 of 2,631 so, all within 0.1 s.
    errors = overload["errors"]
    assert set(errors) <= {"503", "504"} and errors.get("503", 0) > 0
    assert errors.get("504", 0) <= 0.02 * overload["requests"], errors
    assert overload["ok"] > 0 and overload["rejected_p99_ms"] < overload["p99_ms"]
    assert overload["rss_start_mb"] > 50
    assert len(report["timeline"]["t"]) >= 3
    assert (tmp_path / "overload.png").exists()

    capacity = report["capacity_images_per_s"]  # as the overload measured it
    _bench(tmp_path, "soak", "--capacity", str(capacity), "--minutes", "0.05")
    soak = json.loads((tmp_path / "soak.json").read_text())
    assert soak["errors"] == 0 and soak["soak"]["ok"] == soak["soak"]["requests"] > 0


def test_bench_help_lists_every_benchmark(capsys):
    import cli
    from bench.cli import SERVING, TORCH

    with pytest.raises(
        SystemExit
    ) as exit_info:  # argparse's help expands every help text (a bare % broke it)
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*SERVING, *TORCH])


def test_with_query_adds_a_deadline_to_a_raw_request():
    from bench.workload import with_query

    raw = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
    assert with_query(raw, "timeout_ms=300").startswith(b"POST /detect?timeout_ms=300 HTTP/1.1\r\nHost: x")
    assert with_query(with_query(raw, "a=1"), "b=2").split(b" ")[1] == b"/detect?a=1&b=2"
    assert with_query(raw, "a=1").endswith(b"\r\n\r\nab")


def test_the_small_data_set_is_shapes_on_held_apart_photos(tmp_path):
    from bench.small_data import CLASSES, PHOTOS, build
    from model.data import open_dataset
    from model.data.summary import Summary

    data = build(tmp_path / "data", PHOTOS, train=12, val=6)
    train, val = open_dataset(data, "train"), open_dataset(data, "val")
    assert (len(train), len(val)) == (12, 6) and train.classes == list(CLASSES)
    summary = Summary.of(train, "train")
    assert summary.without_objects == 0 and all(summary.objects.values())
    # Objects from 10% to 60% of the side; rotation, occlusion and the border trim a few below.
    assert summary.sizes["< 5%"] == 0 and summary.sizes[">= 60%"] <= 0.1 * sum(summary.sizes.values())
    assert not (tmp_path / "data.partial").exists()


def test_bench_path_follows_one_request_through_the_service(capsys):
    import argparse

    from bench import request_path

    parser = argparse.ArgumentParser()
    request_path.configure(parser)
    assert request_path.main(parser.parse_args(["--json"])) == 0
    figures = json.loads(capsys.readouterr().out)
    # The request enters the core and its adapter, and crosses between them.
    assert {"service.pipeline", "service.detect", "service.batcher"} <= set(figures["by_module"])
    assert figures["hops"] >= figures["modules"] > 5
    assert "service.detect -> service.pipeline" in figures["crossings"]


def test_the_null_artifact_has_the_demo_models_interface_and_is_current():
    """models/null.onnx (``ssd bench frontend``'s model): the demo model's input, outputs and
    metadata, constant detections for every image of a batch, and the bytes that
    bench/null_artifact.py writes today (so that before and after measure the same file)."""
    from bench.null_artifact import DETECTIONS, OUT, build
    from service.artifact import Detector

    assert build().SerializeToString() == OUT.read_bytes(), "stale: python -m bench.null_artifact"
    null, demo = Detector(str(OUT), providers=["cpu"]), Detector(str(DEMO), providers=["cpu"])
    assert null.info.name == "null"
    assert (null.info.classes, null.info.input_size, null.info.max_detections) == (
        demo.info.classes, demo.info.input_size, demo.info.max_detections
    )  # fmt: skip
    images = np.zeros((5, *demo.info.input_size, 3), np.uint8)
    found = null.detect(images)
    assert len(found) == 5 and all(len(d.scores) == DETECTIONS for d in found)
    assert all((d.boxes == found[0].boxes).all() and (d.labels == found[0].labels).all() for d in found)


@pytest.mark.slow
def test_bench_frontend_counts_cpu_by_thread():
    done = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "frontend", "--runs", "1", "--seconds", "1", "--clients", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    (run,) = report["runs"]
    assert set(run["detect"]["statuses"]) == {"200"} and set(run["bare"]["statuses"]) == {"200"}
    assert "503" in run["refusal"]["statuses"] and set(run["bare_refusal"]["statuses"]) == {"503"}
    detect = report["median"]["detect"]
    # Each kind of thread was found: the event loop, and the named decode and inference threads.
    assert detect["event_loop"] > 0 and detect["decoding"] > 0 and detect["inference"] > 0
    assert report["median"]["bare"]["event_loop"] > 0


def test_every_benchmark_module_is_a_command_or_a_part_of_one():
    """No lab script that no command runs: each module of bench/ is an ``ssd bench`` command or
    serves them (the load generator, the servers, the report's machine and plots)."""
    from bench import cli

    commands = {module for module, _ in {**cli.SERVING, **cli.TORCH}.values()} | {"bench.convergence"}
    parts = {"bench.__init__", "bench.cli", "bench.loadgen", "bench.machine", "bench.plots",
             "bench.server", "bench.workload", "bench.null_artifact"}  # fmt: skip
    modules = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")}
    assert modules - commands - parts == set()
    assert commands <= modules


def test_bench_tiles_builds_its_set_and_compares_the_three_ways(tmp_path, monkeypatch):
    """One canvas: the set as its recipe says (1920x1080, small and large shapes, COCO
    annotations), and each way's recall by size, mAP@0.5 and speed; SAHI around our artifact
    where the peers group has it."""
    import json

    from PIL import Image

    from bench import tiles

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # whatever SAHI does
    guard = Image.MAX_IMAGE_PIXELS
    out = tmp_path / "tiles"
    assert tiles.main(["--images", "1", "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    records = json.loads((out / "instances.json").read_text())
    assert records["images"][0]["width"] == 1920 and report["objects"] == len(records["annotations"]) >= 20
    sides = [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in records["annotations"]]
    assert min(sides) < 40 and max(sides) > 200
    ways = report["ways"]
    assert {"untiled", "tiled"} <= set(ways)
    assert ("sahi" in ways) == (report["sahi_skipped"] is None)
    for way in ways.values():
        assert sum(b["objects"] for b in way["recall_by_size"].values()) == report["objects"]
        assert 0 <= way["map50"] <= 1 and way["images_per_s"] > 0
    # SAHI turns Pillow's bomb guard off; the bench puts it back (raised, not off, by our decoding).
    assert Image.MAX_IMAGE_PIXELS is not None and guard <= Image.MAX_IMAGE_PIXELS
