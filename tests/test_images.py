"""Decoding hostile images (service/images.py): formats told by their bytes, limits from the header
before any pixel is decoded, no process started, frugal conversions that keep the pixels."""

import io
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.images import ImageError, ImageTooLarge, UnsupportedFormat, decode, finish, open_image

SIZE = (64, 80)  # model input (H, W)
LIMIT = 40_000_000
LINUX = sys.platform.startswith("linux")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif(orientation: int) -> Image.Exif:
    data = Image.Exif()
    data[0x0112] = orientation
    return data


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A valid PNG claiming width x height with a tiny body: a bomb, never to be decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def reference(image: Image.Image, size=SIZE) -> np.ndarray:
    """What the service has always done: orient, composite on white, RGB, resize the whole image."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))


def grey16_reference(values: np.ndarray, size=SIZE) -> np.ndarray:
    """The float64 scaling 16-bit greys had before (4-5 times the memory of the image)."""
    array = values.astype(np.float64)
    low, high = array.min(), array.max()
    scaled = ((array - low) * (255.0 / (high - low))).astype(np.uint8)
    return reference(Image.fromarray(scaled), size)


def gif_frames(data: bytes) -> list[int]:
    """Offsets of the image descriptors of a GIF, to patch them."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    found = []
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos += 2
        else:  # 0x2C image descriptor
            found.append(pos)
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW minimum code size
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return found


def peak_rss_reset() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return status("VmRSS")


def status(field: str) -> int:
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# --- accepted formats ---------------------------------------------------------------------------

PHOTO = Image.fromarray(noise(90, 70))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("png", encode(PHOTO, "PNG")),
        ("webp", encode(PHOTO, "WEBP", lossless=True)),
        ("bmp", encode(PHOTO, "BMP")),
        ("tiff", encode(PHOTO, "TIFF")),
        ("tiff lzw", encode(PHOTO, "TIFF", compression="tiff_lzw")),
        ("png rgba", encode(Image.fromarray(noise(90, 70, channels=4)), "PNG")),
        ("png LA", encode(Image.fromarray(noise(90, 70, channels=4)).convert("LA"), "PNG")),
        ("png 1-bit", encode(PHOTO.convert("1"), "PNG")),
        ("png P", encode(PHOTO.quantize(32), "PNG")),
        ("gif P transparency", encode(PHOTO.quantize(32), "GIF", transparency=3)),
        ("tiff cmyk", encode(PHOTO.convert("CMYK"), "TIFF")),
        ("webp rgba", encode(Image.fromarray(noise(90, 70, channels=4)), "WEBP", lossless=True)),
    ],
)
def test_accepted_formats_decode_as_they_always_did(name, data):
    decoded = decode(data, SIZE, LIMIT)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (*SIZE, 3)
    assert (decoded.width, decoded.height) == (90, 70)
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(decoded.pixels, reference(image))


def test_jpeg_decodes_in_draft_mode_and_cmyk_and_grey_become_rgb():
    big = Image.fromarray(np.kron(noise(40, 30), np.ones((32, 32, 1), np.uint8)))  # 1280x960, blocky
    for image in (big, big.convert("CMYK"), big.convert("L")):
        data = encode(image, "JPEG", quality=95)
        opened = open_image(data, SIZE, LIMIT)
        assert opened.format == "JPEG" and opened.declared == (160, 120)  # 1/8 scale: still >= 80x64
        decoded = finish(opened, SIZE, LIMIT)
        assert (decoded.width, decoded.height) == (1280, 960)
        with Image.open(io.BytesIO(data)) as whole:
            full = reference(whole).astype(int)
        assert np.abs(decoded.pixels.astype(int) - full).mean() < 3  # draft decoding, same picture


def test_exif_rotated_jpeg_reports_the_size_people_see():
    data = encode(Image.fromarray(noise(60, 40)), "JPEG", exif=exif(6))
    decoded = decode(data, SIZE, LIMIT)
    assert (decoded.width, decoded.height) == (40, 60)
    with Image.open(io.BytesIO(data)) as image:
        assert np.abs(decoded.pixels.astype(int) - reference(image).astype(int)).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16"])
