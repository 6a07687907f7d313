import io

import numpy as np
import pytest
from PIL import Image

from backends import images
from backends.errors import ImageError, ImageTooLarge


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(width=64, height=48) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = x
    rgb[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    rgb[..., 2] = 128
    return rgb


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB", "1"])
def test_every_mode_decodes_to_rgb(mode):
    img = Image.fromarray(_gradient()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "CMYK" else "TIFF"
    out = images.decode(_bytes(img, fmt))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    out = images.decode(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out == 255).all()


def test_16_bit_png_uses_its_range():
    arr = np.tile(np.linspace(1000, 3000, 32).astype(np.uint16), (8, 1))
    out = images.decode(_bytes(Image.fromarray(arr), "PNG"))
    assert out.shape == (8, 32, 3)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255  # stretched, not truncated


def test_exif_orientation_is_applied():
    img = Image.fromarray(_gradient(60, 20))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = images.decode(_bytes(img, "JPEG", exif=exif))
    assert out.shape[:2] == (60, 20)  # shown tall, as the annotation tool shows it


def test_non_image_and_truncated_bytes_raise_image_error():
    with pytest.raises(ImageError):
        images.decode(b"")
    with pytest.raises(ImageError):
        images.decode(b"<html>login required</html>")
    data = _bytes(Image.fromarray(_gradient()), "PNG")
    with pytest.raises(ImageError):
        images.decode(data[: len(data) // 2])


def test_pixel_limit_rejects_bombs_from_the_header():
    big = _bytes(Image.new("L", (5000, 5000)), "PNG")  # 25 MP, a few KB compressed
    with pytest.raises(ImageTooLarge, match="MP"):
        images.decode(big, limit=10_000_000)
    assert images.decode(big, limit=30_000_000).shape == (5000, 5000, 3)


def test_sha256_is_the_file_hash():
    assert images.sha256(b"abc").startswith("ba7816bf")
