"""``ssd bench frontend``: the CPU the service's front end spends per request, by thread.

The null artifact (models/null.onnx: the demo model's interface, constant outputs, no work) so
that inference costs next to nothing, and a 64x48 JPEG so that decoding costs little: what is
left is the front end. CLIENTS closed-loop clients for SECONDS; each server thread's CPU time
(``/proc/PID/task/TID/stat``) over the run, divided by the requests answered, by the thread's
kind (its OS name, service/threadnames.py): the event loop (the main thread), decoding,
inference (the inference thread and ONNX Runtime's pool), the log's writer and other. Four
loads, the first two each on a server of its own:

- ``detect``: ``POST /detect`` answered 200;
- ``refusal``: the same with ``timeout_ms=1``, refused at the door (503, which closes the
  connection: the clients reconnect, and the accept is in the count);
- ``bare``: a Starlette endpoint on the same uvicorn (the same loop and HTTP implementation),
  reading the body and answering the same JSON: the floor of the stack;
- ``bare_refusal``: the same server answering a 503 that closes the connection, unread body
  and all: the floor of a refusal (the accept and the close are most of it).

Median of RUNS runs, each figure in CPU milliseconds per answered request.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import loadgen
from .peers import PEERS
from .server import Server, ServerSettings, free_port, get

ROOT = Path(__file__).resolve().parents[1]
NULL = ROOT / "models" / "null.onnx"
LOADS = ("detect", "refusal", "bare", "bare_refusal")
KINDS = ("event_loop", "decoding", "inference", "log", "other")
TICKS = os.sysconf("SC_CLK_TCK")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(NULL), help="default: the null artifact")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=3)


def tiny_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(out, "JPEG", quality=90)
    return out.getvalue()


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: (its OS name, CPU seconds so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)  # utime + stime
    return out


def kind(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event_loop"
    if name == "ssd-decode":
        return "decoding"
    if name in ("ssd-inference", "ssd-onnxruntime"):
        return "inference"
    if name == "ssd-log":
        return "log"
    return "other"


def measure(pid: int, port: int, request: bytes, clients: int, seconds: float) -> dict[str, object]:
    before = thread_cpu(pid)
    result = loadgen.run(loadgen.Load(port, (request,), seconds, clients=clients))
    after = thread_cpu(pid)
    by_kind = dict.fromkeys(KINDS, 0.0)
    for tid, (name, cpu) in after.items():
        by_kind[kind(pid, tid, name)] += cpu - before.get(tid, (name, 0.0))[1]
    statuses = {str(s): int((result.status == s).sum()) for s in sorted(set(result.status.tolist()))}
    answered = max(1, int((result.status != loadgen.CONNECTION_FAILED).sum()))
    per = {k: round(v * 1000 / answered, 3) for k, v in by_kind.items()}
    per["total"] = round(sum(by_kind.values()) * 1000 / answered, 3)
    return {"statuses": statuses, "requests_per_s": round(answered / result.elapsed, 1), "cpu_ms": per}


BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

ANSWER = {answer!r}
REFUSAL = b'{{"error": {{"code": "overloaded", "message": "refused"}}}}'

async def detect(request):
    await request.body()
    return Response(ANSWER, media_type="application/json")

async def refuse(request):
    return Response(REFUSAL, 503, {{"Retry-After": "1", "Connection": "close"}}, "application/json")

app = Starlette(routes=[
    Route("/detect", detect, methods=["POST"]), Route("/refuse", refuse, methods=["POST"])
])
"""


def bare_server(port: int, answer: bytes) -> subprocess.Popen:
    """uvicorn as ``ssd serve`` runs it (its default loop and HTTP implementation, no access
    log), serving the bare endpoint."""
    code = BARE_APP.format(answer=answer) + (
        "import uvicorn\n"
        f"uvicorn.run(app, host='127.0.0.1', port={port}, access_log=False, log_level='warning')\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


def _http(path: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def one_run(args: argparse.Namespace, image: bytes) -> dict[str, dict]:
    out = {}
    settings = ServerSettings()
    for load, path in (("detect", "/detect"), ("refusal", "/detect?timeout_ms=1")):
        with Server(PEERS["ours"], Path(args.model), settings) as server:
            assert server.process is not None
            request = _http(path, server.port, image)
            if load == "detect":
                warm = loadgen.run(loadgen.Load(server.port, (request,), 1.0, clients=2))
                assert (warm.status == 200).any(), "the service answered no /detect"
                detect_answer = _answer(server.port, image)
            out[load] = measure(server.process.pid, server.port, request, args.clients, args.seconds)
    port = free_port()
    bare = bare_server(port, detect_answer)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(f"http://127.0.0.1:{port}/detect")[0] in (200, 405):
                    break
            except OSError:
                if time.monotonic() > deadline or bare.poll() is not None:
                    raise RuntimeError("the bare endpoint did not start") from None
                time.sleep(0.2)
        out["bare"] = measure(bare.pid, port, _http("/detect", port, image), args.clients, args.seconds)
        refuse = _http("/refuse", port, image)
        out["bare_refusal"] = measure(bare.pid, port, refuse, args.clients, args.seconds)
    finally:
        bare.terminate()
        bare.wait(30)
    return out


def _answer(port: int, image: bytes) -> bytes:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/detect", data=image, headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def main(args: argparse.Namespace) -> int:
    image = tiny_jpeg()
    runs = [one_run(args, image) for _ in range(args.runs)]
    summary: dict[str, object] = {}
    for load in LOADS:
        summary[load] = {
            key: statistics.median(r[load]["cpu_ms"][key] for r in runs) for key in (*KINDS, "total")
        } | {"requests_per_s": statistics.median(r[load]["requests_per_s"] for r in runs)}
    bare = summary["bare"]["total"]  # type: ignore[index]
    ratios = {
        "detect_event_loop_over_bare": round(summary["detect"]["event_loop"] / bare, 2),  # type: ignore[index]
        "refusal_event_loop_over_bare": round(summary["refusal"]["event_loop"] / bare, 2),  # type: ignore[index]
        "refusal_event_loop_over_bare_refusal": round(
            summary["refusal"]["event_loop"] / summary["bare_refusal"]["total"],
            2,  # type: ignore[index]
        ),
    }
    print(json.dumps({"command": "ssd bench frontend " + " ".join(sys.argv[3:]), "clients": args.clients,
                      "seconds": args.seconds, "model": args.model, "median": summary, "ratios": ratios,
                      "runs": runs}, indent=1))  # fmt: skip
    return 0