def test_every_orientation_gives_the_pixels_of_a_whole_image_transpose(orientation, mode):
    """Strips are cut, oriented and converted one at a time; the result is the whole-image one."""
    if mode == "I;16":
        values = (noise(97, 61, seed=orientation, channels=1).astype(np.uint16) * 200 + 7).astype(np.uint16)
        source = Image.fromarray(values)
    else:
        source = Image.fromarray(noise(97, 61, seed=orientation, channels=4)).convert(mode)
    data = encode(source, "PNG", exif=exif(orientation))
    decoded = decode(data, SIZE, LIMIT)
    shown = (61, 97) if orientation >= 5 else (97, 61)
    assert (decoded.width, decoded.height) == shown
    with Image.open(io.BytesIO(data)) as image:
        if mode == "I;16":
            expected = grey16_reference(np.asarray(ImageOps.exif_transpose(image)))
            assert np.abs(decoded.pixels.astype(int) - expected.astype(int)).max() <= 1
        else:
            np.testing.assert_array_equal(decoded.pixels, reference(image))


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [
        (300, 1000, (64, 80)),
        (1000, 300, (64, 80)),
        (70, 900, (64, 80)),
        (50, 60, (64, 80)),
        (640, 40, (300, 300)),
    ],
)
def test_strips_resize_in_the_order_pillow_does(width, height, size):
    """Tall, wide, narrow and small images: Pillow picks which pass comes first by the sizes, and
    the strips follow it (a different order would change pixels by one grey level)."""
    data = encode(Image.fromarray(noise(width, height, seed=width, channels=4)).quantize(64), "PNG")
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(decode(data, size, LIMIT).pixels, reference(image, size))


def test_16_bit_greys_match_the_old_float64_scaling_within_one_level():
    values = (np.random.default_rng(3).integers(1000, 60000, (70, 90))).astype(np.uint16)
    for data in (encode(Image.fromarray(values), "PNG"), encode(Image.fromarray(values), "TIFF")):
        opened = open_image(data, SIZE, LIMIT)
        assert opened.image.mode == "I;16"
        decoded = finish(opened, SIZE, LIMIT)
        assert np.abs(decoded.pixels.astype(int) - grey16_reference(values).astype(int)).max() <= 1
    flat = encode(Image.fromarray(np.full((20, 20), 700, np.uint16)), "PNG")
    assert not decode(flat, SIZE, LIMIT).pixels.any()  # no range: black, as before


def test_palette_transparency_is_white():
    image = Image.new("P", (40, 20), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 20, 20))  # left half: index 0, transparent
    decoded = decode(encode(image, "GIF", transparency=0), (20, 40), LIMIT)
    assert (decoded.pixels[:, :15] == 255).all()
    assert (decoded.pixels[:, 25:] == (200, 0, 0)).all()


def animated(fmt: str, **options) -> bytes:
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    return encode(red, fmt, save_all=True, append_images=[blue], **options)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF", "MPO"])
def test_animations_and_multi_page_files_give_their_first_frame(fmt):
    data = animated(fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    opened = open_image(data, SIZE, LIMIT)
    assert opened.format == fmt
    pixels = finish(opened, SIZE, LIMIT).pixels
    assert np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 2, fmt


def test_frames_after_the_first_are_never_read():
    data = bytearray(animated("GIF"))
    second = gif_frames(bytes(data))[1]
    data[second + 5 : second + 9] = struct.pack("<HH", 60000, 60000)  # frame 2 claims 3.6 gigapixels
    pixels = decode(bytes(data), SIZE, LIMIT).pixels
    assert (pixels == (255, 0, 0)).all()
    small, huge = Image.new("L", (30, 20), 9), Image.new("L", (3000, 3000))
    pages = encode(small, "TIFF", save_all=True, append_images=[huge])
    assert decode(pages, SIZE, max_pixels=1000).width == 30  # page 2 is over the limit, unread


def test_png_orientation_in_an_exif_chunk_after_the_pixels():
    data = encode(Image.fromarray(noise(60, 40)), "PNG", exif=exif(8))
    chunks = png_chunks(data)
    late = [c for c in chunks if c[0] != b"eXIf"]
    late.insert(-1, next(c for c in chunks if c[0] == b"eXIf"))  # just before IEND
    moved = b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in late)
    decoded = decode(moved, SIZE, LIMIT)
    assert (decoded.width, decoded.height) == (40, 60)
    np.testing.assert_array_equal(decoded.pixels, decode(data, SIZE, LIMIT).pixels)


