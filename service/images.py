"""Image bytes to model input: decode safely, orient, convert to RGB, resize.

- The pixel count is checked from the header, before any pixel is decoded: a decompression bomb
  is refused without being decoded.
- JPEGs decode in draft mode at the smallest DCT scale still at least the model's input size:
  a 12-megapixel photo for a 320x320 model decodes at 1/8 scale, about 20x faster.
- EXIF orientation is applied, so boxes are in the pixels people see; the first frame of
  animations is used; every mode (L, LA, P, RGBA, CMYK, I;16, ...) becomes RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We check pixel counts ourselves (ImageTooLarge); Pillow's own bomb guard would only warn or
# raise with a less useful message.
Image.MAX_IMAGE_PIXELS = None

# EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_TRANSPOSING = {5, 6, 7, 8}


class ImageError(ValueError):
    """A problem with one image; ``status`` is the HTTP status it maps to."""

    status = 400
    code = "invalid_image"


class ImageTooLarge(ImageError):
    status = 413
    code = "image_too_large"


class NotAnImage(ImageError):
    status = 415
    code = "unsupported_media_type"


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 [H, W, 3] at the model's input size
    width: int  # of the original image, after EXIF orientation
    height: int


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greys: scale to 8 bits on their own range (what a viewer shows).
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, input_size: tuple[int, int], max_pixels: int) -> Decoded:
    """Image file bytes -> pixels resized to ``input_size`` (H, W). Raises ImageError."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise NotAnImage(
            "the data is not an image format we can read (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from exc
    except Exception as exc:
        raise ImageError(f"the image header cannot be read: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1  # a broken EXIF block is not a broken image
    if orientation in _TRANSPOSING:
        width, height = height, width
    target_h, target_w = input_size
    try:
        if image.format == "JPEG":
            # draft() keeps the image at least this large; ask in the file's own orientation.
            want = (target_h, target_w) if orientation in _TRANSPOSING else (target_w, target_h)
            image.draft("RGB", want)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image) if orientation != 1 else image
        image = _to_rgb(image)
        resized = image.resize((target_w, target_h), Image.Resampling.BILINEAR)
    except ImageError:
        raise
    except Exception as exc:  # truncated data, bad chunks, decoder errors
        raise ImageError(f"the image is corrupt or truncated: {exc}") from exc
    return Decoded(np.asarray(resized, dtype=np.uint8), width, height)
