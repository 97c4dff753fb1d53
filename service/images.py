"""Image bytes to model input: decode hostile images safely, orient, convert to RGB, resize.

Two steps, so that the service can reserve decode memory in between (from the event loop):

- ``open_image`` recognises the format by its bytes (JPEG, PNG, WebP, GIF, BMP, TIFF; anything else
  is refused before Pillow sees it, so no other plugin, and no Ghostscript, ever runs), reads the
  header, checks the pixel count before any pixel is decoded, reads the EXIF orientation, puts a
  JPEG in draft mode (the smallest DCT scale still at least the model's input size: a 12-megapixel
  photo for a 320x320 model decodes at 1/8 scale) and estimates the peak memory ``finish`` needs.
- ``finish`` loads the pixels (the first frame of animations), checks that they are what the header
  declared, and turns them into the model input: EXIF orientation applied, every mode (L, LA, P,
  RGBA, CMYK, 1, I;16, ...) made RGB, resized to the input size. Orienting and converting run on
  strips, each resized in Pillow's first pass at once, so that nothing but the loaded image itself
  is ever full-size: a 16-bit image costs twice an 8-bit one, not 26 bytes a pixel of float64 math,
  and the pixels are those of converting and resizing the whole image.

``decode`` does both, for ``ssd predict`` and tests.
"""

from __future__ import annotations

import functools
import io
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .formats import ACCEPTED_TEXT, accepted_format, decoder_name, known_format

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the oriented image

# EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_TRANSPOSING = {5, 6, 7, 8}
# What Pillow's ImageOps.exif_transpose does for each orientation.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Greys wider than 8 bits, scaled to 8 bits on their own range (what a viewer shows).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA")
# Rows are converted in strips of about this many pixels: a few MB whatever the image.
_STRIP_PIXELS = 1 << 18


class ImageError(ValueError):
    """A problem with one image; ``status`` is the HTTP status it maps to."""

    status = 400
    code = "invalid_image"


class ImageTooLarge(ImageError):
    status = 413
    code = "image_too_large"


class UnsupportedFormat(ImageError):
    """A known image (or document) format that this service does not read."""

    status = 415
    code = "unsupported_media_type"


NotAnImage = UnsupportedFormat  # its name before the formats were told apart from non-images


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 [H, W, 3] at the model's input size
    width: int  # of the original image, after EXIF orientation
    height: int
    tiles: np.ndarray | None = None  # uint8 [T, H, W, 3]: the tiles asked for, each at the input size
    rects: tuple[Rect, ...] = ()  # each tile's x0, y0, x1, y1 in the image

    def inputs(self) -> list[np.ndarray]:
        """The model inputs it makes: the whole image, then each tile."""
        return [self.pixels, *(self.tiles if self.tiles is not None else ())]


@dataclass
class Opened:
    """An image whose header is read and checked, no pixel decoded yet; ``finish`` consumes it."""

    image: Image.Image
    format: str  # "JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"
    width: int  # of the original, after EXIF orientation
    height: int
    orientation: int  # EXIF orientation, 1..8
    cost: int  # estimated peak bytes that finish() needs for this image
    declared: tuple[int, int]  # the size the pixels load at (after draft, before orientation)

    def close(self) -> None:
        """For a caller that gives up before finish() (which closes it itself)."""
        self.image.close()


