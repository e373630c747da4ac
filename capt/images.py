"""The one way an image becomes pixels, for training, evaluation, export samples and serving.

Bytes or a file become 8-bit RGB through :func:`decode_image` (EXIF orientation honoured, alpha
composited on white, 16-bit rescaled, CMYK and palette converted, the first frame of an animation),
and RGB becomes a ``[3, H, W]`` tensor in [0, 1] through :func:`pixel_transform`, open_clip's own
eval transform with identity mean/std: normalisation lives inside the model, so attacks, eps and the
served input are all in pixel space.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class UnreadableImage(ValueError):
    """The bytes are not an image that will be decoded; the message says why."""


def decode_image(data: bytes, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Untrusted bytes -> RGB. ``max_bytes`` and ``max_pixels`` (the declared size, checked before the
    pixels are decoded) refuse large inputs; PIL's own decompression-bomb limit applies as well."""
    return load_opened_image(open_image(data, max_bytes, max_pixels))


def open_image(data: bytes, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The first half of :func:`decode_image`: the header read and checked, the pixels not yet
    decoded (``.size`` says how many there will be: the server decodes small images on its event loop
    and large ones on a thread). Finish with :func:`load_opened_image`."""
    if not data:
        raise UnreadableImage("empty image upload")
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableImage(f"image of {len(data)} bytes is over the limit of {max_bytes} bytes")
    with _decoding_errors():
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise UnreadableImage(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
    return image


def load_opened_image(image: Image.Image) -> Image.Image:
    """An image from :func:`open_image`, decoded to RGB (the first frame, EXIF orientation applied to it
    in place: the result may be that image object itself)."""
    with _decoding_errors():
        image.seek(0)  # animated images: the first frame
        image.load()
        # In place: without an orientation tag exif_transpose returns a copy (36 MB at 12 megapixels).
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


@contextlib.contextmanager
def _decoding_errors() -> Iterator[None]:
    """PIL's errors and decompression-bomb warnings as UnreadableImage, with messages for clients."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnreadableImage:
        raise
    except UnidentifiedImageError as err:  # PIL's message names an internal buffer object: not for clients
        raise UnreadableImage("not a readable image: no image format recognised") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(f"not a readable image: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise UnreadableImage(f"corrupt or truncated image: {err}") from err


def load_image_file(path: str | Path) -> Image.Image:
    """An image file from a dataset, decoded exactly as an upload of the same bytes would be."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes())
    except UnreadableImage as err:
        raise UnreadableImage(f"{path}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the model sees it: transparency composited on white (as a browser shows it),
    16-bit and float greys rescaled rather than clipped (PIL's own convert saturates them to white),
    CMYK, YCbCr, palette and the rest through PIL's conversions. An RGB image comes back as it is, not copied."""
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
    # convert("RGB") of an RGB image is a copy of it: the image itself is the same pixels.
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, preprocess_cfg: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the image :func:`pixel_transform` resizes a ``width`` x ``height`` image to
    before it crops or pads, as open_clip's eval transform computes it. With ``resize_mode``
    "shortest" (open_clip's default) the shortest side becomes the model's and the other keeps the
    aspect ratio: a 16384x1 strip of a few bytes becomes 64 x 1,048,576 pixels for a 64-pixel model.
    With "longest" a side can become 0 (torchvision then refuses to resize)."""
    size = preprocess_cfg["size"]
    target_height, target_width = (size, size) if isinstance(size, int) else tuple(size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "squash" or min(width, height) < 1:
        return target_width, target_height
    if mode == "shortest" and target_height == target_width:  # torchvision's Resize(int): long side truncated
        short, long = sorted((width, height))
        new_long = int(target_width * long / short)
        return (target_width, new_long) if width <= height else (new_long, target_width)
    # open_clip's ResizeKeepRatio (non-square "shortest", and "longest"): both sides rounded.
    ratios = (height / target_height, width / target_width)
    ratio = max(ratios) if mode == "longest" else min(ratios)
    return round(width / ratio), round(height / ratio)


def pixel_transform(preprocess_cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """RGB image -> float tensor in [0, 1]: open_clip's eval transform for this model's preprocessing
    (size, resize mode, interpolation, fill colour) with identity mean/std. Images that are not RGB
    yet go through :func:`to_rgb` first, so a PIL image made in memory is treated like a file."""
    import open_clip

    transform = open_clip.image_transform(
        preprocess_cfg["size"], is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
        interpolation=preprocess_cfg.get("interpolation", "bicubic"),
        fill_color=preprocess_cfg.get("fill_color", 0))

    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    def to_pixels(image: Image.Image) -> torch.Tensor:
        image = image if image.mode == "RGB" else to_rgb(image)
        if image.size == (width, height):
            # Resize and crop leave an image of the model's size as it is (PIL's resize to the same size
            # is a copy): ToTensor alone, bit for bit (an IEEE float32 division either way), in numpy: it
            # is held under the GIL for every served image, and torch's per-op dispatch was most of it
            # (torchvision 49 us, five torch ops 28 us, this 14 us at 64x64 on an AMD EPYC Zen 5).
            channels_first = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
            return torch.from_numpy(np.divide(channels_first, np.float32(255), dtype=np.float32, order="C"))
        return transform(image)
    return to_pixels
