"""``ssd bench hostile``: what hostile clients send, and what a live ``ssd serve`` must answer.

One home for the attack cases, shared by tests/test_hostile.py (one test per case) and this
benchmark (every case at once, several attack threads, plus a seeded mutation fuzzer, while one
client keeps sending normal requests). The cases follow the README ("Serve": images,
the error table, slow and vanishing clients, reloads): formats outside the decoding allow-list
(EPS must never reach Ghostscript), decompression bombs, corrupt and truncated files, clients
that disconnect mid-upload, oversize bodies and multipart abuse, admin routes, a tampered
artifact, and fuzzed real photos.

Each ``Case`` performs its attack against a ``Target`` (the server's URL, and where the server
runs here, its pid for /proc checks) and says what must come back: allowed statuses (``None``:
no answer, e.g. the client gave up on purpose) and, where the contract fixes one, the JSON error
code. Every non-2xx answer must be ``{"error": {"code": str, "message": str}}``.

    ssd bench hostile [--model models/demo.onnx] [--fuzz 300] [--threads 4] [--json OUT]

prints the server's peak resident memory (goal: under 1 GB), the p50 of normal /detect requests
during the attacks against unloaded (goal: within 2x), and every case whose outcome was wrong;
exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos" / "val2017"  # real photos, chosen by licence (photos/README.md)
NO_PHOTOS = f"needs JPEG photos, none here: {PHOTOS}"

MB = 1024 * 1024
RSS_LIMIT = 1024 * MB  # the server's peak resident memory, whatever the clients send
BOUNDARY = "hostile-boundary-7f3a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
FUZZ_ALLOWED = frozenset({200, 400, 413, 415})

# ---------------------------------------------------------------------------------------------
# What the server process does, read from /proc (Linux): memory and the processes it started.


def proc_status(pid: int, name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live process whose parent is ``pid``. Scanning /proc, not
    /proc/PID/task/*/children, which needs a kernel option some machines lack."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the parent pid follows the last ")".
        name, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append((int(entry), name))
    return found


class Watch:
    """While the block runs, samples the server's resident memory and the processes it starts.

    A decoder that shells out (Pillow's EPS plugin runs ``gs``) may start and end a child within
    one request, so children are sampled during the attack, not only looked for afterwards."""

    def __init__(self, pid: int | None, every: float = 0.005) -> None:
        self.pid, self.every = pid, every
        self.peak_rss = proc_status(pid, "VmRSS") if pid else None
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        assert self.pid is not None
        rss = proc_status(self.pid, "VmRSS")
        if rss is not None and (self.peak_rss is None or rss > self.peak_rss):
            self.peak_rss = rss
        for child, name in children(self.pid):
            self.seen.setdefault(child, name)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> Watch:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.pid:
            self._stop.set()
            self._thread.join()
            self._sample()

    def child_problems(self) -> list[str]:
        """What the server started, if anything. A Ghostscript still running (a PostScript loop
        spins for ever) is killed by its pid, or it would outlive the server."""
        if not self.seen:
            return []
        for child, name in self.seen.items():
            if name.startswith("gs") and (child, name) in children(self.pid or -1):
                os.kill(child, signal.SIGKILL)
        listed = ", ".join(f"{name} (pid {child})" for child, name in sorted(self.seen.items()))
        return [f"the server started child processes: {listed}"]


# ---------------------------------------------------------------------------------------------
# Talking to the server: httpx for well-formed requests, raw sockets for malformed ones.


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


# ---------------------------------------------------------------------------------------------
# Payloads. Built on first use and cached: collecting the tests must not build them.


def png_chunk(kind: bytes, data: bytes, fix_crc: bool = True) -> bytes:
    crc = zlib.crc32(kind + data) if fix_crc else 0
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` but whose IDAT holds almost nothing:
    what a decompression bomb's header looks like, for a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


@functools.cache
def grey16_png(side: int = 6300) -> bytes:
    """A valid 16-bit grey PNG of ``side``² pixels (39.7 M, under the 40 M limit) in about 80 KB:
    the first row a ramp (Sub filter: every pixel 10 above its left neighbour), every other row
    equal to the one above (Up filter: all zeros), so deflate reaches its best ratio. Written by
    hand, streaming, instead of with Pillow: no 80 MB array on the attacking side."""
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(b"\x01" + b"\x00\x0a" * side)]
    zero_row = b"\x02" + bytes(2 * side)
    chunks += [compressor.compress(zero_row) for _ in range(side - 1)]
    chunks.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(chunks))
        + png_chunk(b"IEND", b"")
    )


def _scene(size: tuple[int, int] = (64, 48)) -> Any:
    """A small RGB image with some structure (a gradient), for encoders that need one."""
    import numpy as np
    from PIL import Image

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


@functools.cache
def pillow_bytes(fmt: str, mode: str = "RGB") -> bytes:
    """A small image as Pillow writes ``fmt``: real files of formats Pillow would happily decode,
    which the allow-list must refuse anyway."""
    out = io.BytesIO()
    _scene().convert(mode).save(out, fmt)
    return out.getvalue()


@functools.cache
def small_jpeg() -> bytes:
    return pillow_bytes("JPEG")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its first SOF segment declaring ``width`` x ``height``."""
    sof = _jpeg_sof(data)
    if sof is None:
        raise ValueError("no SOF marker")
    out = bytearray(data)
    out[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)
EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n{} loop\n%%EOF\n"


def eps_dos_binary(postscript: bytes = EPS) -> bytes:
    """The DOS EPS binary header (C5 D0 D3 C6, then offsets and lengths of the PostScript, WMF
    and TIFF sections), in front of the PostScript."""
    return b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(postscript), 0, 0, 0, 0, 0xFFFF) + postscript


