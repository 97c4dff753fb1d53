"""The attack cases: what each hostile client does and what the server must answer.

One home for them, shared by tests/test_hostile.py (one test per case) and ``ssd bench hostile``
(every case at once beside normal load). They follow docs/reference.md (images, the
error table, slow and vanishing clients, reloads): formats outside the decoding allow-list (EPS
must never reach Ghostscript), decompression bombs, corrupt and truncated files, clients that
disconnect mid-upload, oversize bodies and multipart abuse, admin routes and a tampered artifact.

Each ``Case`` performs its attack against a ``Target`` and says what must come back: allowed
statuses (``None``: no answer, e.g. the client gave up on purpose) and, where the contract fixes
one, the JSON error code. Every non-2xx answer must be ``{"error": {"code": str, "message": str}}``
(the OIP's ``{"error": str}`` for cases sent through it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from attacks.client import (
    BOUNDARY,
    MULTIPART,
    Answer,
    Target,
    head,
    in_flight,
    multipart,
    post,
    raw_exchange,
    ready,
    request,
    request_counts,
)
from attacks.payloads import (
    EPS,
    EPS_LOOP,
    HEIC,
    MB,
    NO_PHOTOS,
    SVG,
    eps_dos_binary,
    grey16_png,
    ico_wrapping,
    jpeg_with_size,
    pillow_bytes,
    png_declaring,
    psd,
    small_jpeg,
)
from attacks.watch import Watch, children, proc_status

RSS_LIMIT = 1024 * MB  # the server's peak resident memory, whatever the clients send

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
        # Tiled, the same image is decoded at full resolution and cut into at most
        # SSD_MAX_TILES_PER_IMAGE tiles: bounded work, bounded memory (the aftermath's RSS check).
        Case(
            "grey16-6300-tiled",
            lambda t: post(t, grey16_png(), "image/png", path="/detect?tile=auto", timeout=60.0),
            frozenset({200}),
            exclusive=True,
        ),
        Case(
            "png-50000x50000-tiled",
            lambda t: post(t, png_declaring(50000, 50000), "image/png", path="/detect?tile=auto"),
            frozenset({413}),
            "image_too_large",
        ),
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
