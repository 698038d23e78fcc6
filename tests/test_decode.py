"""Decoding: every accepted format to an upright, opaque sRGB ``uint8 [H, W, 3]`` array, and a
typed, explained error for everything else, with budgets enforced before pixels are decoded."""

from __future__ import annotations

import io
import resource
import time
import zlib
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, features

from anonymiser import errors
from anonymiser.decode import (
    FLATTEN_BACKGROUND,
    MAX_GIF_BLOCKS,
    MAX_JPEG_FILL,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    decode,
    gif_blocks,
    jpeg_layout,
    sniff,
    without_png_text,
)
from anonymiser.limits import Limits

from imaging import (
    low_bit_grey_png_bytes,
    animated_bytes,
    cmyk_jpeg_bytes,
    exif_block,
    gif_bytes,
    grey_jpeg_bytes,
    SRGB_BLUE,
    SRGB_GREEN,
    SRGB_RED,
    chained_float_tag,
    heic_bytes,
    icc_rgb_profile,
    jpeg_bytes,
    jpeg_with_metadata,
    orient_expected,
    palette_png_bytes,
    pattern_image,
    png16_rgb_bytes,
    png_bomb_bytes,
    png_bytes,
    png_with_metadata,
    save,
    srgb_icc_profile,
    swapped_icc_profile,
    webp_bytes,
)

PATTERN = pattern_image()


def assert_rgb_array(rgb: np.ndarray, shape: tuple[int, int]) -> None:
    """The decoder's contract: a contiguous ``uint8 [H, W, 3]`` array of the given size."""
    assert rgb.dtype == np.uint8
    assert rgb.shape == (*shape, 3)
    assert rgb.flags["C_CONTIGUOUS"]


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------- formats

LOSSY = {
    "jpeg baseline": lambda: jpeg_bytes(PATTERN),
    "jpeg progressive": lambda: jpeg_bytes(PATTERN, progressive=True),
    "webp lossy": lambda: webp_bytes(PATTERN),
    "heic": lambda: heic_bytes(PATTERN),
}
LOSSLESS = {
    "png rgb": lambda: png_bytes(PATTERN),
    "webp lossless": lambda: webp_bytes(PATTERN, lossless=True),
    "gif still": lambda: gif_bytes(PATTERN),  # 4 colours: the palette holds them exactly
}
FORMAT_NAMES = {"jpeg": "jpeg", "webp": "webp", "heic": "heif", "png": "png", "gif": "gif"}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_formats_decode_to_close_pixels(name: str) -> None:
    """JPEG (baseline and progressive), lossy WebP and HEIC give the right pixels, approximately."""
    decoded = decode(LOSSY[name]())
    assert_rgb_array(decoded.rgb, PATTERN.shape[:2])
    assert decoded.format == FORMAT_NAMES[name.split()[0]]
    assert mean_error(decoded.rgb, PATTERN) < 4
    assert not decoded.had_alpha and decoded.orientation == 1


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_decode_exactly(name: str) -> None:
    """PNG, lossless WebP and a still GIF give exactly the encoded pixels."""
    decoded = decode(LOSSLESS[name]())
    assert_rgb_array(decoded.rgb, PATTERN.shape[:2])
    assert decoded.format == FORMAT_NAMES[name.split()[0]]
    np.testing.assert_array_equal(decoded.rgb, PATTERN)


def test_grayscale_jpeg_becomes_three_equal_channels() -> None:
    """A one-channel JPEG decodes to RGB with R == G == B close to the grey values."""
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    decoded = decode(grey_jpeg_bytes(grey))
    assert_rgb_array(decoded.rgb, grey.shape)
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 1])
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])
    assert mean_error(decoded.rgb[..., 0], grey) < 2


def test_grey_png_8_bit_is_exact() -> None:
    """An 8-bit grey PNG decodes exactly into three equal channels."""
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode(png_bytes(grey))
    np.testing.assert_array_equal(decoded.rgb, np.repeat(grey[:, :, None], 3, axis=2))


def test_grey_png_16_bit_is_scaled_not_clipped() -> None:
    """16-bit grey ('I;16') is scaled to 8 bits (v / 257), not clipped at 255."""
    grey16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    data = png_bytes(grey16)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I")  # the input really is 16-bit
    decoded = decode(data)
    expected = np.round(grey16 / 257.0)
    assert np.abs(decoded.rgb[..., 0].astype(int) - expected).max() <= 1
    assert decoded.rgb.max() == 255 and decoded.rgb.min() == 0
    # mid-grey 32768 must be mid-grey, not white (clipping would give 255)
    assert 120 < int(decoded.rgb[24, 32, 0]) < 136


def test_rgb_png_16_bit_keeps_the_high_byte() -> None:
    """A hand-written 16-bit-per-channel RGB PNG decodes to the right 8-bit values (+-1)."""
    rgb16 = (np.arange(24 * 32 * 3).reshape(24, 32, 3) * 29 % 65536).astype(np.uint16)
    decoded = decode(png16_rgb_bytes(rgb16))
    assert_rgb_array(decoded.rgb, (24, 32))
    assert np.abs(decoded.rgb.astype(int) - np.round(rgb16 / 257.0)).max() <= 1