def sniff(data: bytes) -> str:
    """The accepted format of ``data`` by its bytes; raises UnsupportedFormat (415) for a known
    format outside the list, ImageError (400) for bytes that are no known format."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if fmt := accepted_format(data):
        return fmt
    if name := known_format(data):
        raise UnsupportedFormat(f"unsupported image format {name}; send {ACCEPTED_TEXT}")
    raise ImageError(
        f"not an image: the data (starting {data[:8]!r}) is no image format we know; send {ACCEPTED_TEXT}"
    )


# --- Pixel limits -------------------------------------------------------------------------------

_guard_lock = threading.Lock()


def _keep_pillow_guard_above(max_pixels: int) -> None:
    """Pillow's own bomb guard stays on (a warning above MAX_IMAGE_PIXELS, DecompressionBombError
    above twice that, checked in Image.open and again by some plugins while loading). Our own
    limit is the one that speaks; the guard is raised to it when a caller allows more, so that it
    never refuses what the limit allows. It is a module global read by every thread, so it is
    only ever raised, to the largest limit seen, never set per call and put back."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= max_pixels:
        return  # None: someone turned the guard off; our limit still holds
    with _guard_lock:
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _bomb(exc: Exception, max_pixels: int) -> ImageTooLarge:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{found[1]} pixels" if found else "more pixels than Pillow's guard allows"
    return ImageTooLarge(f"the image has {count}; the limit is {max_pixels}")


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from a WebP's first chunk. Pillow's WebP reader hands the whole file to
    libwebp's decoder in Image.open, which allocates the canvas there, so our limit is checked
    from these bytes first."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


# --- Orientation --------------------------------------------------------------------------------


def _orientation(image: Image.Image) -> int:
    try:
        # PngImageFile.getexif() loads the whole image to look for an eXIf chunk after the pixels;
        # Image.getexif reads what the header has (eXIf, XMP before IDAT). finish() looks again.
        exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
        value = exif.get(0x0112, 1)
    except Exception:
        return 1  # a broken EXIF block is not a broken image
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


@functools.cache
def _pillow_orients_tiff() -> bool:
    """Whether Pillow applies a TIFF's own orientation tag while loading (and reports the size
    after it from the header); recent Pillows do, older ones leave it to the caller."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("L", (2, 1)).save(buffer, "TIFF", exif=exif)
    with Image.open(buffer, formats=["TIFF"]) as probe:
        return probe.size == (1, 2)


def _orients_itself(fmt: str) -> bool:
    return fmt == "TIFF" and _pillow_orients_tiff()


# --- Memory estimate ----------------------------------------------------------------------------

# cost = loaded pixels x (storage + decoder extra) + the image after the first resize pass
#        + libjpeg's coefficients (progressive or multi-scan JPEG) + libtiff's strip buffer
#        + Pillow's transposed copy (oriented TIFF) + 16 MB.
# Measured with bench/decode_memory.py: the RSS high-water mark (reset through /proc/self/clear_refs)
# of open_image + finish in a fresh process per case, ~40 MP images, 320x320 input, Pillow 13.0:
#   case                         MB   B/px of loaded   estimate MB
#   JPEG RGB/CMYK/L baseline    1-9   (drafted to 1/8)   17-19
#   JPEG RGB progressive        117   (coefficients)      133
#   PNG/BMP/TIFF RGB, RGBA  159-164   4.2-4.3             175
#   PNG RGB, EXIF-rotated 6     166   4.4                 177
#   PNG L / 1-bit                40   1.05                 56
#   PNG P, GIF P              46-49   1.2-1.3              61
#   PNG/TIFF I;16 (16-bit)    80-84   2.1-2.2              94
#   TIFF I;16 LZW, one strip    156   4.1                 169
#   TIFF RGB LZW, one strip     271   7.1                 289
#   TIFF RGB, orientation 6     309   8.1                 330
#   WebP RGB                    614   16.1                632
# Bytes a pixel as Pillow keeps a loaded image: 1, 2, or 4 for everything else (RGB is padded to 4).
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# What a decoder holds beside Pillow's image, per loaded pixel: libwebp's canvas and its copy of
# the previous frame (4 + 4), and the frame it hands to Pillow as bytes (4).
_DECODER_EXTRA = {"WEBP": 12}
_OVERHEAD = 16 << 20  # strips being converted, the output, allocator slack: measured below 10 MB
_GREY_MODES = ("1", "L", *_WIDE_MODES)
# Pillow decodes run-length-encoded BMPs in Python, a pixel or a run at a time (about 0.3 s a
# megapixel at worst, holding the GIL, from a file a few bytes a row): they get a limit of their own.
RLE_BMP_MAX_PIXELS = 2_000_000


def _jpeg_buffered(data: bytes, components: int) -> bool:
    """Whether libjpeg needs the whole image's DCT coefficients in memory: progressive files, and
    baseline ones whose first scan does not hold every component (read from the first SOS)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xC2, 0xC6, 0xCA, 0xCE):  # progressive SOFs
            return True
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            return pos + 4 < len(data) and data[pos + 4] < components
        pos += 2 + length
    return True  # unreadable: assume the worst


