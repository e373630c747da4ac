"""Untrusted image bytes from requests: uploads and base64, decoded by ``capt.images`` (the one
decoder of training, evaluation and serving) within the server's limits; refusals are 400s."""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image

from capt import images

from .errors import ImageRejected, RequestError


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Untrusted upload bytes -> RGB through the one decoder of ``capt.images``; refusals are 400s."""
    try:
        return images.decode_image(data, max_bytes, max_pixels)
    except images.UnreadableImage as err:
        raise ImageRejected(str(err)) from err


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


def refuse_image_url(text: str) -> None:
    """Images are bytes in the request; a URL is never fetched (a server-side request to wherever a
    client points)."""
    if text.strip()[:8].lower().startswith(("http://", "https://")):
        raise RequestError("images given as http(s) URLs are not fetched: send the image's bytes as base64 "
                           "(or a data: URL)")