def test_decode_is_open_image_then_finish():
    for data in (encode(PHOTO, "PNG"), encode(PHOTO, "JPEG"), encode(PHOTO.quantize(16), "GIF")):
        np.testing.assert_array_equal(
            decode(data, SIZE, LIMIT).pixels, finish(open_image(data, SIZE, LIMIT), SIZE, LIMIT).pixels
        )


# --- refused ------------------------------------------------------------------------------------


@pytest.fixture
def no_processes(monkeypatch):
    class Started(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Started(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse, raising=False)
    return Started


def ico_around(png: bytes) -> bytes:
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


EPS = encode(Image.new("RGB", (20, 10), (200, 30, 30)), "EPS")
TINY = Image.new("RGB", (20, 10), (200, 30, 30))
UNSUPPORTED = {
    "EPS": EPS,
    "EPS binary": b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS,
    "PostScript": b"%!PS\n/Times findfont 12 scalefont setfont\nshowpage\n",
    "PDF": encode(TINY, "PDF"),
    "ICO": ico_around(png_header(20000, 20000)),
    "ICO small": encode(TINY, "ICO"),
    "PSD": b"8BPS\0\1" + b"\0" * 6 + struct.pack(">HIIHH", 3, 10, 20, 8, 3) + b"\0" * 64,
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "SVG xml": b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
    "HEIC": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 32,
    "AVIF": b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + b"\0" * 32,
    "JPEG XL": b"\xff\x0a\xfa\x7f" + b"\0" * 32,
    "JPEG 2000": b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 32,
    "TGA": encode(TINY, "TGA"),
    "PCX": encode(TINY, "PCX"),
    "PPM": encode(TINY, "PPM"),
    "QOI": encode(TINY, "QOI"),
    "DDS": encode(TINY, "DDS"),
    "SGI": encode(TINY, "SGI"),
    "ICNS": encode(TINY, "ICNS"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_known_formats_outside_the_list_are_415_and_start_no_process(name, no_processes):
    with pytest.raises(UnsupportedFormat) as caught:
        decode(UNSUPPORTED[name], SIZE, LIMIT)
    assert caught.value.status == 415 and caught.value.code == "unsupported_media_type"
    assert name.split()[0] in str(caught.value)
    assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in str(caught.value)


@pytest.mark.skipif(shutil.which("gs") is None, reason="Ghostscript is not installed")
def test_the_eps_used_above_would_start_ghostscript_in_plain_pillow(no_processes):
    """The control: what the old decoder did with this EPS (any type declared) starts `gs`."""
    with pytest.raises(no_processes), Image.open(io.BytesIO(EPS)) as image:
        image.load()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("random bytes", np.random.default_rng(16).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("text", b"just text"),
        ("html", b"<!doctype html><html><body>hi</body></html>"),
        ("0x0 png", png_header(0, 0)),
        ("truncated jpeg", encode(PHOTO, "JPEG")[:400]),
        ("truncated png", encode(PHOTO, "PNG")[:300]),
        ("jpeg magic then garbage", b"\xff\xd8\xff\xe0garbage"),
        ("gif magic only", b"GIF89a"),
        ("webp garbage", b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 20),
        ("bmp magic then text", b"BM is not a bitmap"),
    ],
)
def test_bytes_that_are_no_image_or_a_broken_one_are_400(name, data):
    with pytest.raises(ImageError) as caught:
        decode(data, SIZE, LIMIT)
    assert type(caught.value) is ImageError and caught.value.status == 400, caught.value


def test_over_the_pixel_limit_is_413_from_the_header_without_decoding():
    data = png_header(20000, 20000)
    before = peak_rss_reset() if LINUX else 0
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge) as caught:
        decode(data, SIZE, LIMIT)
    assert time.perf_counter() - started < 0.5
    if LINUX:
        assert status("VmHWM") - before < 20 << 20  # 400 MP: the header is all that was read
    # Beyond twice Pillow's own guard (179 MP), Pillow refuses first; the message still tells the count.
    assert caught.value.status == 413 and "400000000 pixels" in str(caught.value)
    with pytest.raises(ImageTooLarge, match="8000x8000 = 64000000 pixels; the limit is 40000000"):
        decode(png_header(8000, 8000), SIZE, LIMIT)
    with pytest.raises(ImageTooLarge, match="2500000000 pixels"):
        decode(png_header(50000, 50000), SIZE, LIMIT)
    with pytest.raises(ImageTooLarge):  # 16 MP WebP: refused before libwebp allocates its canvas
        decode(
            b"RIFF\x20\0\0\0WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4 + b"\xff\x0f\0\xff\x0f\0",
            SIZE,
            10**6,
        )
    gif = bytearray(encode(Image.new("P", (20, 20)), "GIF"))
    first = gif_frames(bytes(gif))[0]
    gif[first + 5 : first + 9] = struct.pack("<HH", 40000, 40000)  # first frame beyond the screen
    with pytest.raises(ImageTooLarge):
        decode(bytes(gif), SIZE, LIMIT)


def test_pillow_guard_stays_on_and_is_raised_for_a_larger_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # put back afterwards
    assert Image.MAX_IMAGE_PIXELS is not None
    data = png_header(14000, 14000, colour=0)  # 196 MP: past twice Pillow's default guard
    with pytest.raises(ImageTooLarge):
        open_image(data, SIZE, LIMIT)
    opened = open_image(data, SIZE, 200_000_000)  # a caller that allows it is not refused
    opened.image.close()
    assert Image.MAX_IMAGE_PIXELS >= 200_000_000


def test_a_file_that_holds_another_size_than_it_declared_is_refused():
    opened = open_image(encode(Image.new("RGB", (40, 30)), "PNG"), SIZE, LIMIT)
    opened.image = Image.open(io.BytesIO(encode(Image.new("RGB", (50, 30)), "PNG")))
    with pytest.raises(ImageError, match="declared 40x30 pixels but holds 50x30") as caught:
        finish(opened, SIZE, LIMIT)
    assert caught.value.status == 400
    opened = open_image(encode(Image.new("RGB", (40, 30)), "PNG"), SIZE, 2000)
    opened.image = Image.open(io.BytesIO(encode(Image.new("L", (100, 100)), "PNG")))
    with pytest.raises(ImageTooLarge):
        finish(opened, SIZE, 2000)


def test_large_run_length_bmps_are_refused():
    width, height = 2000, 1001
    body = (b"\x01\x05\x00\x00" * height) + b"\x00\x01"  # one pixel and end-of-line, per row
    palette = bytes(range(256)) * 4
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 0, 0, 256, 0)
    offset = 14 + len(info) + len(palette)
    data = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body
    with pytest.raises(ImageTooLarge, match="run-length"):
        decode(data, SIZE, LIMIT)