def test_cmyk_jpeg_converts_to_plausible_rgb() -> None:
    """CMYK JPEG: no ink is white, magenta+yellow is red, full black ink is black."""
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, 16:32] = (0, 255, 255, 0)
    cmyk[:, 32:] = (0, 0, 0, 255)
    decoded = decode(cmyk_jpeg_bytes(cmyk))
    assert_rgb_array(decoded.rgb, (16, 48))
    white, red, black = decoded.rgb[8, 8].astype(int), decoded.rgb[8, 24].astype(int), decoded.rgb[8, 40].astype(int)
    assert white.min() > 240
    assert red[0] > 220 and red[1] < 40 and red[2] < 40
    assert black.max() < 40


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_icc_profile_is_applied(fmt: str) -> None:
    """Pixels are converted through the embedded ICC profile: with a profile whose red and green
    primaries are swapped, stored red must come out green and stored green red."""
    stored = np.zeros((8, 24, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:16] = (0, 255, 0)
    stored[:, 16:] = (0, 0, 255)
    image = Image.fromarray(stored)
    profile = swapped_icc_profile()
    data = {
        "png": lambda: save(image, "PNG", icc_profile=profile),
        "jpeg": lambda: save(image, "JPEG", quality=100, subsampling=0, icc_profile=profile),
        "webp": lambda: save(image, "WEBP", lossless=True, icc_profile=profile),
    }[fmt]()
    rgb = decode(data).rgb.astype(int)
    assert np.abs(rgb[4, 4] - (0, 255, 0)).max() <= 3
    assert np.abs(rgb[4, 12] - (255, 0, 0)).max() <= 3
    assert np.abs(rgb[4, 20] - (0, 0, 255)).max() <= 3


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_a_profiles_chained_float_tags_are_never_run(fmt: str) -> None:
    """A ``D2B0`` tag chains processing elements without a bound, and LittleCMS runs the
    whole chain at 33³ points while building a transform, preferring it to the matrix: 10,000
    elements in an 81 KB JPEG took 10 s to decode, 100,000 six minutes. The profile's matrix and
    curves describe the colours instead (here: red and green swapped, as the float chain's flat
    grey would not)."""
    chained = icc_rgb_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE, version=4,
                              extra_tags=((b"D2B0", chained_float_tag(200)),))
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 255, 0)
    image = Image.fromarray(stored)
    data = (save(image, "PNG", icc_profile=chained) if fmt == "png"
            else save(image, "JPEG", quality=100, subsampling=0, icc_profile=chained))
    rgb = decode(data).rgb.astype(int)
    assert np.abs(rgb[4, 4] - (0, 255, 0)).max() <= 3
    assert np.abs(rgb[4, 12] - (255, 0, 0)).max() <= 3


def test_a_profile_with_an_unreadable_tag_table_is_not_used() -> None:
    """A tag table running past the profile's end: converted as if there were no profile."""
    broken = bytearray(swapped_icc_profile())
    broken[128:132] = (10_000).to_bytes(4, "big")
    data = save(Image.fromarray(PATTERN), "PNG", icc_profile=bytes(broken))
    assert mean_error(decode(data).rgb, PATTERN) < 1.5


@pytest.mark.parametrize("kind", ["animated gif", "gif", "png", "jpeg", "webp"])
def test_every_cut_of_a_file_decodes_or_is_a_typed_error(kind: str) -> None:
    """Cut anywhere, a file is a photo or a typed error, never another exception: a GIF cut in
    its second frame's header raised struct.error or IndexError, which sank the whole post."""
    small = PATTERN[:24, :24]
    data = {
        "animated gif": lambda: animated_bytes("GIF"),
        "gif": lambda: gif_bytes(small),
        "png": lambda: png_bytes(small),
        "jpeg": lambda: jpeg_bytes(small),
        "webp": lambda: webp_bytes(small),
    }[kind]()
    for cut in range(len(data)):
        try:
            decode(data[:cut])
        except errors.AnonymiserError:
            pass


def test_srgb_icc_profile_leaves_pixels_alone() -> None:
    """An embedded sRGB profile is (nearly) an identity conversion."""
    data = save(Image.fromarray(PATTERN), "PNG", icc_profile=srgb_icc_profile())
    assert mean_error(decode(data).rgb, PATTERN) < 1.5


def test_metadata_laden_files_decode() -> None:
    """EXIF with GPS/maker note/thumbnail, XMP, ICC, comment and IPTC do not disturb decoding."""
    for data in (jpeg_with_metadata(PATTERN), png_with_metadata(Image.fromarray(PATTERN))):
        decoded = decode(data)
        assert decoded.orientation == 1
        assert mean_error(decoded.rgb, PATTERN) < 4


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF"])
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    """Every EXIF orientation 1..8 is applied in every format that carries EXIF: the decoded
    array is the stored one flipped/rotated as the EXIF definition says (shape too)."""
    exif = exif_block(orientation, thumbnail=False)
    kwargs = {} if fmt == "PNG" else {"quality": 95}
    data = save(Image.fromarray(PATTERN), fmt, exif=exif, **kwargs)
    decoded = decode(data)
    expected = orient_expected(PATTERN, orientation)
    assert decoded.rgb.shape == expected.shape
    if fmt != "HEIF":  # pillow-heif applies the rotation itself and resets the tag to 1
        assert decoded.orientation == orientation
    assert mean_error(decoded.rgb, expected) < 5
    # the red block must be where the transform puts it, not merely "similar on average"
    red = (decoded.rgb[..., 0] > 180) & (decoded.rgb[..., 1] < 80)
    expected_red = (expected[..., 0] > 180) & (expected[..., 1] < 80)
    assert (red == expected_red).mean() > 0.97


