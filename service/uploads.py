"""A request's images, read from its body as it streams in and counted against the limits while
it arrives: a body, part or image count over its limit is refused (413) at the byte or part that
passes it, never after the whole body is in memory.

- A raw body whose ``Content-Type`` is an image type is one image.
- ``multipart/form-data``: every part named ``file`` is an image. It is parsed by python-multipart's
  push parser chunk by chunk, as Starlette's own form parser does, but without Starlette's
  spooling of large parts to temporary files and with the image limits applied per part as it
  grows; other fields are read and dropped, within a small budget.
- Declared sizes (``Content-Length``) over the limit are refused before a byte of the body is read.

A client that goes away mid-body raises Starlette's ``ClientDisconnect`` (answered as 499).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from .errors import APIError

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

    @property
    def multipart_bytes(self) -> int:
        """The largest multipart body that can hold ``images`` images of ``image_bytes``: their
        bytes plus room for part headers, boundaries and a few small fields."""
        return self.image_bytes * self.images + MAX_FIELD_BYTES + 8 * 1024 * (self.images + MAX_FIELDS)


def _too_large(message: str) -> APIError:
    return APIError(413, message, "payload_too_large")


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"the body has {declared} bytes; the limit is {limit}")


async def read_raw(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    _check_declared(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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


async def read_multipart(request: Request, content_type: str, limits: Limits) -> list[Upload]:
    """The ``file`` parts of a multipart/form-data body, in order."""
    _check_declared(request, limits.multipart_bytes)
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise APIError(400, "multipart/form-data without a boundary parameter", "bad_request")
    form = _Form(limits)
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.multipart_bytes:
                raise _too_large(f"the body is over the limit of {limits.multipart_bytes} bytes")
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


async def discard_body(request: Request, limit: int) -> None:
    """Read the body and drop it, never kept, up to ``limit`` bytes: for a request refused
    before its body was read, whose answer closes the connection. A client that sent ``Expect:
    100-continue`` has not sent its body and will not (it gets the answer instead of the 100);
    any other is sending it now, and closing the connection under it would reset it before it
    reads the answer (HTTP clients write the whole body before reading)."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return
    read = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in request.stream():
            read += len(chunk)
            if read > limit:
                return  # past any limit: the connection closes rather than read on


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The request's images: the parts named ``file`` of a multipart body, or a raw image body."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await read_multipart(request, content_type, limits)
    if media.startswith("image/"):
        return [Upload(None, await read_raw(request, limits.image_bytes))]
    raise APIError(
        415,
        f"Content-Type {media or '(none)'} is neither multipart/form-data nor an image type",
        "unsupported_media_type",
    )


async def until_disconnect(request: Request) -> None:
    """Return when the client goes away (once the body is read, the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
