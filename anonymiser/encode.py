"""An anonymised array out as clean bytes: no metadata at all, sRGB, within the output limits.

The image is rebuilt from a bare pixel array, so no EXIF (GPS, maker notes, thumbnails), XMP,
IPTC, ICC profile or comment from the input can reach the output: there is nothing to strip
because nothing is carried over. The orientation was applied when decoding, so the pixels are
upright and no orientation tag is needed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import OutputTooLarge

JPEG_QUALITIES = (90, 82, 72, 60)


@dataclass(frozen=True)
class Encoded:
    """Encoded output bytes with their format and MIME type."""

    data: bytes
    format: str
    mime: str


def output_format(input_format: str) -> str:
    """PNG and GIF inputs (screenshots, graphics) stay lossless; photos become JPEG."""
    return "png" if input_format in ("png", "gif") else "jpeg"


def _save(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        # No exif=, icc_profile= or comment= arguments: the file carries pixels only.
        image.save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True, subsampling="4:2:0")
    return buffer.getvalue()


def encode(rgb: np.ndarray, fmt: str, max_bytes: int) -> Encoded:
    """Encode ``rgb`` (``uint8 [H, W, 3]``, opaque) as ``fmt`` within ``max_bytes``.

    A PNG too big for the limit falls back to JPEG; JPEG quality steps down until it fits.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("encode expects an opaque uint8 RGB array")
    image = Image.fromarray(rgb, mode="RGB")
    if fmt == "png":
        data = _save(image, "png", 0)
        if len(data) <= max_bytes:
            return Encoded(data, "png", "image/png")
    for quality in JPEG_QUALITIES:
        data = _save(image, "jpeg", quality)
        if len(data) <= max_bytes:
            return Encoded(data, "jpeg", "image/jpeg")
    raise OutputTooLarge(
        f"The anonymised image does not fit in {max_bytes:,} bytes even as JPEG quality {JPEG_QUALITIES[-1]}."
    )


def output_scale(width: int, height: int, max_pixels: int) -> float:
    """The factor (<= 1) that brings ``width * height`` within ``max_pixels``."""
    pixels = width * height
    if pixels <= max_pixels:
        return 1.0
    return (max_pixels / pixels) ** 0.5 * 0.999