XMP_TURNED = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_xmp_orientation_is_ignored_as_viewers_ignore_it(fmt: str) -> None:
    """Browsers and the platforms turn a photo by its EXIF tag only; Pillow's getexif() also
    reads XMP's tiff:Orientation, which would turn the copy away from what everyone saw."""
    if fmt == "JPEG":
        data = save(Image.fromarray(PATTERN), "JPEG", quality=95, xmp=XMP_TURNED)
        assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6, "the file does carry the XMP tag"
    else:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP_TURNED.decode())
        data = save(Image.fromarray(PATTERN), "PNG", pnginfo=info)
    decoded = decode(data)
    assert decoded.orientation == 1 and decoded.rgb.shape == PATTERN.shape
    assert mean_error(decoded.rgb, PATTERN) < 5


def test_png_with_a_large_compressed_text_chunk_decodes() -> None:
    """Editors embed XMP packets over 1 MiB; Pillow refuses a zTXt/iTXt that large when opening
    the file, so a sound photo was reported as damaged. Text chunks are dropped unread."""
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "x" * (3 * 1024 * 1024), zip=True)
    info.add_text("Comment", "small")
    data = save(Image.fromarray(PATTERN), "PNG", pnginfo=info)
    with pytest.raises(ValueError):
        Image.open(io.BytesIO(data)).load()
    decoded = decode(data)
    np.testing.assert_array_equal(decoded.rgb, PATTERN)
    stripped = without_png_text(data)
    assert b"zTXt" not in stripped and b"tEXt" not in stripped and len(stripped) < len(data)
    assert Image.open(io.BytesIO(stripped)).info == {}
    plain = save(Image.fromarray(PATTERN), "PNG")
    assert without_png_text(plain) is plain, "nothing to drop: no copy"
    truncated = data[:100]  # a chunk runs past the end: left for Pillow to refuse
    assert without_png_text(truncated) is truncated


def test_orientation_with_palette_transparency() -> None:
    """Orientation and transparency together: rotation happens and transparency still flattens."""
    indices = np.zeros((12, 20), np.uint8)
    indices[:6, :10] = 1  # transparent quadrant, top-left
    data = save(_palette_image(indices), "PNG", transparency=1, exif=exif_block(6, thumbnail=False))
    decoded = decode(data)
    assert decoded.rgb.shape == (20, 12, 3)
    assert decoded.had_alpha
    # stored top-left ends up top-right after a 90 degree clockwise rotation
    np.testing.assert_array_equal(decoded.rgb[:10, 6:], np.full((10, 6, 3), FLATTEN_BACKGROUND, np.uint8))
    np.testing.assert_array_equal(decoded.rgb[10:, :], np.full((10, 12, 3), (10, 20, 30), np.uint8))


def _palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 20, 30, 200, 50, 60] + [0] * 762)
    return image


# --------------------------------------------------------------------------- alpha

HIDDEN = (200, 50, 60)  # the colour hidden under fully transparent pixels


def _rgba_with_hidden_colour() -> np.ndarray:
    """16x16: top-left 8x8 fully transparent over HIDDEN; bottom-right half transparent over
    black; the rest opaque (1, 2, 3)."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (1, 2, 3)
    rgba[..., 3] = 255
    rgba[:8, :8, :3] = HIDDEN
    rgba[:8, :8, 3] = 0
    rgba[8:, 8:, :3] = 0
    rgba[8:, 8:, 3] = 128
    return rgba


ALPHA_FORMATS = {
    "png rgba": lambda rgba: png_bytes(rgba),
    "png la": lambda rgba: png_bytes(np.ascontiguousarray(rgba[..., [0, 3]]), "LA"),
    "webp lossless rgba": lambda rgba: webp_bytes(rgba, lossless=True),
    "heic rgba": lambda rgba: heic_bytes(rgba),
}


@pytest.mark.parametrize("name", sorted(ALPHA_FORMATS))
def test_alpha_is_flattened_and_hidden_colour_is_gone(name: str) -> None:
    """Fully transparent pixels become the flatten background exactly: the colour stored under
    alpha 0 does not survive; opaque pixels keep their colour; half alpha is blended."""
    rgba = _rgba_with_hidden_colour()
    decoded = decode(ALPHA_FORMATS[name](rgba))
    assert decoded.had_alpha
    assert_rgb_array(decoded.rgb, (16, 16))
    np.testing.assert_array_equal(decoded.rgb[:8, :8], np.full((8, 8, 3), FLATTEN_BACKGROUND, np.uint8))
    opaque = decoded.rgb[8:, :8].astype(int)
    assert np.abs(opaque - (1, 1, 1)).max() <= 3
    half = decoded.rgb[12, 12].astype(int)
    assert np.all(np.abs(half - np.array(FLATTEN_BACKGROUND) / 2) <= 4)  # 50 % white over black


def test_palette_png_transparency_is_flattened() -> None:
    """A palette PNG's transparent index becomes the background, other entries keep their colour."""
    indices = np.zeros((16, 16), np.uint8)
    indices[:8] = 1  # transparent entry, whose colour is HIDDEN
    indices[:, :4] = 2
    decoded = decode(palette_png_bytes(indices, [(10, 20, 30), HIDDEN, (0, 255, 0)], transparent=1))
    assert decoded.had_alpha
    rgb = decoded.rgb
    assert not np.any(np.all(rgb == HIDDEN, axis=-1))
    np.testing.assert_array_equal(rgb[0, 8], FLATTEN_BACKGROUND)
    np.testing.assert_array_equal(rgb[15, 8], (10, 20, 30))
    np.testing.assert_array_equal(rgb[0, 0], (0, 255, 0))