def ico_wrapping(png: bytes) -> bytes:
    """An ICO with one directory entry (256x256 as ICO counts, 32 bits) pointing at ``png``."""
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return directory + png


def psd(width: int = 10, height: int = 10) -> bytes:
    """A valid uncompressed 8-bit RGB Photoshop file (Pillow decodes it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: empty
    planes = bytes((i * 7) % 256 for i in range(3 * width * height))
    return header + sections + struct.pack(">H", 0) + planes


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>\n'
)
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x08mdat"

# (name, payload) of known formats outside the allow-list. Those named by the contract, and
# those with an unmistakable signature, must be 415; for the rest (one- or two-byte magic, TGA
# with none at the start) whether the service "knows" them is its sniffer's call, so 400 is as
# good as 415: what matters is that no decoder outside the allow-list ever runs (never a 200).
STRICT = frozenset({415})
LENIENT = frozenset({400, 415})
UNSUPPORTED: tuple[tuple[str, Callable[[], bytes], frozenset[int]], ...] = (
    ("pdf", lambda: pillow_bytes("PDF"), STRICT),
    ("ico-png-16000", lambda: ico_wrapping(png_declaring(16000, 16000, 8, 6)), STRICT),
    ("psd", psd, STRICT),
    ("svg", lambda: SVG, STRICT),
    ("heic", lambda: HEIC, STRICT),
    ("avif", lambda: pillow_bytes("AVIF"), STRICT),
    ("jpeg2000", lambda: pillow_bytes("JPEG2000"), STRICT),
    ("ppm", lambda: pillow_bytes("PPM"), LENIENT),
    ("qoi", lambda: pillow_bytes("QOI"), LENIENT),
    ("pcx", lambda: pillow_bytes("PCX"), LENIENT),
    ("tga", lambda: pillow_bytes("TGA"), LENIENT),
    ("sgi", lambda: pillow_bytes("SGI"), LENIENT),
    ("dds", lambda: pillow_bytes("DDS"), LENIENT),
)


def photos(folder: Path = PHOTOS) -> list[bytes]:
    """The JPEGs of ``folder`` as bytes, sorted by name ([] when the folder is absent)."""
    return [f.read_bytes() for f in sorted(folder.glob("*.jpg"))] if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Cases.


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


Attack = Callable[[Target], Answer]


@dataclass(frozen=True)
class Case:
    """One attack and what must come back. ``exclusive``: its checks read shared figures (request
    counters, resident memory, the served artifact, timings), so it runs with no other attack."""

    name: str
    attack: Attack
    expect: frozenset[int | None]
    code: str | None = None
    exclusive: bool = False
    max_seconds: float | None = None
    oip: bool = False  # asked through the Open Inference Protocol: its errors are {"error": "..."}

    def check(self, answer: Answer) -> list[str]:
        if answer.skipped:
            return []
        problems = []
        shown = answer.body[:300].decode("utf-8", "replace")
        if answer.status not in self.expect:
            allowed = sorted(self.expect, key=lambda s: -1 if s is None else s)
            problems.append(f"status {answer.status}, expected one of {allowed}: {shown}")
        if self.oip and answer.status is not None and not 200 <= answer.status < 300:
            error = answer.error
            if not (isinstance(error, dict) and set(error) == {"error"} and isinstance(error["error"], str)):
                problems.append(f'not the protocol\'s {{"error": "..."}} answer: {shown}')
        elif answer.status is not None and not 200 <= answer.status < 300 and not answer.bodiless:
            error = answer.error
            inner = error.get("error") if isinstance(error, dict) else None
            if not (
                isinstance(inner, dict)
                and isinstance(inner.get("code"), str)
                and isinstance(inner.get("message"), str)
            ):
                problems.append(f'not a JSON {{"error": {{"code", "message"}}}} answer: {shown}')
        if self.code is not None and answer.status in self.expect and answer.code != self.code:
            problems.append(f"error code {answer.code!r}, expected {self.code!r}: {shown}")
        if self.max_seconds is not None and answer.seconds > self.max_seconds:
            problems.append(f"took {answer.seconds:.2f} s, more than {self.max_seconds} s")
        return problems + answer.problems


@dataclass
class Result:
    name: str
    status: int | None
    code: str | None
    ok: bool
    seconds: float
    problems: list[str]
    skipped: str | None = None

    def describe(self) -> str:
        return f"{self.name}: status {self.status}, code {self.code!r}, {self.seconds:.2f} s: " + (
            "; ".join(self.problems) or "ok"
        )


def run_case(case: Case, target: Target) -> Result:
    started = time.perf_counter()
    try:
        answer = case.attack(target)
    except Exception as exc:  # a broken attack is reported as such, not as the server's fault
        seconds = time.perf_counter() - started
        return Result(case.name, None, None, False, seconds, [f"the attack itself failed: {exc!r}"])
    problems = case.check(answer)
    return Result(
        case.name,
        answer.status,
        answer.code,
        not problems,
        round(answer.seconds, 3),
        problems,
        answer.skipped,
    )


def _image(payload: Callable[[], bytes], content_type: str, timeout: float = 30.0) -> Attack:
    return lambda target: post(target, payload(), content_type, timeout=timeout)


def _file(payload: Callable[[], bytes], filename: str, content_type: str = "image/png") -> Attack:
    return lambda target: post(target, multipart([("file", filename, content_type, payload())]), MULTIPART)


def _eps(payload: bytes) -> Attack:
    def attack(target: Target) -> Answer:
        with Watch(target.pid, every=0.002) as watch:
            # 5 s: long enough to see a Ghostscript loop hang the request, short enough to go on.
            answer = post(target, payload, "image/jpeg", timeout=5.0)
        answer.problems += watch.child_problems()
        return answer

    return attack


def _eight_grey16(target: Target) -> Answer:
    """Eight 40-megapixel 16-bit images, a client that gives up after 2 s: the server must stay
    ready, and a normal request right after must not wait behind the abandoned decoding for long."""
    body = multipart([("file", f"grey16-{i}.png", "image/png", grey16_png()) for i in range(8)])
    # The most in flight over a moment: a normal client beside the attacks (the benchmark's) is
    # in flight nearly all the time, and must not be taken for the abandoned request.
    busy = 0.0
    for _ in range(5):
        busy = max(busy, in_flight(target.base_url))
        time.sleep(0.01)
    answer = post(target, body, MULTIPART, timeout=2.0)
    if not ready(target):
        answer.problems.append("/readyz is not 200 after the client gave up")
    normal = post(target, target.normal_image(), "image/jpeg", timeout=30.0)
    if normal.status != 200 or normal.seconds > 5.0:
        answer.problems.append(
            f"a normal JPEG right after: status {normal.status} in {normal.seconds:.2f} s "
            f"(expected 200 within 5 s): {normal.body[:200]!r}"
        )
    # The abandoned request may hold the server no longer than its deadline (10 s by default),
    # plus a margin; waiting for it here also keeps it out of the request counts later cases read.
    settled = time.monotonic() + 15.0 - answer.seconds
    while in_flight(target.base_url) > busy and time.monotonic() < settled:
        time.sleep(0.1)
    if in_flight(target.base_url) > busy:
        answer.problems.append("the abandoned request was still in flight 15 s after it was sent")
    return answer


def _truncated_photo(target: Target) -> Answer:
    if not target.photos:
        return Answer(None, skipped=NO_PHOTOS)
    photo = target.photos[0]
    return post(target, photo[: len(photo) // 2], "image/jpeg")


def _random_bytes() -> bytes:
    # Seeded, and starting with bytes no image format begins with.
    return b"\x13\x37" + random.Random(1234).randbytes(4094)


def _disconnect(multipart_body: bool) -> Attack:
    """Headers announcing 100 000 bytes, ten of them, then the client is gone. No answer is read;
    the server must count it as 499 (a client's doing), not 500."""

    def attack(target: Target) -> Answer:
        before = request_counts(target.base_url)
        if multipart_body:
            opening = (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            first = head(target.base_url, MULTIPART, 100_000) + opening + small_jpeg()[:10]
        else:
            first = head(target.base_url, "image/jpeg", 100_000) + small_jpeg()[:10]
        answer = raw_exchange(target.base_url, first, read=False)
        deadline = time.monotonic() + 5.0
        after = before
        while time.monotonic() < deadline:
            after = request_counts(target.base_url)
            if any(after.get(c, 0.0) > before.get(c, 0.0) for c in ("499", "500")):
                break
            time.sleep(0.05)
        time.sleep(0.1)  # anything else this one request made the server count
        after = request_counts(target.base_url)
        if after.get("500", 0.0) != before.get("500", 0.0):
            answer.problems.append(
                f'detector_requests_total{{code="500"}} went from {before.get("500", 0.0):g} '
                f"to {after.get('500', 0.0):g}"
            )
        if after.get("499", 0.0) <= before.get("499", 0.0):
            answer.problems.append(
                f'detector_requests_total{{code="499"}} did not grow within 5 s (codes now: {after})'
            )
        return answer

    return attack


def _declared_30mb(target: Target) -> Answer:
    # Only the headers: a server that waits for the 30 MB before refusing never answers.
    return raw_exchange(target.base_url, head(target.base_url, "image/jpeg", 30_000_000), timeout=5.0)


def _part_25mb(target: Target) -> Answer:
    """One 25 MB part (over the 20 MB image limit): refused while streaming, so the server never
    holds it. The growth of its resident memory is sampled during the request."""
    part = small_jpeg() + bytes(25 * MB)
    body = multipart([("file", "big.jpg", "image/jpeg", part)])
    before = proc_status(target.pid, "VmRSS") if target.pid else None
    with Watch(target.pid) as watch:
        answer = raw_exchange(
            target.base_url, head(target.base_url, MULTIPART, len(body)), body, timeout=30.0
        )
    if before is not None and watch.peak_rss is not None and watch.peak_rss - before >= 25 * MB:
        answer.problems.append(
            f"the server's resident memory grew by {(watch.peak_rss - before) / MB:.0f} MB during the upload"
        )
    return answer


def _files(count: int) -> Attack:
    return lambda target: post(
        target, multipart([("file", f"{i}.jpg", "image/jpeg", small_jpeg()) for i in range(count)]), MULTIPART
    )


def _reload(token: Callable[[Target], str]) -> Attack:
    def attack(target: Target) -> Answer:
        if not target.admin_token:
            return Answer(None, skipped="the server was started without SSD_ADMIN_TOKEN")
        return post(target, b"", "application/json", "/model/reload", 120.0, {"authorization": token(target)})

    return attack


def _tampered_artifact(target: Target) -> Answer:
    """The served file replaced by a copy whose ``classes`` names one class while the graph has
    more; the reload must be refused and the previous model keep serving. The original is put
    back afterwards (and reloaded, if the tampered one was taken) so that later cases see a sane
    server."""
    if not target.admin_token or target.model_path is None:
        return Answer(None, skipped="needs SSD_ADMIN_TOKEN and the served artifact's path")
    try:
        import onnx
    except ImportError:
        return Answer(None, skipped="needs the onnx package (the training install)")
    served = target.model_path
    backup = served.with_name(served.name + ".original")
    tampered = served.with_name(served.name + ".tampered")
    shutil.copy2(served, backup)
    model = onnx.load(str(served))
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["only-one-name"])
    onnx.save(model, str(tampered))
    bearer = {"authorization": f"Bearer {target.admin_token}"}
    try:
        os.replace(tampered, served)
        answer = post(target, b"", "application/json", "/model/reload", 120.0, bearer)
        if not ready(target):
            answer.problems.append("/readyz is not 200 after the refused reload")
        normal = post(target, target.normal_image(), "image/jpeg")
        if normal.status != 200:
            answer.problems.append(f"a normal photo after it: {normal.status}: {normal.body[:200]!r}")
    finally:
        os.replace(backup, served)
        tampered.unlink(missing_ok=True)
    if answer.status == 200:
        restored = post(target, b"", "application/json", "/model/reload", 120.0, bearer)
        if restored.status != 200:
            answer.problems.append(f"reloading the original failed: {restored.status}")
    return answer


def _no_children(target: Target) -> Answer:
    found = children(target.pid) if target.pid else []
    problems = [f"the server has child processes: {found}"] if found else []
    return Answer(200, problems=problems, skipped=None if target.pid else "the server's pid is unknown")


def cases() -> list[Case]:
    """Every hostile case, in the order they run (payloads are built when a case runs)."""
    unsupported = "unsupported_media_type"
    out = [
        # 1. EPS under an allowed type: sniffed and refused, never handed to Ghostscript.
        Case("eps-as-jpeg", _eps(EPS), STRICT, unsupported, max_seconds=1.0),
        Case("eps-infinite-loop", _eps(EPS_LOOP), STRICT, unsupported, exclusive=True, max_seconds=1.0),
        Case("eps-dos-binary", _eps(eps_dos_binary()), STRICT, unsupported, max_seconds=1.0),
        Case("no-child-processes", _no_children, frozenset({200})),
    ]
    # 2. Known formats outside the allow-list, as a raw body and as a multipart file.
    for name, payload, allowed in UNSUPPORTED:
        code = unsupported if allowed == STRICT else None
        out.append(Case(f"{name}-as-png", _image(payload, "image/png"), allowed, code))
        out.append(Case(f"{name}-multipart", _file(payload, f"{name}.png"), allowed, code))
    out += [
        # 3. 16-bit images near the pixel limit: decoded within bounded memory.
        Case("grey16-6300", _image(grey16_png, "image/png", timeout=60.0), frozenset({200})),
        Case("grey16-6300-x8-client-gives-up", _eight_grey16, frozenset({None, 200, 503}), exclusive=True),
        # 4. Not images, broken images, bombs.
        Case("random-bytes", _image(_random_bytes, "image/jpeg"), frozenset({400}), "invalid_image"),
        Case("empty-body", _image(lambda: b"", "image/jpeg"), frozenset({400})),
        Case("png-0x0", _image(lambda: png_declaring(0, 0), "image/png"), frozenset({400}), "invalid_image"),
        Case("truncated-jpeg", _truncated_photo, frozenset({400}), "invalid_image"),
        Case(
            "png-50000x50000",
            _image(lambda: png_declaring(50000, 50000), "image/png"),
            frozenset({413}),
            "image_too_large",
        ),
        Case(
            "jpeg-sof-65000x65000",
            _image(lambda: jpeg_with_size(small_jpeg(), 65000, 65000), "image/jpeg"),
            frozenset({413}),
            "image_too_large",
        ),
        # 5. Clients that vanish mid-upload.
        Case("disconnect-mid-body", _disconnect(False), frozenset({None}), exclusive=True),
        Case("disconnect-mid-multipart", _disconnect(True), frozenset({None}), exclusive=True),
        # 6. Too many, too large, malformed multipart.
        Case("multipart-17-files", _files(17), frozenset({413}), "too_many_images"),
        Case("multipart-18-files", _files(18), frozenset({413}), "too_many_images"),
        Case("multipart-100-files", _files(100), frozenset({413}), "too_many_images"),
        Case("content-length-30mb-headers-only", _declared_30mb, frozenset({413}), max_seconds=2.0),
        Case("multipart-25mb-part", _part_25mb, frozenset({413}), exclusive=True),
        Case(
            "multipart-unclosed",
            lambda t: post(t, multipart([("file", "a.jpg", "image/jpeg", small_jpeg())], False), MULTIPART),
            frozenset({400}),
        ),
        Case(
            "multipart-no-file-part",
            lambda t: post(t, multipart([("image", "a.jpg", "image/jpeg", small_jpeg())]), MULTIPART),
            frozenset({422}),
            "invalid_parameters",
        ),
        Case(
            "multipart-file-is-text",
            lambda t: post(t, multipart([("file", None, None, b"not a file")]), MULTIPART),
            frozenset({422}),
            "invalid_parameters",
        ),
        # 7. Operational routes.
        Case("head-healthz", lambda t: request(t, "HEAD", "/healthz"), frozenset({200})),
        Case("head-index", lambda t: request(t, "HEAD", "/"), frozenset({200})),
        Case(
            "reload-lowercase-bearer",
            _reload(lambda t: f"bearer {t.admin_token}"),
            frozenset({200}),
            exclusive=True,
        ),
        Case(
            "reload-wrong-token",
            _reload(lambda t: f"Bearer not-{t.admin_token}"),
            frozenset({403}),
            "forbidden",
            exclusive=True,
        ),
        # 8. An artifact whose metadata contradicts its graph.
        Case(
            "reload-tampered-classes",
            _tampered_artifact,
            frozenset({422}),
            "invalid_artifact",
            exclusive=True,
        ),
    ]
    return out


# ---------------------------------------------------------------------------------------------
# The mutation fuzzer: real photos (and PNG and WebP re-encodings), damaged where decoders look.

MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI, EOI: no length field


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, length in bytes, marker) of each segment from SOI up to SOS (scan data excluded)."""
    out, i = [], 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        size = 2 if marker in _STANDALONE else 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        out.append((i, size, marker))
        if marker == 0xDA:
            break
        i += size
    return out


def _jpeg_sof(data: bytes) -> int | None:
    return next((offset for offset, _, marker in _jpeg_segments(data) if marker in _SOF), None)


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, whole length) of each chunk after the signature."""
    out, i = [], 8
    while i + 12 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        out.append((i, 12 + length))
        i += 12 + length
    return out