# --- memory -------------------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="reads the RSS high-water mark from /proc")
def test_16_bit_costs_about_twice_8_bit_and_the_estimate_covers_it():
    grey = (np.add.outer(np.arange(3000), np.arange(3000)) * 7).astype(np.uint16)  # 9 MP
    peaks, costs = {}, {}
    for name, image in (("16", Image.fromarray(grey)), ("8", Image.fromarray((grey >> 8).astype(np.uint8)))):
        data = encode(image, "PNG", compress_level=1)
        opened = open_image(data, SIZE, LIMIT)
        before = peak_rss_reset()
        finish(opened, SIZE, LIMIT)
        peaks[name], costs[name] = status("VmHWM") - before, opened.cost
        assert peaks[name] <= costs[name], name
    assert peaks["16"] < 9e6 * 2 + (8 << 20)  # the float64 way took 26 bytes a pixel
    assert costs["16"] - costs["8"] == 9_000_000


def test_cost_counts_what_each_decoder_holds():
    photo = Image.fromarray(np.kron(noise(40, 30), np.ones((40, 40, 1), np.uint8)))  # 1600x1200
    baseline = open_image(encode(photo, "JPEG"), SIZE, LIMIT)
    progressive = open_image(encode(photo, "JPEG", progressive=True), SIZE, LIMIT)
    # libjpeg keeps every DCT coefficient of a progressive file: 2 bytes a sample, 4:2:0 = 1.5 samples.
    assert progressive.cost - baseline.cost >= 1600 * 1200 * 3
    webp = open_image(encode(photo, "WEBP"), SIZE, LIMIT)
    png = open_image(encode(photo, "PNG", compress_level=1), SIZE, LIMIT)
    assert webp.cost - png.cost == 1600 * 1200 * 12
    for opened in (baseline, progressive, webp, png):
        opened.image.close()
