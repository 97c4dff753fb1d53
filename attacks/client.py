"""Talking to the server under attack: httpx for well-formed requests, raw sockets for malformed
ones, tritonclient's wire format for the Open Inference Protocol (REST and gRPC)."""

from __future__ import annotations

import io
import json
import re
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from attacks.payloads import small_jpeg

BOUNDARY = "hostile-boundary-7f3a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass
class Target:
    """The server under attack. ``pid``: its process here (None: /proc checks are skipped);
    ``model_path``: the artifact file it serves (the reload cases swap it); ``photos``: real JPEGs."""

    base_url: str
    pid: int | None = None
    admin_token: str | None = None
    model_path: Path | None = None
    photos: Sequence[bytes] = ()
    grpc_address: str | None = None  # host:port of its Open Inference Protocol gRPC service

    def normal_image(self) -> bytes:
        return self.photos[0] if self.photos else small_jpeg()

    def model_name(self) -> str:
        """The served name of its default model (what the OIP routes are addressed by)."""
        return json.loads(request(self, "GET", "/model").body)["name"]


@dataclass
class Answer:
    """What came back from one attack. ``status`` None: no answer (given up on, or not read)."""

    status: int | None
    body: bytes = b""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # the case's own checks that failed
    skipped: str | None = None
    bodiless: bool = False  # an answer to HEAD: no JSON to check

    @property
    def error(self) -> object:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        error = self.error
        if isinstance(error, dict) and isinstance(error.get("error"), dict):
            code = error["error"].get("code")
            return code if isinstance(code, str) else None
        return None


def post(
    target: Target,
    content: bytes,
    content_type: str,
    path: str = "/detect",
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> Answer:
    import httpx  # the dev install's; imported here so that `ssd bench` parses without it

    started = time.perf_counter()
    try:
        response = httpx.post(
            target.base_url + path,
            content=content,
            headers={"content-type": content_type, **(headers or {})},
            timeout=timeout,
        )
    except httpx.TimeoutException:
        return Answer(None, seconds=time.perf_counter() - started)
    except httpx.TransportError as exc:
        return Answer(None, seconds=time.perf_counter() - started, problems=[f"transport error: {exc!r}"])
    return Answer(response.status_code, response.content, time.perf_counter() - started)


def request(target: Target, method: str, path: str, timeout: float = 10.0) -> Answer:
    import httpx

    started = time.perf_counter()
    try:
        response = httpx.request(method, target.base_url + path, timeout=timeout)
    except httpx.TransportError as exc:
        return Answer(None, seconds=time.perf_counter() - started, problems=[f"transport error: {exc!r}"])
    return Answer(
        response.status_code, response.content, time.perf_counter() - started, bodiless=method == "HEAD"
    )


def ready(target: Target, timeout: float = 10.0) -> bool:
    return request(target, "GET", "/readyz", timeout).status == 200


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def head(base_url: str, content_type: str, length: int, path: str = "/detect") -> bytes:
    host, port = _address(base_url)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode("ascii")


def _parse_response(data: bytes) -> tuple[int | None, bytes]:
    top, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", top)
    return (int(match.group(1)), body) if match else (None, b"")


def _complete(data: bytes) -> bool:
    top, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", top)
    return length is not None and len(body) >= int(length.group(1))


def raw_exchange(
    base_url: str, first: bytes, body: bytes = b"", timeout: float = 10.0, read: bool = True
) -> Answer:
    """Sends ``first`` then ``body`` (in chunks, stopping as soon as the server answers or stops
    reading: an early 413 must not be lost behind a blocked send), then reads one answer. With
    ``read`` False the socket is closed right after sending: a client that vanishes mid-upload."""
    started = time.perf_counter()
    with socket.create_connection(_address(base_url), timeout=timeout) as sock:
        try:
            sock.sendall(first)
            for offset in range(0, len(body), 64 * 1024):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed) before the body's end
                sock.sendall(body[offset : offset + 64 * 1024])
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        if not read:
            return Answer(None, seconds=time.perf_counter() - started)
        data = b""
        deadline = time.monotonic() + timeout
        try:
            while not _complete(data) and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    seconds = time.perf_counter() - started
    status, answer = _parse_response(data)
    if status is None:
        return Answer(None, seconds=seconds, problems=[f"no answer within {timeout:.0f} s: {data[:200]!r}"])
    return Answer(status, answer, seconds)


def multipart(parts: Sequence[tuple[str, str | None, str | None, bytes]], closed: bool = True) -> bytes:
    """A multipart/form-data body of (name, filename, content type, data) parts, written by hand
    so that malformed ones (a text field named file, no closing boundary) can be made too."""
    out = io.BytesIO()
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode())
        if content_type:
            out.write(f"Content-Type: {content_type}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    if closed:
        out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def scrape(base_url: str) -> str:
    import httpx

    return httpx.get(base_url + "/metrics", timeout=10).text


def in_flight(base_url: str) -> float:
    """``detector_requests_in_flight``, this scrape included."""
    found = re.search(r"^detector_requests_in_flight (\S+)$", scrape(base_url), re.M)
    return float(found.group(1)) if found else 0.0


def request_counts(base_url: str) -> dict[str, float]:
    """``detector_requests_total`` by status code, summed over routes, from /metrics."""
    text = scrape(base_url)
    counts: dict[str, float] = {}
    for labels, value in re.findall(r"^detector_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        code = re.search(r'code="([^"]*)"', labels)
        if code:
            counts[code.group(1)] = counts.get(code.group(1), 0.0) + float(value)
    return counts


def oip_post(target: Target, image: bytes, timeout: float = 30.0) -> Answer:
    """One image through the OIP over REST: a binary BYTES [1] tensor, as tritonclient sends it."""
    header = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": len(image) + 4}}]}
    ).encode()  # fmt: skip
    return post(
        target,
        header + len(image).to_bytes(4, "little") + image,
        "application/octet-stream",
        path=f"/v2/models/{target.model_name()}/infer",
        timeout=timeout,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


GRPC_AS_HTTP = {"OK": 200, "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
                "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}  # fmt: skip


def oip_grpc(target: Target, image: bytes, timeout: float = 30.0) -> Answer:
    """One image through the OIP's gRPC ModelInfer; its status as the HTTP status of the same case
    (500 for any code the service should never answer)."""
    import grpc

    from service.oip.proto import open_inference_grpc_pb2 as pb
    from service.oip.proto import open_inference_grpc_pb2_grpc as pb_grpc

    if target.grpc_address is None:
        return Answer(None, skipped="the server has no gRPC address")
    request = pb.ModelInferRequest(model_name=target.model_name())
    request.inputs.add(name="images", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    started = time.perf_counter()
    with grpc.insecure_channel(target.grpc_address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
            return Answer(200, b"{}", time.perf_counter() - started)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - started >= timeout:
                return Answer(None, seconds=time.perf_counter() - started)  # our own give-up
            body = json.dumps({"error": exc.details()}).encode()  # type: ignore[attr-defined]
            return Answer(GRPC_AS_HTTP.get(code.name, 500), body, time.perf_counter() - started)
