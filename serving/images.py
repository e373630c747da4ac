"""Untrusted image bytes from requests: uploads and base64, decoded by ``capt.images`` (the one
decoder of training, evaluation and serving) within the server's limits; refusals are 400s."""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
from pathlib import Path
from typing import Iterator

from PIL import Image

from capt import images

from .errors import ImageRejected, RequestError


# Uploads the server's event loop reads and decodes itself (the multipart /classify), where decoding and
# the pixel transform take about as long as handing the work to a thread would cost the loop: measured
# (PNG, 2 cores of an AMD EPYC) 0.08-0.10 ms at 64x64, 0.27-0.48 ms at 128x128, 1.1-1.4 ms at 256x256
# and 4.0-5.0 ms at 512x512, during which no other request in flight moves. Larger ones go to a thread.
INLINE_UPLOAD_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 128 * 128


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Untrusted upload bytes -> RGB through the one decoder of ``capt.images``; refusals are 400s."""
    with _rejected():
        return images.decode_image(data, max_bytes, max_pixels)


def read_upload(path: Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """A multipart upload that BentoML has spooled to a temporary file."""
    return load_upload(open_upload(path, max_bytes, max_pixels))


def open_upload(path: Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """The first half of ``read_upload``: the size limits checked and the header read (``.size``),
    the pixels not yet decoded; ``load_upload`` decodes them."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageRejected(f"image of {size} bytes is over the limit of {max_bytes} bytes")
    with _rejected():
        return images.open_image(path.read_bytes(), max_bytes, max_pixels)


def load_upload(image: Image.Image) -> Image.Image:
    with _rejected():
        return images.load_opened_image(image)


def reads_inline(path: Path) -> bool:
    """Whether an upload is small enough for the event loop to read and open itself."""
    return path.stat().st_size <= INLINE_UPLOAD_BYTES


def decodes_inline(image: Image.Image, resized_pixels: int) -> bool:
    """Whether an opened upload (``open_upload``) is small enough for the event loop to decode and
    transform: the upload itself and the image the model's preprocessing resizes it to
    (``ServingModel.resized_pixels``: a thin strip of few pixels can resize to millions)."""
    width, height = image.size
    return width * height <= INLINE_DECODE_PIXELS and resized_pixels <= INLINE_DECODE_PIXELS


@contextlib.contextmanager
def _rejected() -> Iterator[None]:
    try:
        yield
    except images.UnreadableImage as err:
        raise ImageRejected(str(err)) from err


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