def _jpeg_coefficient_bytes(image: Image.Image, size: tuple[int, int]) -> int:
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * 3
    h_max = max(max(layer[1] for layer in layers), 1)
    v_max = max(max(layer[2] for layer in layers), 1)
    blocks = 0
    for _, h, v, _ in layers:
        columns = -(-size[0] * max(h, 1) // h_max)  # the component's own size, rounded up
        rows = -(-size[1] * max(v, 1) // v_max)
        blocks += -(-columns // 8) * -(-rows // 8)
    return blocks * 64 * 2  # 64 coefficients a block, a JCOEF is 16 bits


def _tiff_strip_bytes(image: Image.Image) -> int:
    """libtiff decodes a compressed TIFF a strip or a tile at a time into a buffer of its own, as
    large as the file says a strip is: the whole image when it is written as one strip. YCbCr
    strips go through an RGBA buffer."""
    tags = getattr(image, "tag_v2", {})
    width, height = getattr(image, "_tile_size", image.size)
    samples = tags.get(277, 1)  # SamplesPerPixel
    bits = tags.get(258, (8,))  # BitsPerSample
    bits = sum(bits) if isinstance(bits, tuple) else bits * samples
    row_bytes = width * max(-(-bits // 8), 4 if tags.get(262) == 6 else 1)
    if 322 in tags and 323 in tags:  # TileWidth, TileLength
        return tags[322] * tags[323] * max(-(-bits // 8), 4)
    return min(tags.get(278, height), height) * row_bytes  # RowsPerStrip


def _cost(
    image: Image.Image,
    fmt: str,
    data: bytes,
    original: tuple[int, int],
    orientation: int,
    input_size: tuple[int, int],
) -> int:
    """Estimated peak bytes of finish(): the loaded image and its decoder's buffers, the image
    resized by the first pass, strips and slack (bench/decode_memory.py has the measurements)."""
    width, height = image.size  # as loaded: after draft
    storage = _STORAGE.get(image.mode, 4)
    cost = width * height * (storage + _DECODER_EXTRA.get(fmt, 0)) + _OVERHEAD
    shown_w, shown_h = (width, height)
    if orientation in _TRANSPOSING and not _orients_itself(fmt):
        shown_w, shown_h = height, width
    target_h, target_w = input_size
    half = (
        shown_w * target_h
        if _vertical_pass_first(shown_w, shown_h, target_w, target_h)
        else shown_h * target_w
    )
    cost += half * (1 if image.mode in _GREY_MODES else 4)
    if fmt in ("JPEG", "MPO") and _jpeg_buffered(data, len(getattr(image, "layer", ())) or 3):
        cost += _jpeg_coefficient_bytes(image, original)
    if fmt == "TIFF":
        if getattr(image, "use_load_libtiff", True):  # Pillow reads uncompressed TIFFs itself
            cost += _tiff_strip_bytes(image)
        if _orients_itself(fmt) and orientation != 1:
            cost += width * height * storage  # Pillow's transposed copy, made while loading
    return cost


# --- The two steps ------------------------------------------------------------------------------


def open_image(data: bytes, input_size: tuple[int, int], max_pixels: int, draft: bool = True) -> Opened:
    """Read and check the header of ``data``; no pixel is decoded. Raises ImageError. ``draft``
    False keeps a JPEG at full resolution (tiles are cut from it)."""
    fmt = sniff(data)
    if fmt == "WEBP":
        size = _webp_size(data)
        if size is None:
            raise ImageError("the WebP header cannot be read")
        _check_pixels(*size, max_pixels)
    _keep_pillow_guard_above(max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"the data starts as {fmt} but its header cannot be read") from exc
    except Exception as exc:
        raise ImageError(f"the {fmt} header cannot be read: {exc}") from exc
    try:
        width, height = image.size
        _check_pixels(width, height, max_pixels)
        if fmt == "BMP" and decoder_name(image) == "bmp_rle" and width * height > RLE_BMP_MAX_PIXELS:
            raise ImageTooLarge(
                f"the image is a run-length-encoded BMP of {width}x{height} = {width * height} pixels; "
                f"the limit for those is {RLE_BMP_MAX_PIXELS}"
            )
        orientation = _orientation(image)
        target_h, target_w = input_size
        if _orients_itself(fmt):
            shown = (width, height)  # Pillow reports the size after orientation already
        else:
            shown = (height, width) if orientation in _TRANSPOSING else (width, height)
        if draft and image.format in ("JPEG", "MPO"):
            # draft() keeps the image at least this large; ask in the file's own orientation.
            want = (target_h, target_w) if orientation in _TRANSPOSING else (target_w, target_h)
            image.draft("RGB", want)
        cost = _cost(image, image.format or fmt, data, (width, height), orientation, input_size)
        return Opened(image, image.format or fmt, *shown, orientation, cost, image.size)
    except BaseException:
        image.close()
        raise


def finish(
    opened: Opened, input_size: tuple[int, int], max_pixels: int, rects: Sequence[Rect] = ()
) -> Decoded:
    """Decode the pixels of ``opened`` into the model input, and each tile of ``rects`` (in the
    oriented image's pixels) into one more. Raises ImageError. Closes the image."""
    image, fmt = opened.image, opened.format
    try:
        orientation, width, height = _load(opened, max_pixels)
        try:
            pixels = _model_input(image, orientation, input_size)
            tiles = _tiles(image, orientation, input_size, rects, width, height) if rects else None
        except Exception as exc:  # a mode that cannot become RGB (LAB, ...)
            raise ImageError(f"the {fmt} image ({image.mode}) cannot be converted to RGB: {exc}") from exc
    finally:
        image.close()
    return Decoded(pixels, width, height, tiles, tuple(rects) if tiles is not None else ())


def _load(opened: Opened, max_pixels: int) -> tuple[int, int, int]:
    """The pixels of ``opened`` loaded and checked; its orientation still to apply, and its size
    once applied."""
    image, fmt = opened.image, opened.format
    try:
        image.load()  # the current frame only: the first, as nothing has seeked
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:  # truncated data, bad chunks, decoder errors
        raise ImageError(f"the {fmt} image is corrupt or truncated: {exc}") from exc
    _check_loaded(image, opened.declared, max_pixels)
    orientation, width, height = opened.orientation, opened.width, opened.height
    if fmt == "PNG" and "exif" in image.info:
        late = _png_orientation(image.info["exif"])  # an eXIf chunk after the pixels
        if late not in (None, orientation):
            if (late in _TRANSPOSING) != (orientation in _TRANSPOSING):
                width, height = height, width
            orientation = late
    if _orients_itself(fmt):
        orientation = 1  # applied by Pillow while loading
    return orientation, width, height


def _tiles(
    image: Image.Image,
    orientation: int,
    input_size: tuple[int, int],
    rects: Sequence[Rect],
    width: int,
    height: int,
) -> np.ndarray:
    """Each tile of the oriented image, converted as ``_model_input`` converts the whole and
    resized to the input size. Only a tile at a time is ever copied out of the loaded image."""
    target_h, target_w = input_size
    _, convert = _converter(image)
    method = _TRANSPOSE.get(orientation)
    out = np.empty((len(rects), target_h, target_w, 3), dtype=np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        # A late PNG orientation may have turned the image after the grid was drawn: clip.
        box = (min(x0, width - 1), min(y0, height - 1), max(min(x1, width), 1), max(min(y1, height), 1))
        tile = image.crop(_source_box(orientation, *image.size, box))
        if method is not None:
            tile = tile.transpose(method)
        tile = convert(tile)
        out[k] = np.asarray(tile.resize((target_w, target_h), Image.Resampling.BILINEAR).convert("RGB"))
    return out


def tile_cost(rects: Sequence[Rect], input_size: tuple[int, int]) -> int:
    """Bytes the tiles add to an image's decoding: the largest tile copied out (at most 4 bytes a
    pixel, with its conversion) and every tile's model input."""
    if not rects:
        return 0
    largest = max((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects)
    return 2 * 4 * largest + len(rects) * input_size[0] * input_size[1] * 3


def oriented_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's width and height as people see it (after EXIF orientation), from its header
    alone; the same checks and errors as ``open_image``."""
    opened = open_image(data, (1, 1), max_pixels, draft=False)
    opened.close()
    return opened.width, opened.height


def decode(data: bytes, input_size: tuple[int, int], max_pixels: int) -> Decoded:
    """Image file bytes -> pixels resized to ``input_size`` (H, W). Raises ImageError."""
    return finish(open_image(data, input_size, max_pixels), input_size, max_pixels)


def _check_loaded(image: Image.Image, declared: tuple[int, int], max_pixels: int) -> None:
    """A file may declare one size and hold another (a container around a bigger picture)."""
    core = image.im.size
    if image.size == declared and core == declared:
        return
    width, height = max(image.size, core, key=lambda s: s[0] * s[1])
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image declared {declared[0]}x{declared[1]} pixels but holds {width}x{height}; "
            f"the limit is {max_pixels}"
        )
    raise ImageError(f"the image declared {declared[0]}x{declared[1]} pixels but holds {width}x{height}")


def _png_orientation(raw: bytes) -> int | None:
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112)
    except Exception:
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


# --- Pixels to model input ----------------------------------------------------------------------


def _model_input(image: Image.Image, orientation: int, input_size: tuple[int, int]) -> np.ndarray:
    target_h, target_w = input_size
    if orientation == 1 and image.mode in ("RGB", "L"):
        # Pillow resizes these as they are, and L -> RGB copies one band into three: converting
        # after the resize gives the same pixels without a full-size copy.
        return np.asarray(image.resize((target_w, target_h), Image.Resampling.BILINEAR).convert("RGB"))
    # Every other case goes strip by strip, in the orientation people see: each strip is cut from
    # the source, oriented, made RGB (or L) and resized along its length; then the whole across.
    # Pillow's bilinear resize is these two passes, each rounded to 8 bits: done in the order
    # Pillow does them, the pixels are those of orienting, converting and resizing all at once.
    width, height = image.size
    shown_w, shown_h = (height, width) if orientation in _TRANSPOSING else (width, height)
    mode, convert = _converter(image)
    method = _TRANSPOSE.get(orientation)
    if _vertical_pass_first(shown_w, shown_h, target_w, target_h):
        step = max(1, _STRIP_PIXELS // shown_h)
        half = Image.new(mode, (shown_w, target_h))
        boxes = [(x, 0, min(shown_w, x + step), shown_h) for x in range(0, shown_w, step)]
    else:
        step = max(1, _STRIP_PIXELS // shown_w)
        half = Image.new(mode, (target_w, shown_h))
        boxes = [(0, y, shown_w, min(shown_h, y + step)) for y in range(0, shown_h, step)]
    for box in boxes:
        strip = image.crop(_source_box(orientation, width, height, box))
        if method is not None:
            strip = strip.transpose(method)
        strip = convert(strip)
        if half.width == target_w:  # rows: resize across; columns: resize down
            size, at = (target_w, strip.height), (0, box[1])
        else:
            size, at = (strip.width, target_h), (box[0], 0)
        half.paste(strip.resize(size, Image.Resampling.BILINEAR), at)
    return np.asarray(half.resize((target_w, target_h), Image.Resampling.BILINEAR).convert("RGB"))


def _source_box(
    orientation: int, width: int, height: int, box: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """The part of the ``width`` x ``height`` source that becomes ``box`` once oriented."""
    x0, y0, x1, y1 = box
    return {
        1: (x0, y0, x1, y1),
        2: (width - x1, y0, width - x0, y1),
        3: (width - x1, height - y1, width - x0, height - y0),
        4: (x0, height - y1, x1, height - y0),
        5: (y0, x0, y1, x1),
        6: (y0, height - x1, y1, height - x0),
        7: (width - y1, height - x1, width - y0, height - x0),
        8: (width - y1, x0, width - y0, x1),
    }[orientation]


# Which of its two passes Pillow runs first is an implementation detail (always the horizontal one
# up to Pillow 12; Pillow 13 starts with the vertical one when the height shrinks by more than
# twice what the width does). The first call finds out which rule this Pillow follows from a few
# small resizes whose result tells the order; a Pillow following neither gets horizontal first,
# and pixels a grey level off at most where it differs.
_PASS_ORDER_RULES: tuple[Callable[[int, int, int, int], bool], ...] = (
    lambda w0, h0, w1, h1: h1 < h0 and h0 - h1 > 2 * (w0 - w1),
    lambda w0, h0, w1, h1: False,
)
_PASS_ORDER_PROBES = (
    (61, 97, 80, 64),
    (97, 61, 120, 40),
    (97, 61, 80, 40),
    (200, 200, 120, 20),
    (200, 200, 120, 40),
    (200, 200, 150, 80),
    (200, 200, 150, 100),
    (40, 400, 30, 60),
)


@functools.cache
def _pass_order_rule() -> Callable[[int, int, int, int], bool]:
    bilinear = Image.Resampling.BILINEAR
    observed: list[tuple[tuple[int, int, int, int], bool]] = []
    for seed, (w0, h0, w1, h1) in enumerate(_PASS_ORDER_PROBES):
        probe = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h0, w0), dtype=np.uint8))
        whole = np.asarray(probe.resize((w1, h1), bilinear))
        across = np.array_equal(
            whole, np.asarray(probe.resize((w1, h0), bilinear).resize((w1, h1), bilinear))
        )
        down = np.array_equal(whole, np.asarray(probe.resize((w0, h1), bilinear).resize((w1, h1), bilinear)))
        if across != down:  # else this probe cannot tell
            observed.append(((w0, h0, w1, h1), down))
    if not observed:
        return _PASS_ORDER_RULES[-1]
    for rule in _PASS_ORDER_RULES:
        if all(rule(*sizes) == down for sizes, down in observed):
            return rule
    return _PASS_ORDER_RULES[-1]


def _vertical_pass_first(width: int, height: int, target_w: int, target_h: int) -> bool:
    return _pass_order_rule()(width, height, target_w, target_h)


def _converter(image: Image.Image) -> tuple[str, Callable[[Image.Image], Image.Image]]:
    """The mode strips are resized in, and how a strip of ``image`` becomes it. Greys stay one
    band until the end: L -> RGB copies the band into three, so it commutes with the resize."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return mode, lambda strip: strip
    if mode in _WIDE_MODES:
        low, high = _extrema(image)
        return "L", lambda strip: _to_8bit(strip, low, high)
    if mode == "1":
        return "L", lambda strip: strip.convert("L")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return "RGB", _on_white
    return "RGB", lambda strip: strip.convert("RGB")


def _on_white(strip: Image.Image) -> Image.Image:
    rgba = strip.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _extrema(image: Image.Image) -> tuple[float, float]:
    if image.mode != "F":
        low, high = image.getextrema()
        return low, high
    # Floats may hold NaN or infinities: the range of the finite values, strip by strip.
    low, high = np.inf, -np.inf
    rows = max(1, _STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        values = np.asarray(image.crop((0, top, image.width, min(image.height, top + rows))))
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else (0.0, 0.0)


def _to_8bit(strip: Image.Image, low: float, high: float) -> Image.Image:
    """A wide grey strip scaled from [low, high] of the whole image to 0..255, without float64."""
    values = np.asarray(strip)
    if high <= low:
        return Image.new("L", strip.size, 0)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float32, copy=False), nan=low, posinf=high, neginf=low)
        scaled = (np.clip(values, low, high) - np.float32(low)) * np.float32(255.0 / (high - low))
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    low, span = int(low), int(high) - int(low)
    scaled = values.astype(np.int32 if span * 255 < 2**31 else np.int64)
    scaled -= low  # in place: one strip-sized buffer
    scaled *= 255
    scaled //= span
    return Image.fromarray(scaled.astype(np.uint8))
