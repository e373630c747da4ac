"""Decoding untrusted image bytes (serving/images.py): refusals and conversions, checked on pixels."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import png_bytes
from serving.errors import ImageRejected
from serving.images import decode_base64_image, decode_image

LIMITS = dict(max_bytes=2_000_000, max_pixels=4_000_000)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no data: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"certainly not an image", "not a readable image"),
    (png_bytes(Image.new("RGB", (64, 64), (10, 20, 30)))[:120], "truncated"),
    (png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")[:600], "truncated"),
    (bomb_png(30000, 30000), "decompression bomb"),
    (bomb_png(3000, 3000), "over the limit of 4000000 pixels"),
    (b"\0" * 2_000_001, "over the limit of 2000000 bytes"),
])
def test_bad_bytes_are_refused_with_a_reason(data, message):
    with pytest.raises(ImageRejected, match=message):
        decode_image(data, **LIMITS)


def test_base64_must_be_valid():
    with pytest.raises(ImageRejected, match="base64"):
        decode_base64_image("not base64!", **LIMITS)
    data_url = "data:image/png;base64," + __import__("base64").b64encode(png_bytes(Image.new("RGB", (4, 4)))).decode()
    assert decode_base64_image(data_url, **LIMITS).size == (4, 4)


def _pixel(image: Image.Image) -> tuple:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


@pytest.mark.parametrize("image,format,expected", [
    (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),                  # red in CMYK
    (Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG", (128, 128, 128)),         # 16-bit grey, not clipped white
    (Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),                            # fully transparent: white
    (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG", (255, 127, 127)),                # half-transparent red on white
    (Image.new("L", (8, 8), 77), "PNG", (77, 77, 77)),
    (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
    (Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F"), "TIFF", (0, 0, 0)),       # constant float: black
])
def test_modes_are_converted_to_rgb(image, format, expected):
    decoded = decode_image(png_bytes(image, format), **LIMITS)
    assert decoded.mode == "RGB" and decoded.size == image.size
    assert _pixel(decoded) == pytest.approx(expected, abs=2)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 1)
    decoded = decode_image(png_bytes(image, transparency=0), **LIMITS)
    assert _pixel(decoded) == (0, 0, 255) and tuple(np.asarray(decoded)[4, 4]) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    assert _pixel(decode_image(buffer.getvalue(), **LIMITS)) == pytest.approx((255, 0, 0), abs=2)


def test_exif_orientation_is_honoured():
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = (255, 0, 0)  # left half red, right half blue
    upright[:, 20:] = (0, 0, 255)
    # Stored rotated by 90 degrees, with orientation 8 (rotate 90 CW to display): what a phone writes.
    stored = Image.fromarray(np.rot90(upright, k=-1).copy())
    exif = Image.Exif()
    exif[0x0112] = 8
    decoded = np.asarray(decode_image(png_bytes(stored, "JPEG", exif=exif, quality=95), **LIMITS)).astype(int)
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright).mean() < 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_pils_own_transposed_pixels(orientation):
    """decode_image transposes in place and skips RGB's self-copy (two 36 MB copies at 12 megapixels);
    the pixels must be those of PIL's copying exif_transpose + convert, for each of the 8 orientations."""
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png_bytes(stored, "JPEG", exif=exif, quality=95)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, **LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.getexif().get(0x0112, 1) == 1  # the tag is consumed, so nothing transposes it again
    np.testing.assert_array_equal(np.asarray(decoded), reference)
    assert reference.shape[:2] == ((20, 12) if orientation >= 5 else (12, 20))


@pytest.mark.parametrize("size, image_size", [
    ((64, 64), (64, 64)),   # the model's size: the fast path
    ((48, 64), (64, 48)),   # non-square, (height, width) against PIL's (width, height)
    ((64, 64), (80, 64)),   # other sizes go through the resize and crop
    ((64, 64), (64, 80)),
    ((48, 64), (48, 64)),   # transposed: not the model's size
])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_pixels_equal_open_clips_eval_transform(size, image_size, resize_mode):
    import open_clip
    import torch

    from capt.images import pixel_transform

    cfg = {"size": size, "interpolation": "bicubic", "resize_mode": resize_mode, "fill_color": 0}
    reference = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                          resize_mode=resize_mode, interpolation="bicubic", fill_color=0)
    rng = np.random.default_rng(sum(size) + sum(image_size))
    image = Image.fromarray(rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8))
    pixels = pixel_transform(cfg)(image)
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert pixels.shape == (3, *size)
    assert torch.equal(pixels, reference(image))


@pytest.mark.parametrize("size", [64, (48, 64)])
@pytest.mark.parametrize("image_size", [(64, 64), (2048, 8), (8, 2048), (333, 97), (1, 1)])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_resized_size_is_that_of_open_clips_resize(size, image_size, resize_mode):
    # capt.images.resized_size predicts, from the header alone, the size of open_clip's first (resize) step.
    import open_clip

    from capt.images import resized_size
    resize = open_clip.image_transform(size, is_train=False, resize_mode=resize_mode, interpolation="bicubic").transforms[0]
    predicted = resized_size(*image_size, {"size": size, "resize_mode": resize_mode})
    if min(predicted) == 0:  # "longest" of a thin strip: torchvision refuses, the server says 400 first
        with pytest.raises(ValueError, match="must be > 0"):
            resize(Image.new("RGB", image_size))
    else:
        assert predicted == resize(Image.new("RGB", image_size)).size
