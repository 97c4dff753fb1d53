"""What hostile clients send: files of formats outside the decoding allow-list, decompression bombs
and broken headers, built in memory on first use and cached (collecting the tests builds none),
and the repository's real photos."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "photos" / "val2017"  # real photos, chosen by licence (photos/README.md)
NO_PHOTOS = f"needs JPEG photos, none here: {PHOTOS}"
MB = 1024 * 1024


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
    sof = jpeg_sof(data)
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


MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI, EOI: no length field


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
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


def jpeg_sof(data: bytes) -> int | None:
    return next((offset for offset, _, marker in jpeg_segments(data) if marker in _SOF), None)


def photos(folder: Path = PHOTOS) -> list[bytes]:
    """The JPEGs of ``folder`` as bytes, sorted by name ([] when the folder is absent)."""
    return [f.read_bytes() for f in sorted(folder.glob("*.jpg"))] if folder.is_dir() else []
