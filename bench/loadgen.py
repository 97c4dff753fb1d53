"""The load generator: closed loop (N clients back to back) or open loop (a fixed arrival rate).

It runs in a process of its own and speaks HTTP/1.1 over asyncio streams, with every request's
bytes built once beforehand: a few percent of a core at the rates a 2-core machine serves, where an
HTTP client library would take a good share of the CPU the server under test needs.

Open loop: arrivals at fixed intervals whatever the server does, each on an idle keep-alive
connection (a new one when none is idle), and latency counted from the scheduled arrival, so that
a server that stalls is charged for the requests it kept waiting (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from dataclasses import dataclass, field

import numpy as np

CONNECTION_FAILED = 0  # status recorded when the connection broke or could not be opened


@dataclass(frozen=True)
class Load:
    """What to send, where, for how long, and at what pace (``clients`` or ``rate``, not both)."""

    port: int
    requests: tuple[bytes, ...]  # complete HTTP/1.1 requests, sent in turn
    seconds: float
    clients: int | None = None  # closed loop: this many connections, each sending back to back
    rate: float | None = None  # open loop: requests per second
    host: str = "127.0.0.1"
    max_connections: int = 2048  # open loop: arrivals beyond this many in flight are not sent
    # gRPC: ``requests`` are serialized messages for this method ("/package.Service/Method"),
    # each client on a channel (an HTTP/2 connection) of its own; statuses as HTTP's.
    grpc_method: str | None = None

    def __post_init__(self) -> None:
        if (self.clients is None) == (self.rate is None):
            raise ValueError("give clients (closed loop) or rate (open loop), not both")
        if not self.requests:
            raise ValueError("no requests to send")


@dataclass
class Result:
    """Every request sent: when (seconds from the start), how long it took, and its status."""

    started: np.ndarray  # float64 [N]
    latency: np.ndarray  # float64 [N], seconds
    status: np.ndarray  # int32 [N]; 0: the connection failed
    elapsed: float
    not_sent: int = 0  # open loop: arrivals dropped because max_connections were all busy
    extra: dict[str, float] = field(default_factory=dict)


_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")
_CHUNKED = re.compile(rb"(?im)^transfer-encoding: *chunked")
_CLOSE = re.compile(rb"(?im)^connection: *close")


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one response; returns its status and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = _LENGTH.search(head)
    if length:
        await reader.readexactly(int(length.group(1)))
    elif _CHUNKED.search(head):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, _CLOSE.search(head) is not None


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _exchange(
    load: Load, connection: Connection | None, request: bytes
) -> tuple[int, Connection | None]:
    """One request and its answer on ``connection`` (opened when None): the status and the
    connection to reuse, or CONNECTION_FAILED and None when it broke."""
    reused = connection is not None
    try:
        if connection is None:
            connection = await asyncio.open_connection(load.host, load.port)
        reader, writer = connection
        writer.write(request)
        await writer.drain()
        status, closing = await _response(reader)
        if closing:  # as HTTP clients do: the next request goes on a new connection
            writer.close()
            return status, None
        return status, connection
    except asyncio.IncompleteReadError as exc:
        connection[1].close()
        if reused and not exc.partial:
            # The server closed an idle keep-alive connection (uvicorn: after 5 s) before this
            # request reached it: nothing was processed, so send it again on a new connection,
            # as HTTP clients do.
            return await _exchange(load, None, request)
        return CONNECTION_FAILED, None
    except (OSError, ValueError):
        if connection is not None:
            connection[1].close()
        return CONNECTION_FAILED, None


def grpc_status(code: object) -> int:
    """A gRPC status as the HTTP status the service answers for the same case."""
    import grpc

    return {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.CANCELLED: 499,
    }.get(code, 500)  # type: ignore[call-overload]


async def _grpc_closed_loop(load: Load, record: _Recorder, origin: float) -> None:
    import grpc

    stop_at = origin + load.seconds
    count = len(load.requests)
    # Bytes in, bytes out: the messages are serialized once beforehand, as the HTTP requests are.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(f"{load.host}:{load.port}", options=options) as channel:
            call = channel.unary_unary(load.grpc_method)
            sent = index
            while time.perf_counter() < stop_at:
                request = load.requests[sent % count]
                sent += load.clients or 1
                started = time.perf_counter()
                try:
                    await call(request)
                    status = 200
                except grpc.aio.AioRpcError as exc:
                    status = grpc_status(exc.code())
                record.add(started - origin, time.perf_counter() - started, status)

    await asyncio.gather(*(client(i) for i in range(load.clients or 0)))


class _Recorder:
    def __init__(self) -> None:
        self.started: list[float] = []
        self.latency: list[float] = []
        self.status: list[int] = []

    def add(self, started: float, latency: float, status: int) -> None:
        self.started.append(started)
        self.latency.append(latency)
        self.status.append(status)


async def _closed_loop(load: Load, record: _Recorder, origin: float) -> None:
    stop_at = origin + load.seconds
    count = len(load.requests)

    async def client(index: int) -> None:
        connection = None
        sent = index
        while time.perf_counter() < stop_at:
            request = load.requests[sent % count]
            sent += load.clients or 1
            started = time.perf_counter()
            status, connection = await _exchange(load, connection, request)
            if status == CONNECTION_FAILED:
                await asyncio.sleep(0.05)  # a refused connection must not spin
            record.add(started - origin, time.perf_counter() - started, status)
        if connection is not None:
            connection[1].close()

    await asyncio.gather(*(client(i) for i in range(load.clients or 0)))


async def _open_loop(load: Load, record: _Recorder, origin: float) -> int:
    idle: list[Connection] = []
    in_flight: set[asyncio.Task] = set()
    interval = 1.0 / (load.rate or 1.0)
    not_sent = 0

    async def one(request: bytes, due: float) -> None:
        status, connection = await _exchange(load, idle.pop() if idle else None, request)
        if connection is not None:
            idle.append(connection)
        record.add(due - origin, time.perf_counter() - due, status)

    arrivals = int(load.seconds * (load.rate or 0))
    for n in range(arrivals):
        due = origin + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= load.max_connections:
            not_sent += 1
            continue
        task = asyncio.create_task(one(load.requests[n % len(load.requests)], due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    for _, writer in idle:
        writer.close()
    return not_sent


def _drive(load: Load) -> Result:
    record = _Recorder()

    async def main() -> tuple[float, int]:
        origin = time.perf_counter()
        if load.grpc_method is not None:
            if load.clients is None:
                raise ValueError("gRPC load is closed loop only")
            await _grpc_closed_loop(load, record, origin)
            not_sent = 0
        elif load.clients is not None:
            await _closed_loop(load, record, origin)
            not_sent = 0
        else:
            not_sent = await _open_loop(load, record, origin)
        return time.perf_counter() - origin, not_sent

    cpu = time.process_time()
    elapsed, not_sent = asyncio.run(main())
    requests = max(1, len(record.status))
    return Result(
        started=np.asarray(record.started, dtype=np.float64),
        latency=np.asarray(record.latency, dtype=np.float64),
        status=np.asarray(record.status, dtype=np.int32),
        elapsed=elapsed,
        not_sent=not_sent,
        # The load generator's own CPU per request: on a small machine it is taken from the server.
        extra={"client_cpu_ms_per_request": round((time.process_time() - cpu) * 1000 / requests, 3)},
    )


def _child(load: Load, out: multiprocessing.Queue) -> None:
    out.put(_drive(load))


def run(load: Load) -> Result:
    """Drives ``load`` from a separate process and returns what it recorded."""
    context = multiprocessing.get_context("spawn")  # no copy of the parent's threads or sessions
    queue = context.Queue()
    process = context.Process(target=_child, args=(load, queue), daemon=True)
    process.start()
    try:
        result = queue.get(timeout=load.seconds + 300)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return result


def summarize(result: Result, images_per_request: int = 1) -> dict[str, object]:
    """Throughput and latency percentiles of the successful requests; the rest counted by status."""
    ok = result.status == 200
    latency = np.sort(result.latency[ok])
    q = np.quantile(latency, [0.5, 0.9, 0.99]) * 1000 if latency.size else [float("nan")] * 3
    statuses, counts = np.unique(result.status[~ok], return_counts=True)
    rejected = result.latency[result.status == 503]
    summary: dict[str, object] = {
        "requests": int(result.status.size),
        "ok": int(ok.sum()),
        "images_per_s": round(float(ok.sum()) * images_per_request / result.elapsed, 1),
        "p50_ms": round(float(q[0]), 1),
        "p90_ms": round(float(q[1]), 1),
        "p99_ms": round(float(q[2]), 1),
        "max_ms": round(float(latency[-1]) * 1000, 1) if latency.size else None,
        "errors": {str(int(s)): int(c) for s, c in zip(statuses, counts, strict=True)},
    }
    if rejected.size:
        summary["rejected_p99_ms"] = round(float(np.quantile(rejected, 0.99)) * 1000, 1)
    if result.not_sent:
        summary["not_sent"] = result.not_sent
    summary.update(result.extra)
    return summary