def _dimension(rng: random.Random, bits: int) -> int:
    """A width or height for a header of ``bits`` bits: an edge value or a random one."""
    edges = [0, 1, 2, 255, 4096, 8192, 32767, 65000, 65535]
    if bits > 16:
        edges += [2**31 - 1, 2**31, 2**32 - 1]
    return rng.choice(edges) if rng.random() < 0.6 else rng.randrange(min(2**bits, 100_000))


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    # Half of the time within the first 2 KB, where the headers are.
    span = min(len(out), 2048) if rng.random() < 0.5 else len(out)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _run_overwrite(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    start = rng.randrange(len(out))
    length = min(rng.randint(1, 256), len(out) - start)
    fill = rng.choice([b"\x00" * length, b"\xff" * length, rng.randbytes(length)])
    out[start : start + length] = fill
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(1, len(data))]


def _jpeg_sof_size(rng: random.Random, data: bytes) -> bytes:
    return jpeg_with_size(data, _dimension(rng, 16), _dimension(rng, 16))


def _jpeg_segment_edit(duplicate: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        segments = [s for s in _jpeg_segments(data) if s[2] != 0xD8]  # keep SOI
        offset, size, _ = rng.choice(segments)
        segment = data[offset : offset + size]
        if duplicate:
            return data[: offset + size] + segment + data[offset + size :]
        return data[:offset] + data[offset + size :]

    return mutate


def _png_ihdr_size(fix_crc: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        out = bytearray(data)
        out[16:24] = struct.pack(">II", _dimension(rng, 32), _dimension(rng, 32))
        if fix_crc:
            out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return bytes(out)

    return mutate


def _png_chunk_length(rng: random.Random, data: bytes) -> bytes:
    offset, whole = rng.choice(_png_chunks(data))
    value = rng.choice([0, 1, whole - 11, whole + 1, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
    return data[:offset] + struct.pack(">I", value) + data[offset + 4 :]


def _png_chunk_edit(duplicate: bool) -> Callable[[random.Random, bytes], bytes]:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        offset, whole = rng.choice(_png_chunks(data))
        chunk = data[offset : offset + whole]
        end = offset + whole
        return data[:end] + chunk + data[end:] if duplicate else data[:offset] + data[end:]

    return mutate


def _webp_riff_size(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice([0, 4, len(data), len(data) + 1000, 2**32 - 1, rng.randrange(2**32)])
    return data[:4] + struct.pack("<I", value) + data[8:]


def _webp_dimensions(rng: random.Random, data: bytes) -> bytes:
    """The first chunk's own idea of the size: VP8 (14 bits + scale), VP8L (14 bits each, minus
    one, bit-packed) or VP8X (24 bits each, minus one)."""
    out = bytearray(data)
    kind = bytes(out[12:16])
    if kind == b"VP8 ":
        out[26:30] = struct.pack("<HH", _dimension(rng, 16), _dimension(rng, 16))
    elif kind == b"VP8L":
        packed = struct.unpack("<I", out[21:25])[0]
        packed = (packed & ~0x0FFFFFFF) | (rng.randrange(1 << 14) | rng.randrange(1 << 14) << 14)
        out[21:25] = struct.pack("<I", packed)
    elif kind == b"VP8X":
        width, height = rng.randrange(1 << 24), rng.randrange(1 << 24)
        out[24:30] = width.to_bytes(3, "little") + height.to_bytes(3, "little")
    return bytes(out)


def _webp_chunk_size(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice([0, 1, len(data), 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
    return data[:16] + struct.pack("<I", value) + data[20:]


Mutation = Callable[[random.Random, bytes], bytes]
_GENERIC: list[tuple[str, Mutation]] = [
    ("bit-flips", _bit_flips),
    ("run-overwrite", _run_overwrite),
    ("truncated", _truncate),
]
MUTATIONS: dict[str, list[tuple[str, Mutation]]] = {
    "jpeg": [
        *_GENERIC,
        ("sof-size", _jpeg_sof_size),
        ("segment-duplicated", _jpeg_segment_edit(True)),
        ("segment-dropped", _jpeg_segment_edit(False)),
    ],
    "png": [
        *_GENERIC,
        ("ihdr-size-crc-fixed", _png_ihdr_size(True)),
        ("ihdr-size-crc-stale", _png_ihdr_size(False)),
        ("chunk-length", _png_chunk_length),
        ("chunk-duplicated", _png_chunk_edit(True)),
        ("chunk-dropped", _png_chunk_edit(False)),
    ],
    "webp": [
        *_GENERIC,
        ("riff-size", _webp_riff_size),
        ("dimensions", _webp_dimensions),
        ("chunk-size", _webp_chunk_size),
    ],
}


def _reencode(photo: bytes, fmt: str) -> bytes:
    """``photo`` at most 160 pixels across, as PNG or WebP, in memory: small, so that fuzzing
    costs little, yet a real encoder's output."""
    from PIL import Image

    image = Image.open(io.BytesIO(photo))
    image.draft("RGB", (160, 160))
    image = image.convert("RGB")
    image.thumbnail((160, 160))
    out = io.BytesIO()
    image.save(out, fmt.upper())
    return out.getvalue()


def mutations(
    seed: int, count: int, sources: Sequence[bytes] | None = None
) -> Iterator[tuple[str, bytes, str]]:
    """``count`` (name, bytes, content type) damaged images, the same for the same seed. The
    declared type matches the bytes four times in five: the service must sniff, not trust it."""
    sources = list(sources) if sources is not None else photos()
    if not sources:
        raise FileNotFoundError(NO_PHOTOS)
    rng = random.Random(seed)
    encoded: dict[tuple[int, str], bytes] = {}
    for i in range(count):
        index = rng.randrange(len(sources))
        kind = rng.choice(list(MUTATIONS))
        if kind == "jpeg":
            original = sources[index]
        else:
            if (index, kind) not in encoded:
                encoded[index, kind] = _reencode(sources[index], kind)
            original = encoded[index, kind]
        name, mutate = rng.choice(MUTATIONS[kind])
        content_type = MIME[kind] if rng.random() < 0.8 else rng.choice(list(MIME.values()))
        yield f"fuzz-{seed}-{i:04d}-{kind}-{name}", mutate(rng, original), content_type


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


def fuzz_cases(
    seed: int, count: int, sources: Sequence[bytes] | None = None, protocol: str = "detect"
) -> list[Case]:
    """The mutations as cases: any of 200/400/413/415, never a 5xx. ``protocol``: how they are
    sent, ``detect`` (POST /detect, the declared type of the mutation), ``oip-rest`` or ``oip-grpc``."""
    if protocol == "detect":
        return [
            Case(name, lambda target, d=data, t=content_type: post(target, d, t), FUZZ_ALLOWED)
            for name, data, content_type in mutations(seed, count, sources)
        ]
    send = {"oip-rest": oip_post, "oip-grpc": oip_grpc}[protocol]
    return [
        Case(f"{protocol} {name}", lambda target, d=data: send(target, d), FUZZ_ALLOWED, oip=True)
        for name, data, _ in mutations(seed, count, sources)
    ]


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
