"""A request's images, read from its body as it streams in and counted against the limits while
it arrives: a body, part or image count over its limit is refused (413) at the byte or part that
passes it, never after the whole body is in memory.

- Any other body is one image, recognised by its bytes whatever its declared type (most HTTP
  libraries send raw bytes as ``application/octet-stream``), except that a declared text, JSON or
  form type holding no image is 415: that client sent something else by mistake.
- ``multipart/form-data``: every part named ``file`` is an image. It is parsed by python-multipart's
  push parser chunk by chunk, as Starlette's own form parser does, but without Starlette's
  spooling of large parts to temporary files and with the image limits applied per part as it
  grows; other fields are read and dropped, within a small budget.
- Declared sizes (``Content-Length``) over the limit are refused before a byte of the body is read.
- Every byte read is held against the process-wide budget of request bytes (service/budget.py)
  until the request ends: a declared length before the body is read, chunks as they come.

A client that goes away mid-body raises Starlette's ``ClientDisconnect`` (answered as 499).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .budget import Reservation
from .errors import APIError
from .formats import accepted_format
from .settings import Settings

# Text fields beside the files (a client's "name" or "options" field): dropped, but bounded.
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 64


@dataclass
class Upload:
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class Limits:
    image_bytes: int
    images: int
    request_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.max_image_bytes, settings.max_images_per_request, settings.max_request_bytes)

    @property
    def raw_bytes(self) -> int:
        """The largest raw body: one image."""
        return min(self.image_bytes, self.request_bytes)

    @property
    def multipart_bytes(self) -> int:
        """The largest multipart body: ``images`` images of ``image_bytes``, with room for part
        headers, boundaries and a few small fields, within the request's own limit."""
        most = self.image_bytes * self.images + MAX_FIELD_BYTES + 8 * 1024 * (self.images + MAX_FIELDS)
        return min(most, self.request_bytes)


@dataclass(frozen=True)
class Body:
    """Where a body's bytes are held against the budget, and until when they may wait for it."""

    reservation: Reservation
    due: float | None


def _too_large(message: str) -> APIError:
    return APIError(413, message, "payload_too_large")


async def _declared(request: Request, limit: int, held: Body) -> int:
    """The body's declared length, refused past ``limit`` and taken from the budget (0: not
    declared, its chunks are taken as they come)."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return 0
    if int(declared) > limit:
        raise _too_large(f"the body has {declared} bytes; the limit is {limit}")
    await held.reservation.take(int(declared), held.due)
    return int(declared)


async def _chunks(request: Request, limit: int, held: Body):  # noqa: ANN202
    """The body's chunks, 413 once they pass ``limit``, every byte held against the budget."""
    taken = await _declared(request, limit, held)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"the body is over the limit of {limit} bytes")
        if size > taken:
            await held.reservation.take(size - taken, held.due)
            taken = size
        yield chunk


async def read_raw(request: Request, limit: int, held: Body) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    return b"".join([chunk async for chunk in _chunks(request, limit, held)])


class _Form:
    """python-multipart callbacks collecting the ``file`` parts within the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.uploads: list[Upload] = []
        self.text_file_field = False
        self.fields = 0
        self.field_bytes = 0
        self.finished = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] | None = None  # the current file part's data; None: not a file
        self._filename: str | None = None
        self._size = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._chunks = None
        self._size = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("latin-1")
        filename = options.get(b"filename")
        if name == "file" and filename is not None:
            if len(self.uploads) == self.limits.images:
                raise APIError(
                    413,
                    f"more than {self.limits.images} images in one request (the limit)",
                    "too_many_images",
                )
            self._chunks = []
            self._filename = filename.decode("utf-8", "replace")
            return
        if name == "file":
            self.text_file_field = True
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise APIError(400, f"more than {MAX_FIELDS} form fields", "bad_request")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._chunks is None:
            self.field_bytes += size
            if self.field_bytes > MAX_FIELD_BYTES:
                raise _too_large(f"the form's text fields pass {MAX_FIELD_BYTES} bytes")
            return
        self._size += size
        if self._size > self.limits.image_bytes:
            raise _too_large(f"{self._filename}: over the limit of {self.limits.image_bytes} bytes per image")
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self._chunks is not None:
            self.uploads.append(Upload(self._filename, b"".join(self._chunks)))
            self._chunks = None

    def on_end(self) -> None:
        self.finished = True


async def read_multipart(request: Request, content_type: str, limits: Limits, held: Body) -> list[Upload]:
    """The ``file`` parts of a multipart/form-data body, in order."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise APIError(400, "multipart/form-data without a boundary parameter", "bad_request")
    form = _Form(limits)
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in _chunks(request, limits.multipart_bytes, held):
            parser.write(chunk)
    except MultipartParseError as exc:
        raise APIError(400, f"the multipart body cannot be parsed: {exc}", "bad_request") from exc
    if not form.finished:
        raise APIError(400, "the multipart body is truncated: its closing boundary never came", "bad_request")
    if form.text_file_field:
        raise APIError(422, "the part 'file' must be a file upload, not a text field", "invalid_parameters")
    if not form.uploads:
        raise APIError(422, "multipart body without a part named 'file'", "invalid_parameters")
    return form.uploads


# Declared types that say the body is something other than an image: such a body holding no
# image is 415 (the client sent the wrong thing), not 400 (a broken image).
NOT_IMAGES = ("text/", "application/json", "application/x-www-form-urlencoded", "application/xml")


def _says_not_image(media: str) -> bool:
    return media.startswith(NOT_IMAGES) or media.endswith(("+json", "+xml"))


async def read_uploads(request: Request, limits: Limits, held: Body) -> list[Upload]:
    """The request's images: the parts named ``file`` of a multipart body, or the body itself."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await read_multipart(request, content_type, limits, held)
    data = await read_raw(request, limits.raw_bytes, held)
    if _says_not_image(media) and accepted_format(data) is None:
        raise APIError(
            415,
            f"Content-Type {media} holds no image: send the image's bytes (any type but text, "
            "JSON or a form) or multipart/form-data with parts named 'file'",
            "unsupported_media_type",
        )
    return [Upload(None, data)]


async def until_disconnect(request: Request) -> None:
    """Return when the client goes away (once the body is read, the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
