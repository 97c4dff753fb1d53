"""Peak memory of decoding one ~40-megapixel image, per format and mode: the figures behind the
``cost`` estimate of ``service.images.open_image``.

Pillow allocates pixels in C, where tracemalloc does not look, so each case runs in a fresh
process that reads its file, opens it, resets the kernel's RSS high-water mark (``5`` into
``/proc/self/clear_refs``) and decodes: the peak extra memory is VmHWM after minus VmRSS before.

    ssd bench decode-memory             # new code, and the old one if OLD_IMAGES is given
    OLD_IMAGES=/tmp/old_images.py ssd bench decode-memory
    ssd bench decode-memory --only png  # cases whose name contains "png"

``OLD_IMAGES``: a copy of an older ``service/images.py`` (``git show HEAD:service/images.py``),
measured with its ``decode`` for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
INPUT_SIZE = (320, 320)
LIMIT = 100_000_000
W, H = 7296, 5472  # 39.9 MP, 4:3
SQUARE = 6300  # 39.7 MP


def _pattern(width: int, height: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients with a little noise: compresses like a photo would, built fast."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    planes = []
    for c in range(channels):
        plane = (x * (0.3 + 0.2 * c) + y * (0.7 - 0.2 * c)) % 256
        plane += rng.integers(0, 8, (height, 1), dtype=np.uint8)  # row jitter, cheap
        planes.append(plane.astype(np.uint8))
    return np.dstack(planes) if channels > 1 else planes[0]


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_rgb16(width: int, height: int) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): IHDR, one zlib stream of filter-0 rows."""
    rows = _pattern(width, height).astype(">u2") * 257
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows.reshape(height, -1).view(np.uint8)], axis=1)
    body = zlib.compress(raw.tobytes(), 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _cases() -> dict[str, Callable[[], bytes]]:
    rgb = lambda: Image.fromarray(_pattern(W, H))  # noqa: E731
    grey16 = lambda: Image.fromarray(_pattern(SQUARE, SQUARE, 1).astype(np.uint16) * 257)  # noqa: E731
    return {
        "jpeg rgb baseline": lambda: _save(rgb(), "JPEG", quality=85),
        "jpeg rgb progressive": lambda: _save(rgb(), "JPEG", quality=85, progressive=True),
        "jpeg rgb 4:4:4 orient 6": lambda: _save(rgb(), "JPEG", quality=85, subsampling=0, exif=_exif(6)),
        "jpeg cmyk": lambda: _save(rgb().convert("CMYK"), "JPEG", quality=85),
        "jpeg L": lambda: _save(rgb().convert("L"), "JPEG", quality=85),
        "png rgb 8-bit": lambda: _save(rgb(), "PNG", compress_level=1),
        "png rgb 8-bit orient 6": lambda: _save(rgb(), "PNG", compress_level=1, exif=_exif(6)),
        "png rgba": lambda: _save(rgb().convert("RGBA"), "PNG", compress_level=1),
        "png L 8-bit 6300x6300": lambda: _save(grey16().convert("L"), "PNG", compress_level=1),
        "png I;16 16-bit 6300x6300": lambda: _save(grey16(), "PNG", compress_level=1),
        "png rgb 8-bit 6300x6300": lambda: _save(
            Image.fromarray(_pattern(SQUARE, SQUARE)), "PNG", compress_level=1
        ),
        "png rgb 16-bit 6300x6300": lambda: _png_rgb16(SQUARE, SQUARE),
        "png P": lambda: _save(rgb().quantize(64), "PNG", compress_level=1),
        "png P transparency": lambda: _save(rgb().quantize(64), "PNG", compress_level=1, transparency=3),
        "png P tall 2000x20000": lambda: _save(Image.fromarray(_pattern(2000, 20000)).quantize(64), "PNG"),
        "png 1-bit": lambda: _save(rgb().convert("1"), "PNG", compress_level=1),
        "gif P": lambda: _save(rgb().quantize(64), "GIF"),
        "tiff I;16 raw": lambda: _save(grey16(), "TIFF"),
        "tiff I;16 lzw": lambda: _save(grey16(), "TIFF", compression="tiff_lzw"),
        "tiff I;16 lzw one strip": lambda: _save(
            grey16(), "TIFF", compression="tiff_lzw", strip_size=1 << 40
        ),
        "tiff rgb raw": lambda: _save(rgb(), "TIFF"),
        "tiff rgb lzw one strip": lambda: _save(rgb(), "TIFF", compression="tiff_lzw", strip_size=1 << 40),
        "tiff rgb orient 6": lambda: _save(rgb(), "TIFF", tiffinfo={274: 6}),
        "bmp rgb": lambda: _save(rgb(), "BMP"),
        "webp rgb": lambda: _save(rgb(), "WEBP", quality=80, method=0),
    }


# --- the measuring child ------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)[1]) * 1024


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status("VmRSS")


def _child(which: str, path: str) -> dict:
    if which == "new":
        sys.path.insert(0, str(ROOT))
        from service import images
    else:
        spec = importlib.util.spec_from_file_location("old_images", which)
        images = importlib.util.module_from_spec(spec)
        sys.modules["old_images"] = images  # dataclasses look their module up
        spec.loader.exec_module(images)
    images.decode(_save(Image.new("RGB", (64, 48)), "PNG"), INPUT_SIZE, LIMIT)  # plugins, numpy
    data = Path(path).read_bytes()
    out: dict = {}
    if which == "new":
        before = _reset_peak()
        opened = images.open_image(data, INPUT_SIZE, LIMIT)
        opened_peak, start = _status("VmHWM") - before, before
        out |= {"cost": opened.cost, "mode": opened.image.mode, "loaded": list(opened.declared)}
        _reset_peak()  # what open_image kept (WebP's decoder, say) counts too
        started = time.perf_counter()
        images.finish(opened, INPUT_SIZE, LIMIT)
        out["seconds"] = time.perf_counter() - started
        out["peak"] = max(opened_peak, _status("VmHWM") - start)
    else:
        before = _reset_peak()
        started = time.perf_counter()
        images.decode(data, INPUT_SIZE, LIMIT)
        out["seconds"] = time.perf_counter() - started
        out["peak"] = _status("VmHWM") - before
    return out


def _run(which: str, path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", which, str(path)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{which} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd bench decode-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    old = os.environ.get("OLD_IMAGES")
    mb = 1 << 20
    print(
        f"input {INPUT_SIZE}; peak extra RSS in MB (new: open_image + finish); cost: open_image's estimate; "
        "B/px: new / loaded pixels; s: decode seconds"
    )
    header = (
        f"{'case':28} {'MP':>5} {'old':>6} {'new':>6} {'cost':>6} {'mode':>5} {'loaded':>11} {'B/px':>5} "
        f"{'old s':>6} {'new s':>6}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        for name, build in _cases().items():
            if args.only not in name:
                continue
            path = Path(folder) / "image"
            data = build()
            path.write_bytes(data)
            with Image.open(io.BytesIO(data)) as probe:
                megapixels = probe.size[0] * probe.size[1] / 1e6
            new = _run("new", path)
            before = _run(old, path) if old else {"peak": float("nan"), "seconds": float("nan")}
            loaded = new["loaded"][0] * new["loaded"][1]
            print(
                f"{name:28} {megapixels:5.1f} {before['peak'] / mb:6.0f} {new['peak'] / mb:6.0f} "
                f"{new['cost'] / mb:6.0f} {new['mode']:>5} {'x'.join(map(str, new['loaded'])):>11} "
                f"{new['peak'] / loaded:5.2f} {before['seconds']:6.2f} {new['seconds']:6.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
