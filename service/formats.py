"""Image formats told apart by their bytes, never by a declared type or a file name; and every
reach into Pillow's internals (its registry of formats, an opened image's tiles).

``accepted_format`` names the formats the service decodes (JPEG, PNG, WebP, GIF, BMP, TIFF);
``known_format`` names any other format it can recognise (its own table, then Pillow's registered
``accept`` checks, which are pure prefix tests: no plugin factory is ever called), so that an
upload in a known but unsupported format is told apart (415) from bytes that are no image (400).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from PIL import Image

ACCEPTED = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def accepted_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"  # Pillow's JPEG factory returns an MPO when the file is one
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")):  # classic and BigTIFF
        return "TIFF"
    return None


def _iso_media(data: bytes) -> str | None:
    """HEIC/HEIF/AVIF and their video cousins: an ISO base media ``ftyp`` box first."""
    if data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    brands = {data[i : i + 4] for i in range(8, min(max(size, 16), 64), 4)}
    if brands & {b"avif", b"avis"}:
        return "AVIF"
    if brands & {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}:
        return "HEIC"
    if brands & {b"mif1", b"msf1", b"mif2"}:
        return "HEIF"
    if b"crx " in brands:
        return "Canon CR3"
    return "MP4/QuickTime"


def _markup(data: bytes) -> str | None:
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if head.startswith(b"<svg") or (
        head.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in head
    ):
        return "SVG"
    if head.startswith(b"<?xml"):
        return "XML"
    return None


def _starts(*magics: bytes) -> Callable[[bytes], bool]:
    return lambda data: data.startswith(magics)


# Formats Pillow cannot read (or that a Pillow build may lack), named before Pillow's own list.
_OTHER_FORMATS: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("PDF", _starts(b"%PDF-")),
    ("EPS", lambda d: d.startswith(b"\xc5\xd0\xd3\xc6") or (d.startswith(b"%!PS") and b"EPSF" in d[:64])),
    ("PostScript", _starts(b"%!")),
    ("PSD", _starts(b"8BPS")),
    ("TGA", lambda d: d.endswith(b"TRUEVISION-XFILE.\0")),  # before CUR: 00 00 02 00 starts both
    ("ICO", _starts(b"\0\0\1\0")),
    ("CUR", _starts(b"\0\0\2\0")),
    ("JPEG XL", _starts(b"\xff\x0a", b"\0\0\0\x0cJXL \r\n\x87\n")),
    ("JPEG 2000", _starts(b"\0\0\0\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ("JPEG XR", _starts(b"II\xbc\x00", b"II\xbc\x01", b"WMPHOTO")),
    ("OpenEXR", _starts(b"\x76\x2f\x31\x01")),
    ("Radiance HDR", _starts(b"#?RADIANCE", b"#?RGBE")),
    ("BPG", _starts(b"BPG\xfb")),
    ("FLIF", _starts(b"FLIF")),
    ("QOI", _starts(b"qoif")),
    ("GIMP XCF", _starts(b"gimp xcf")),
    ("DICOM", lambda d: d[128:132] == b"DICM"),
    ("IM", _starts(b"Image type:")),  # Pillow reads it but registers no accept function
)


@functools.cache
def _pillow_accepts() -> tuple[tuple[str, Callable[[bytes], bool | str]], ...]:
    """Every other format Pillow registers, by its ``accept`` function: a pure check of the first
    16 bytes (what Image.open passes it). Factories are never called; formats without an
    ``accept`` (TGA, IPTC, ...) cannot be told by their bytes and are left out."""
    Image.init()
    return tuple(
        (name, accept)
        for name, (_factory, accept) in sorted(Image.OPEN.items())
        if accept is not None and name not in ACCEPTED
    )


def known_format(data: bytes) -> str | None:
    for find in (_iso_media, _markup):
        if name := find(data):
            return name
    for name, accept in _OTHER_FORMATS:
        if accept(data):
            return name
    prefix = data[:16]
    for name, accept in _pillow_accepts():
        try:
            if accept(prefix):  # a string is Pillow saying it knows the format but lacks a library
                return name
        except Exception:
            continue
    return None


def decoder_name(image: Image.Image) -> str | None:
    """The name of the decoder Pillow will run on an opened image (its first tile's), e.g.
    ``bmp_rle``; None when it has none (already loaded)."""
    tile = getattr(image, "tile", None)
    return tile[0][0] if tile else None