def test_16_bit_grey_png_transparency_is_flattened() -> None:
    """A 16-bit grey PNG's tRNS level becomes the background; a level one step away does not."""
    grey16 = np.full((8, 8), 40000, np.uint16)
    grey16[:4] = 0x1234
    grey16[:, :2] = 0x1235
    data = png_bytes(grey16, transparency=0x1234)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I;16") and image.info["transparency"] == 0x1234
    decoded = decode(data)
    assert decoded.had_alpha
    np.testing.assert_array_equal(decoded.rgb[0, 4], FLATTEN_BACKGROUND)
    np.testing.assert_array_equal(decoded.rgb[0, 0], (18, 18, 18))  # 0x1235 / 257, opaque
    np.testing.assert_array_equal(decoded.rgb[7, 7], (156, 156, 156))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_bit_grey_png_transparency_is_flattened(depth: int) -> None:
    """A 1-, 2- or 4-bit grey PNG's tRNS level becomes the background, as a viewer shows it.
    Pillow scales such pixels to 8 bits but left 2- and 4-bit keys unscaled, so no pixel
    matched and the transparent ones showed their grey."""
    top = (1 << depth) - 1
    key = 0 if depth == 1 else 1  # a level that differs from the (white) background
    levels = np.full((8, 8), top, np.uint8)
    levels[:4] = key
    levels[4:, :2] = min(2, top)  # another level, opaque
    decoded = decode(low_bit_grey_png_bytes(levels, depth, transparent=key))
    assert decoded.had_alpha
    assert FLATTEN_BACKGROUND == (255, 255, 255)
    np.testing.assert_array_equal(decoded.rgb[:4], np.full((4, 8, 3), 255, np.uint8))
    np.testing.assert_array_equal(decoded.rgb[7, 0], [min(2, top) * 255 // top] * 3)
    # a key no pixel can have makes nothing transparent
    opaque = decode(low_bit_grey_png_bytes(levels, depth, transparent=top + 1))
    assert not opaque.had_alpha
    np.testing.assert_array_equal(opaque.rgb[0, 4], [key * 255 // top] * 3)


@pytest.mark.parametrize("key", [(0x1234, 0x5678, 0x9ABC), (0x0000, 0x0010, 0x00FF)])
def test_16_bit_rgb_png_transparency_is_flattened(key: tuple[int, int, int]) -> None:
    """A 16-bit RGB PNG's tRNS colour becomes the background, other colours keep theirs (a key
    whose samples are all under 256 is still a 16-bit key, not an 8-bit one)."""
    rgb16 = np.full((8, 8, 3), 0x8000, np.uint16)
    rgb16[:4] = key
    decoded = decode(png16_rgb_bytes(rgb16, transparent=key))
    assert decoded.had_alpha
    np.testing.assert_array_equal(decoded.rgb[:4], np.full((4, 8, 3), FLATTEN_BACKGROUND, np.uint8))
    np.testing.assert_array_equal(decoded.rgb[4:], np.full((4, 8, 3), 128, np.uint8))


def test_opaque_image_reports_no_alpha() -> None:
    """``had_alpha`` is False for an image without any transparency."""
    assert not decode(png_bytes(PATTERN)).had_alpha


# --------------------------------------------------------------------------- sniffing


def test_sniff_uses_content_only() -> None:
    """The format comes from the bytes: PNG, JPEG, GIF, WebP and HEIC signatures are named."""
    assert sniff(png_bytes(PATTERN)) == "png"
    assert sniff(jpeg_bytes(PATTERN)) == "jpeg"
    assert sniff(gif_bytes(PATTERN)) == "gif"
    assert sniff(webp_bytes(PATTERN)) == "webp"
    assert sniff(heic_bytes(PATTERN)) == "heif"


def _ftyp(brand: bytes, compatible: list[bytes]) -> bytes:
    body = brand + b"\x00\x00\x02\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08free" + bytes(200)


UNSUPPORTED = {
    "random bytes": (bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)), "unrecognised"),
    "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    "bare svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="5" height="5"/></svg>', "SVG"),
    "pdf": (b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n", "PDF"),
    "mp4": (_ftyp(b"isom", [b"isom", b"iso2", b"avc1", b"mp41"]), "video"),
    "mov": (_ftyp(b"qt  ", [b"qt  "]), "video"),
    # not videos, and not said to be: a Canon raw and a boxed JPEG XL
    "cr3": (_ftyp(b"crx ", [b"crx ", b"isom"]), "ISO media file of type 'crx'"),
    "jxl": (_ftyp(b"jxl ", [b"jxl "]), "ISO media file of type 'jxl'"),
    "webm": (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm" + bytes(64), "WebM"),
    "html": (b"<!DOCTYPE html>\n<html><head><title>x</title></head><body>hi</body></html>", "HTML"),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(100), "ZIP"),
    "bmp": (b"BM" + bytes(100), "BMP"),
    "tiff": (b"II*\x00\x08\x00\x00\x00" + bytes(100), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_content_is_named(name: str) -> None:
    """Non-images (and formats we do not accept) raise UnsupportedImage saying what they are."""
    data, word = UNSUPPORTED[name]
    with pytest.raises(errors.UnsupportedImage) as caught:
        decode(data)
    assert word.lower() in str(caught.value).lower()
    assert caught.value.code == "unsupported_image"


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build cannot write AVIF")
def test_avif_is_recognised_as_avif_and_decoded() -> None:
    """A real AVIF file (which also lists the HEIF brand mif1) is sniffed as AVIF, not HEIF,
    and decodes to the right pixels."""
    data = save(Image.fromarray(PATTERN), "AVIF")
    assert data[8:12] == b"avif"
    decoded = decode(data)
    assert decoded.format == "avif"
    assert decoded.rgb.shape == PATTERN.shape
    assert np.abs(decoded.rgb.astype(int) - PATTERN.astype(int)).mean() < 20


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build cannot write AVIF")
def test_avif_with_the_generic_major_brand_is_decoded() -> None:
    """Some writers put the generic HEIF brand mif1 first and AVIF only among the compatible
    brands. Such a file was sniffed as HEIF and refused as damaged by the HEIC decoder."""
    data = bytearray(save(Image.fromarray(PATTERN), "AVIF"))
    brands = data[8:12], data[16:20]
    assert brands == (b"avif", b"avif")  # major, then the first compatible brand
    data[8:12] = b"mif1"
    decoded = decode(bytes(data))
    assert decoded.format == "avif"
    assert np.abs(decoded.rgb.astype(int) - PATTERN.astype(int)).mean() < 20


def _with_repeated_last_scan(jpeg: bytes, copies: int) -> bytes:
    """``jpeg`` with its last scan (SOS segment and entropy data) repeated ``copies`` times."""
    last = jpeg.rindex(b"\xff\xda")
    end = jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[last:end] * copies + jpeg[end:]


def test_progressive_jpeg_scans_are_counted_before_decoding() -> None:
    """Every extra progressive scan is another pass over the whole picture: 20,000 tiny scans
    made a 3 MB file take over two minutes. Ordinary progressive files still decode."""
    progressive = jpeg_bytes(PATTERN, progressive=True)
    assert jpeg_layout(progressive).scans == progressive.count(b"\xff\xda") >= 5
    assert jpeg_layout(jpeg_bytes(PATTERN)).scans == 1
    assert decode(progressive).rgb.shape == PATTERN.shape
    within = _with_repeated_last_scan(progressive, MAX_JPEG_SCANS - jpeg_layout(progressive).scans)
    assert jpeg_layout(within).scans == MAX_JPEG_SCANS
    assert decode(within).rgb.shape == PATTERN.shape
    hostile = _with_repeated_last_scan(progressive, 5000)
    with pytest.raises(errors.UnsupportedImage, match=f"more than {MAX_JPEG_SCANS} progressive scans"):
        decode(hostile)


def _padded(jpeg: bytes, segment: bytes, copies: int) -> bytes:
    return jpeg[:2] + segment * copies + jpeg[2:]


@pytest.mark.parametrize("padding", ["app1", "com", "fill", "restart", "stuffing"])
def test_a_jpeg_padded_with_empty_segments_is_refused_before_decoding(padding: str) -> None:
    """Pillow reads each header segment and fill byte in Python: 45 MB of empty APP1 segments
    took 23 s and 1.6 GB to open, of fill bytes 35 s, 20 MB of restart markers or stuffed
    zeros between segments 5.6 s and 3.7 s. As many as a photo carries still decode (an ICC
    profile in its most chunks, 255, and more)."""
    segment, limit = {
        "app1": (b"\xff\xe1\x00\x02", MAX_JPEG_SEGMENTS),
        "com": (b"\xff\xfe\x00\x03x", MAX_JPEG_SEGMENTS),
        "fill": (b"\xff", MAX_JPEG_FILL),
        "restart": (b"\xff\xd0", MAX_JPEG_SEGMENTS),
        "stuffing": (b"\xff\x00", MAX_JPEG_SEGMENTS),
    }[padding]
    plain = jpeg_bytes(PATTERN)
    ordinary = _padded(plain, segment, 300)
    assert decode(ordinary).rgb.shape == PATTERN.shape
    assert jpeg_layout(_padded(plain, segment, limit - 20)).problem() is None
    hostile = _padded(plain, segment, 500_000)
    layout = jpeg_layout(hostile)
    assert max(layout.segments, layout.fill) == limit + 1, "the walk stops just past the limit"
    with pytest.raises(errors.UnsupportedImage, match="padded with thousands"):
        decode(hostile)


@pytest.mark.parametrize("padding", ["comment sub-blocks", "empty extensions", "stray bytes", "after the image"])
def test_a_gif_padded_with_empty_blocks_is_refused_before_decoding(padding: str) -> None:
    """Pillow reads each GIF extension, sub-block and stray byte in Python and keeps every
    comment sub-block: 45 MB of one-byte comment sub-blocks took 5.6 s and 2 GB to open."""
    plain = gif_bytes(PATTERN)
    blocks_start = 13 + (3 << ((plain[10] & 7) + 1))  # after the global colour table
    assert plain[10] & 0x80 and plain[blocks_start] in (0x21, 0x2C)
    before, after = plain[:blocks_start], plain[blocks_start:]

    def padded(count: int) -> bytes:
        if padding == "comment sub-blocks":
            return before + b"\x21\xfe" + b"\x01A" * count + b"\x00" + after
        if padding == "empty extensions":
            return before + b"\x21\xfe\x00" * count + after
        if padding == "stray bytes":
            return before + b"\x00" * count + after
        return plain[:-1] + b"\x21\xfe" + b"\x01A" * count + b"\x00;"  # read looking for frame 2

    assert decode(padded(1000)).rgb.shape == PATTERN.shape
    assert gif_blocks(padded(MAX_GIF_BLOCKS // 2 - 50)) <= MAX_GIF_BLOCKS  # an empty extension is two blocks
    hostile = padded(2_000_000)
    assert gif_blocks(hostile) == MAX_GIF_BLOCKS + 1, "the walk stops just past the limit"
    with pytest.raises(errors.UnsupportedImage, match="padded with hundreds of thousands"):
        decode(hostile)


def _gif_tables(gif: bytes, where: str) -> bytes:
    """``gif`` (Pillow's: a global colour table only) with its colour table global, local (in
    the image descriptor) or both: encoders write all three."""
    bits = gif[10] & 7
    table = gif[13 : 13 + (3 << (bits + 1))]
    pos = 13 + len(table)
    while gif[pos] == 0x21:  # extensions before the image: label, then sub-blocks to a 0
        pos += 2
        while gif[pos]:
            pos += 1 + gif[pos]
        pos += 1
    assert gif[10] & 0x80 and gif[pos] == 0x2C and not gif[pos + 9] & 0x80, "Pillow writes a global table only"
    head, descriptor, rest = gif[13 + len(table) : pos], gif[pos : pos + 10], gif[pos + 10 :]
    screen = gif[:10] + bytes([gif[10] & ~0x80 if where == "local" else gif[10]]) + gif[11:13]
    image = descriptor[:9] + bytes([descriptor[9] | 0x80 | bits if where != "global" else descriptor[9]])
    return b"".join([screen, b"" if where == "local" else table, head, image, b"" if where == "global" else table, rest])


@pytest.mark.parametrize("where", ["global", "local", "both"])
def test_the_gif_walk_follows_every_place_of_the_colour_table(where: str) -> None:
    """The walk must step over a colour table where it is and nowhere else: reading a table or
    a descriptor as blocks would count the wrong things (and could stop at a stray 0x2C)."""
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    plain = gif_bytes(noise)
    variant = _gif_tables(plain, where)
    assert np.array_equal(decode(variant).rgb, decode(plain).rgb)
    assert gif_blocks(variant) == gif_blocks(plain) == pytest.approx(len(plain) / 256, rel=0.02)


def test_a_large_gif_photo_is_far_below_the_block_limit() -> None:
    """Image data comes in sub-blocks of 255 bytes: the byte budget's worth of noise (the least
    compressible picture) stays well under the limit."""
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1500, 3), dtype=np.uint8)
    data = gif_bytes(noise)
    assert gif_blocks(data) == pytest.approx(len(data) / 256, rel=0.01)
    assert Limits().max_input_bytes / 250 < MAX_GIF_BLOCKS


def test_a_png_cut_into_a_million_chunks_is_refused_before_decoding() -> None:
    """3.9 million empty private chunks in 45 MB took Pillow 11 s and 0.5 GB."""
    plain = png_bytes(PATTERN)
    empty = (0).to_bytes(4, "big") + b"prVt" + zlib.crc32(b"prVt").to_bytes(4, "big")
    ihdr_end = 8 + 25
    assert decode(plain[:ihdr_end] + empty * 1000 + plain[ihdr_end:]).rgb.shape == PATTERN.shape
    with pytest.raises(errors.UnsupportedImage, match="more than 100,000 pieces"):
        decode(plain[:ihdr_end] + empty * (MAX_PNG_CHUNKS + 1) + plain[ihdr_end:])


def test_scans_of_an_exif_thumbnail_are_not_counted() -> None:
    """A JPEG thumbnail inside the EXIF block has scans of its own, which are never decoded."""
    thumb = _with_repeated_last_scan(jpeg_bytes(PATTERN[:32, :32], progressive=True), 200)
    payload = b"Exif\x00\x00" + thumb
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    baseline = jpeg_bytes(PATTERN)
    data = baseline[:2] + app1 + baseline[2:]
    assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
    assert jpeg_layout(data).scans == 1


def _disguised(jpeg: bytes, trick: str) -> bytes:
    """``jpeg`` changed in a way libjpeg accepts, but that fooled the old scan counter."""
    if trick == "com with an eoi inside":  # after the first scan: the counter stopped at "FF D9"
        second = jpeg.index(b"\xff\xda", jpeg.index(b"\xff\xda") + 2)
        payload = b"x\xff\xd9y"
        return jpeg[:second] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[second:]
    app0 = 4 + int.from_bytes(jpeg[4:6], "big")  # junk byte after APP0: the counter gave up (0)
    return jpeg[:app0] + b"\x00" + jpeg[app0:]


@pytest.mark.parametrize("trick", ["com with an eoi inside", "junk between segments"])
def test_scan_count_is_not_fooled_by_what_libjpeg_skips(trick: str) -> None:
    """Both files decode in libjpeg with every scan; they took 27-38 s for 3 MP past the limit."""
    progressive = jpeg_bytes(PATTERN, progressive=True)
    ordinary = _disguised(progressive, trick)
    assert jpeg_layout(ordinary).scans == progressive.count(b"\xff\xda")
    assert decode(ordinary).rgb.shape == PATTERN.shape
    hostile = _disguised(_with_repeated_last_scan(progressive, 5000), trick)
    with pytest.raises(errors.UnsupportedImage, match="progressive scans"):
        decode(hostile)


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\xff\xd8\xff\x01\x02\x03", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"],
                         ids=["magic only", "bogus marker", "cut in the header"])
def test_jpeg_with_a_broken_header_is_corrupt(data: bytes) -> None:
    """Pillow's MPO plugin has no opener of its own: offered after JPEG failed, it raised KeyError."""
    with pytest.raises(errors.CorruptImage):
        decode(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_orientation_is_applied_despite_a_malformed_exif_tag(fmt: str) -> None:
    """A tag of the wrong type (here a text where a number belongs) is harmless to viewers, but
    Pillow's exif_transpose rewrites the block after rotating and raised struct.error."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "CAMERA"
    raw = exif.tobytes()
    assert raw.count(b"\x01\x0f\x00\x02") == 1  # Make, ASCII (big endian)
    bad = raw.replace(b"\x01\x0f\x00\x02", b"\x01\x09\x00\x02")  # CellLength is a SHORT
    buffer = io.BytesIO()
    Image.fromarray(PATTERN).save(buffer, fmt, exif=bad)
    decoded = decode(buffer.getvalue())
    assert decoded.orientation == 6
    assert decoded.rgb.shape == (PATTERN.shape[1], PATTERN.shape[0], 3)


@pytest.mark.parametrize("width,height", [(5100, 100), (100, 5100), (60_000, 1)])
def test_strips_are_refused_before_decoding(width: int, height: int) -> None:
    """A 1x100,000 strip is within every pixel budget, yet locators pad or tile it like a photo."""
    data = png_bytes(np.zeros((height, width, 3), np.uint8))
    with pytest.raises(errors.ImageTooNarrow, match=f"{width}x{height}"):
        decode(data)
    assert decode(png_bytes(np.zeros((100, 5000, 3), np.uint8))).rgb.shape == (100, 5000, 3)


@pytest.mark.parametrize("orientation,shown", [(1, "5100x100"), (6, "100x5100"), (8, "100x5100")])
def test_a_refused_strip_is_named_as_viewers_see_it(orientation: int, shown: str) -> None:
    """A phone's panorama stored sideways: the refusal names the size its sender saw."""
    data = jpeg_with_metadata(np.zeros((100, 5100, 3), np.uint8), orientation=orientation)
    with pytest.raises(errors.ImageTooNarrow, match=f"The image is {shown},"):
        decode(data)


# --------------------------------------------------------------------------- broken files


def test_zero_bytes_is_empty_image() -> None:
    """Zero bytes raise EmptyImage."""
    with pytest.raises(errors.EmptyImage) as caught:
        decode(b"")
    assert caught.value.code == "empty_image" and str(caught.value)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_files_are_corrupt(fmt: str, fraction: float) -> None:
    """A JPEG or PNG cut short raises CorruptImage (never a partial image)."""
    noise = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = jpeg_bytes(noise) if fmt == "jpeg" else png_bytes(noise)
    with pytest.raises(errors.CorruptImage) as caught:
        decode(data[: int(len(data) * fraction)])
    assert fmt.upper() in str(caught.value)
    assert caught.value.code == "corrupt_image"


@pytest.mark.parametrize("cut", [9, 30])
def test_header_only_png_is_corrupt(cut: int) -> None:
    """A PNG signature followed by too little or damaged data is corrupt, not unsupported."""
    data = png_bytes(PATTERN)
    with pytest.raises(errors.CorruptImage):
        decode(data[:cut])


def test_damaged_png_crc_is_corrupt() -> None:
    """A PNG whose image data was altered (CRC mismatch) is refused as corrupt."""
    data = bytearray(png_bytes(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    with pytest.raises(errors.CorruptImage):
        decode(bytes(data))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "AVIF"])
def test_animations_are_refused(fmt: str) -> None:
    """Animated GIF, animated WebP and APNG raise AnimatedImage rather than covering one frame."""
    with pytest.raises(errors.AnimatedImage) as caught:
        decode(animated_bytes(fmt))
    assert "animated" in str(caught.value).lower()
    assert caught.value.code == "animated_image"


def test_heif_image_sequences_are_refused() -> None:
    """A HEIF sequence (brand msf1): pillow-heif reads its still and never its frames, so the
    copy would silently leave the animation out."""
    data = bytearray(heic_bytes(PATTERN))
    assert data[8:12] == b"heic"
    data[8:12] = b"msf1"
    with pytest.raises(errors.AnimatedImage):
        decode(bytes(data))
    assert decode(heic_bytes(PATTERN)).format == "heif"


# --------------------------------------------------------------------------- budgets


@lru_cache(maxsize=1)
def _bomb() -> bytes:
    return png_bomb_bytes(30000, 30000)


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small PNG declaring 30000x30000 pixels raises ImageTooLarge from its header: no pixel
    is decoded (Image.load would fail the test), quickly and without a large allocation."""
    data = _bomb()
    assert len(data) < 200_000

    def refuse_load(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded before the pixel budget was checked")

    monkeypatch.setattr(Image.Image, "load", refuse_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse_load)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(errors.ImageTooLarge) as caught:
        decode(data)
    elapsed = time.perf_counter() - start
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert "30000x30000" in str(caught.value)
    assert caught.value.code == "image_too_large"
    assert elapsed < 1.0
    assert rss_growth < 100 * 1024  # a decoded 30000x30000 image would need 900 MB


def test_pixel_budget_is_configurable() -> None:
    """An ordinary image over a small pixel budget is refused; at the budget it is accepted."""
    data = png_bytes(PATTERN)
    pixels = PATTERN.shape[0] * PATTERN.shape[1]
    with pytest.raises(errors.ImageTooLarge):
        decode(data, Limits(max_input_pixels=pixels - 1))
    assert decode(data, Limits(max_input_pixels=pixels)).rgb.shape[:2] == PATTERN.shape[:2]


def test_byte_budget_is_enforced() -> None:
    """A file larger than max_input_bytes raises ImageTooLarge naming both sizes."""
    data = jpeg_bytes(PATTERN)
    with pytest.raises(errors.ImageTooLarge) as caught:
        decode(data, Limits(max_input_bytes=len(data) - 1))
    assert f"{len(data):,}" in str(caught.value)
    assert decode(data, Limits(max_input_bytes=len(data))).rgb.shape[:2] == PATTERN.shape[:2]


def test_limits_from_env_and_validation() -> None:
    """Limits read ANON_* variables, keep defaults for unset ones and reject bad values."""
    limits = Limits.from_env({"ANON_MAX_INPUT_BYTES": "1234", "ANON_MAX_OUTPUT_PIXELS": ""})
    assert limits.max_input_bytes == 1234
    assert limits.max_output_pixels == Limits().max_output_pixels
    with pytest.raises(ValueError, match="ANON_MAX_INPUT_PIXELS"):
        Limits.from_env({"ANON_MAX_INPUT_PIXELS": "lots"})
    with pytest.raises(ValueError):
        Limits(max_output_bytes=0)


# --------------------------------------------------------------------------- error types


ERROR_CASES = {
    "empty": (b"", errors.EmptyImage),
    "unsupported": (b"%PDF-1.4 not an image", errors.UnsupportedImage),
    "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(40), errors.CorruptImage),
    "animated": (None, errors.AnimatedImage),
    "too large": (None, errors.ImageTooLarge),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_errors_are_typed_with_code_and_message(name: str) -> None:
    """Every refusal is an AnonymiserError subclass with its own code and a non-empty message."""
    data, kind = ERROR_CASES[name]
    if name == "animated":
        data = animated_bytes("GIF")
    if name == "too large":
        data = _bomb()
    with pytest.raises(errors.AnonymiserError) as caught:
        decode(data)
    assert type(caught.value) is kind
    assert str(caught.value).strip()
    assert caught.value.code and caught.value.code != errors.AnonymiserError.code


def test_error_codes_are_distinct() -> None:
    """Each error class has its own stable code (the bot and CLI key their replies on it)."""
    classes = [
        errors.UnsupportedImage, errors.CorruptImage, errors.EmptyImage, errors.ImageTooLarge,
        errors.AnimatedImage, errors.WeightsError, errors.OutputTooLarge,
    ]
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes)
    assert all(issubclass(cls, errors.AnonymiserError) for cls in classes)
