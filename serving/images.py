"""Decoding untrusted image bytes: size limits, decompression bombs, EXIF orientation, odd modes."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageRejected


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty image upload")
    if len(data) > max_bytes:
        raise ImageRejected(f"image of {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
            image.seek(0)  # animated images: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError as err:  # PIL's message names an internal buffer object: not for clients
        raise ImageRejected("not a readable image: no image format recognised") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"not a readable image: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise ImageRejected(f"corrupt or truncated image: {err}") from err
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the model sees it: transparency composited on white (as a browser shows it),
    16-bit and float greys rescaled rather than clipped (PIL's own convert saturates them to white),
    CMYK, YCbCr, palette and the rest through PIL's conversions."""
    if image.mode.startswith("I"):  # integer greys, read as 16-bit (how PNG and TIFF store them)
        values = np.asarray(image, dtype=np.float64)
        scale = 1 / 257 if image.mode != "I" or values.max() > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min()), float(values.max())
        grey = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(grey.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def read_upload(path: Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """A multipart upload that BentoML has spooled to a temporary file."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageRejected(f"image of {size} bytes is over the limit of {max_bytes} bytes")
    return decode_image(path.read_bytes(), max_bytes, max_pixels)


def decode_base64_image(text: str, max_bytes: int, max_pixels: int) -> Image.Image:
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRejected(f"image is not valid base64: {err}") from err
    return decode_image(data, max_bytes, max_pixels)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
