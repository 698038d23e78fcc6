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
#: libjpeg's largest side: reachable by a 50:1 strip once ANON_MAX_OUTPUT_PIXELS is raised past
#: about 86 MP, where Pillow's untyped OSError would read as an internal error
JPEG_MAX_SIDE = 65500


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
        # No exif=, icc_profile= or comment= arguments: the file carries pixels only. Baseline,
        # not progressive: at 1920x1088 a progressive file took 34 ms to write against 14 ms
        # (the largest CPU cost of a GPU worker's photo) for a file only 4 % smaller.
        image.save(buffer, format="JPEG", quality=quality, optimize=True, subsampling="4:2:0")
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
    if max(image.size) > JPEG_MAX_SIDE:
        raise OutputTooLarge(
            f"The anonymised image is {image.width}x{image.height}; a JPEG cannot be wider or taller "
            f"than {JPEG_MAX_SIDE:,} pixels (lower ANON_MAX_OUTPUT_PIXELS)."
        )
    for quality in JPEG_QUALITIES:
        data = _save(image, "jpeg", quality)
        if len(data) <= max_bytes:
            return Encoded(data, "jpeg", "image/jpeg")
    raise OutputTooLarge(
        f"The anonymised image does not fit in {max_bytes:,} bytes even as JPEG quality {JPEG_QUALITIES[-1]}."
    )


def output_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    factor = (max_pixels / (width * height)) ** 0.5
    out_w, out_h = max(1, int(width * factor)), max(1, int(height * factor))
    # A side clamped up to 1 px must be paid for by the other side.
    if out_w * out_h > max_pixels:
        if out_w == 1:
            out_h = max_pixels
        else:
            out_w = max(1, max_pixels // out_h)
    return out_w, out_h
