"""Decoding untrusted image bytes: size limits, decompression bombs, EXIF orientation, odd modes."""
from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageRejected(ValueError):
    """The bytes are not an image this server will decode; the message says why."""


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
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"not a readable image: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise ImageRejected(f"corrupt or truncated image: {err}") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


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
