"""Covering is opaque and independent of the original pixels; the emoji is crisp at every size;
encoding writes pixels only (no metadata, no alpha) within the output budgets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from anonymiser import emoji
from anonymiser.cover import STYLES, CoverStyle, cover, covered_mask
from anonymiser.encode import JPEG_MAX_SIDE, JPEG_QUALITIES, encode, output_format, output_size
from anonymiser.errors import OutputTooLarge

from imaging import assert_clean_output, decode_output, jpeg_segments, png_chunks

SIZES = (1, 2, 3, 7, 8, 16, 33, 64, 65, 257, 500, 801, 2000)
MARGIN = 80


@pytest.fixture(scope="module")
def originals() -> tuple[np.ndarray, np.ndarray]:
    """Two unrelated random images big enough for the largest region."""
    rng = np.random.default_rng(99)
    side = max(SIZES) + MARGIN
    a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return a, b


def canvases(originals: tuple[np.ndarray, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The two originals cropped to fit regions of ``size`` (smaller images, faster tests)."""
    side = max(64, size + MARGIN)
    return originals[0][:side, :side], originals[1][:side, :side]


def regions_of(size: int, side: int) -> np.ndarray:
    """Regions of side ``size`` in a ``side`` square image: one square, one flush with the
    bottom-right corner (overlapping the first when large) and one wide, flat one."""
    return np.asarray(
        [
            [10, 20, 10 + size, 20 + size],
            [side - size, side - size, side, side],
            [30, 40, min(side, 30 + 2 * size), 40 + max(1, size // 2)],
        ],
        np.int64,
    )


@pytest.mark.parametrize("style", ["emoji", "solid"])
@pytest.mark.parametrize("size", SIZES)
def test_cover_is_independent_of_the_original(originals: tuple[np.ndarray, np.ndarray], style: str, size: int) -> None:
    """Emoji and solid covers: inside every region the two covered images are identical (so no
    pixel depends on what was there); outside, each image is unchanged."""
    a, b = canvases(originals, size)
    regions = regions_of(size, a.shape[0])
    out_a = cover(a, regions, CoverStyle(style))
    out_b = cover(b, regions, CoverStyle(style))
    mask = covered_mask(a.shape[:2], regions)
    assert mask.sum() >= size * size
    np.testing.assert_array_equal(out_a[mask], out_b[mask])
    np.testing.assert_array_equal(out_a[~mask], a[~mask])
    np.testing.assert_array_equal(out_b[~mask], b[~mask])
    # the originals really differed there, so equality is not a coincidence
    assert (a[mask] != b[mask]).any()
    if style == "solid":
        assert np.all(out_a[mask] == CoverStyle().colour)


@pytest.mark.parametrize("size", SIZES)
def test_noise_cover_is_random_not_derived(originals: tuple[np.ndarray, np.ndarray], size: int) -> None:
    """Noise: inside pixels do not equal the original more than chance allows, two runs differ,
    the noise is uncorrelated with the image, and outside pixels are unchanged."""
    a, b = canvases(originals, size)
    regions = regions_of(size, a.shape[0])
    mask = covered_mask(a.shape[:2], regions)
    first = cover(a, regions, CoverStyle("noise"))
    second = cover(a, regions, CoverStyle("noise"))
    other = cover(b, regions, CoverStyle("noise"))
    np.testing.assert_array_equal(first[~mask], a[~mask])
    np.testing.assert_array_equal(other[~mask], b[~mask])
    inside = mask.sum() * 3
    if inside >= 3000:
        # chance of equal uint8 values is 1/256; allow a wide margin (subsampled for speed)
        step = max(1, inside // 200_000)
        f, s, o, orig = (x[mask].ravel()[::step] for x in (first, second, other, a))
        assert (f == orig).mean() < 0.02
        assert (f == s).mean() < 0.02
        assert (f == o).mean() < 0.02
        corr = np.corrcoef(f.astype(float), orig.astype(float))[0, 1]
        assert abs(corr) < 0.05
        assert f.std() > 60  # uniform on 0..255 has std 74
    else:
        # tiny regions: the chance that 3..27 random values all repeat is negligible
        assert not np.array_equal(first[mask], second[mask])
        assert not np.array_equal(first[mask], a[mask])


def test_noise_ignores_the_image_entirely() -> None:
    """Noise over a constant image is as random as over any image (not e.g. a shuffle)."""
    flat = np.zeros((200, 200, 3), np.uint8)
    out = cover(flat, np.array([[0, 0, 200, 200]]), CoverStyle("noise"))
    values = np.bincount(out.ravel(), minlength=256)
    assert values.min() > 300 and values.max() < 700  # 120000 samples over 256 values


def test_regions_outside_or_partly_outside_are_clipped() -> None:
    """A region partly outside the image covers its inside part; one fully outside or empty
    changes nothing."""
    image = np.random.default_rng(5).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    regions = np.array([[-10, -5, 8, 9], [55, 45, 80, 90], [100, 100, 120, 120], [20, 20, 20, 30]])
    out = cover(image, regions, CoverStyle("solid"))
    expected = image.copy()
    expected[0:9, 0:8] = CoverStyle().colour
    expected[45:50, 55:60] = CoverStyle().colour
    np.testing.assert_array_equal(out, expected)
    expected_mask = np.zeros((50, 60), bool)
    expected_mask[0:9, 0:8] = True
    expected_mask[45:50, 55:60] = True
    np.testing.assert_array_equal(covered_mask((50, 60), regions), expected_mask)


def test_overlapping_regions_and_emblem_mask() -> None:
    """Overlapping emoji regions are all opaque; a region excluded by ``emblem`` gets the plain
    backing colour; ``cover`` never modifies its input."""
    image = np.full((100, 100, 3), 7, np.uint8)
    before = image.copy()
    regions = np.array([[0, 0, 60, 60], [40, 40, 80, 80], [70, 0, 100, 20]])
    out = cover(image, regions, CoverStyle("emoji"), emblem=np.array([True, True, False]))
    np.testing.assert_array_equal(image, before)
    mask = covered_mask((100, 100), regions)
    assert not np.any(np.all(out[mask] == 7, axis=-1))
    np.testing.assert_array_equal(out[0:20, 70:100], np.full((20, 30, 3), emoji.DEFAULT_BACKING, np.uint8))
    # largest first: the smaller head's fist is drawn last and stays whole on top
    np.testing.assert_array_equal(out[40:80, 40:80], emoji.render(40, 40))


def test_cover_style_validation() -> None:
    """Unknown styles and skin tones are refused when the style is built."""
    assert set(STYLES) == {"emoji", "solid", "noise"}
    with pytest.raises(ValueError, match="style"):
        CoverStyle("blur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="skin tone"):
        CoverStyle("emoji", skin_tone="green")


# --------------------------------------------------------------------------- emoji


def _near(tile: np.ndarray, colour: tuple[int, int, int], tolerance: int) -> np.ndarray:
    return np.abs(tile.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1) <= tolerance


@pytest.mark.parametrize("side", [8, 16, 64, 500, 2000])
def test_emoji_is_crisp_and_shaped(side: int) -> None:
    """The fist renders at the exact size, shows both skin and backing, is drawn sharp (few
    in-between colours, unlike an upscaled small fist) and has the fist's proportions."""
    skin = emoji.SKIN_TONES[emoji.DEFAULT_TONE]
    backing = emoji.DEFAULT_BACKING
    outline = emoji._shade(skin, 0.62)
    tile = emoji.render(side, side)
    assert tile.shape == (side, side, 3) and tile.dtype == np.uint8
    tolerance = 12 if side <= 16 else 2
    assert _near(tile, skin, tolerance).any(), "no skin-coloured pixel"
    assert _near(tile, backing, tolerance).any(), "no backing pixel"
    pure = (_near(tile, skin, 6) | _near(tile, backing, 6) | _near(tile, outline, 6)).mean()
    minimum = {8: 0.35, 16: 0.5, 64: 0.8, 500: 0.97, 2000: 0.99}[side]
    assert pure >= minimum, f"only {pure:.2f} of the pixels are clean colours: blurry"
    # the fist (anything not backing) spans about x 0.20..0.78 and y 0.12..1.0 of the square
    ys, xs = np.nonzero(~_near(tile, backing, 30))
    step = 1.5 / side + 0.02
    assert abs(xs.min() / side - 0.20) < step and abs((xs.max() + 1) / side - 0.78) < step
    assert abs(ys.min() / side - 0.12) < step and (ys.max() + 1) / side > 0.97


def test_upscaled_fist_would_fail_the_crispness_check() -> None:
    """The crispness measure above can fail: a 16 px fist upscaled to 500 px scores far lower."""
    skin = emoji.SKIN_TONES[emoji.DEFAULT_TONE]
    blurry = np.asarray(Image.fromarray(emoji.render(16, 16)).resize((500, 500), Image.Resampling.BILINEAR))
    pure = (_near(blurry, skin, 6) | _near(blurry, emoji.DEFAULT_BACKING, 6) | _near(blurry, emoji._shade(skin, 0.62), 6)).mean()
    assert pure < 0.8


@pytest.mark.parametrize("width,height", [(1, 1), (1, 2000), (2000, 1), (3, 7), (100, 40), (40, 100), (2000, 1500)])
def test_emoji_fills_any_rectangle(width: int, height: int) -> None:
    """Any rectangle gets a tile of exactly that shape: the fist centred, backing around it."""
    tile = emoji.render(width, height)
    assert tile.shape == (height, width, 3)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    np.testing.assert_array_equal(tile[top : top + side, left : left + side], emoji.render(side, side))
    outside = np.ones((height, width), bool)
    outside[top : top + side, left : left + side] = False
    assert np.all(tile[outside] == emoji.DEFAULT_BACKING)


@pytest.mark.parametrize("tone", sorted(emoji.SKIN_TONES))
def test_every_skin_tone_renders(tone: str) -> None:
    """Each of the six tones draws the fist in that tone, on the requested backing."""
    tile = emoji.render(64, 64, tone, (0, 0, 0))
    assert _near(tile, emoji.SKIN_TONES[tone], 2).mean() > 0.05
    assert np.all(tile[0, 0] == 0)
    others = [t for t in emoji.SKIN_TONES if t != tone]
    assert all(not np.array_equal(tile, emoji.render(64, 64, t, (0, 0, 0))) for t in others)


def test_emoji_refuses_unknown_tone_and_bad_size() -> None:
    """An unknown tone or a non-positive size raises ValueError."""
    with pytest.raises(ValueError, match="skin tone"):
        emoji.render(10, 10, "purple")
    with pytest.raises(ValueError):
        emoji.render(0, 10)


def test_cover_uses_the_chosen_tone_and_colour() -> None:
    """CoverStyle's tone and colour reach the painted pixels."""
    image = np.zeros((80, 80, 3), np.uint8)
    style = CoverStyle("emoji", skin_tone="yellow", colour=(0, 90, 0))
    out = cover(image, np.array([[0, 0, 80, 80]]), style)
    np.testing.assert_array_equal(out, emoji.render(80, 80, "yellow", (0, 90, 0)))
    solid = cover(image, np.array([[0, 0, 80, 80]]), CoverStyle("solid", colour=(1, 2, 3)))
    assert np.all(solid == (1, 2, 3))


# --------------------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A smooth 256x192 gradient with noise (photo-like: compresses well as JPEG)."""
    y, x = np.mgrid[0:192, 0:256]
    rgb = np.stack([x, y * 1.3, (x + y) / 2], axis=-1)
    noise = np.random.default_rng(11).normal(0, 6, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_encode_writes_pixels_only(photo: np.ndarray, fmt: str) -> None:
    """Encoded output has no EXIF, XMP, ICC, comment, IPTC, text chunk or alpha: JPEG holds only
    a JFIF APP0; PNG holds only IHDR/IDAT/IEND."""
    encoded = encode(photo, fmt, 16 * 1024 * 1024)
    assert encoded.format == fmt and encoded.mime == f"image/{fmt}"
    assert_clean_output(encoded.data)
    if fmt == "jpeg":
        markers = {marker for marker, _ in jpeg_segments(encoded.data)}
        assert not markers & ({0xFE} | set(range(0xE1, 0xF0)))
        assert np.abs(decode_output(encoded.data).astype(int) - photo).mean() < 8
    else:
        assert set(png_chunks(encoded.data)) <= {b"IHDR", b"IDAT", b"IEND"}
        np.testing.assert_array_equal(decode_output(encoded.data), photo)


def test_metadata_scanner_detects_metadata(photo: np.ndarray) -> None:
    """The checks used on every output do fire on files that carry metadata."""
    from imaging import jpeg_with_metadata, png_with_metadata

    for data in (jpeg_with_metadata(photo), png_with_metadata(Image.fromarray(photo))):
        with pytest.raises(AssertionError):
            assert_clean_output(data)


def test_output_format_choice() -> None:
    """Lossless inputs (PNG, GIF) stay PNG; photos (JPEG, WebP, HEIF) become JPEG."""
    assert output_format("png") == "png" and output_format("gif") == "png"
    assert {output_format(f) for f in ("jpeg", "webp", "heif")} == {"jpeg"}


def test_png_too_big_falls_back_to_jpeg() -> None:
    """A PNG over the byte limit is re-encoded as JPEG that fits."""
    noise = np.random.default_rng(12).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    png = encode(noise, "png", 10**9)
    assert png.format == "png"
    limit = len(png.data) - 1
    fallback = encode(noise, "png", limit)
    assert fallback.format == "jpeg" and fallback.mime == "image/jpeg"
    assert len(fallback.data) <= limit
    assert_clean_output(fallback.data)


def test_jpeg_quality_steps_down_to_fit(photo: np.ndarray) -> None:
    """Between the sizes at the highest and lowest quality, the output still fits the limit."""
    sizes = []
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=quality, optimize=True)
        sizes.append(len(buffer.getvalue()))
    limit = (sizes[0] + sizes[-1]) // 2
    assert sizes[-1] <= limit < sizes[0]
    encoded = encode(photo, "jpeg", limit)
    assert len(encoded.data) <= limit and encoded.format == "jpeg"


def test_output_too_large_when_impossible(photo: np.ndarray) -> None:
    """When even the lowest JPEG quality does not fit, OutputTooLarge is raised."""
    with pytest.raises(OutputTooLarge) as caught:
        encode(photo, "png", 500)
    assert caught.value.code == "output_too_large" and "500" in str(caught.value)


def test_encode_refuses_non_rgb_arrays() -> None:
    """Only opaque uint8 RGB arrays are encoded (an RGBA array would carry alpha)."""
    with pytest.raises(ValueError):
        encode(np.zeros((4, 4, 4), np.uint8), "png", 10**6)
    with pytest.raises(ValueError):
        encode(np.zeros((4, 4, 3), np.float32), "png", 10**6)


@pytest.mark.parametrize(
    "width,height,budget",
    [(100, 100, 10_000), (100, 100, 9_999), (6000, 4000, 33_177_600), (8000, 6000, 33_177_600),
     (12345, 6789, 1_000_000), (1000, 10, 999), (4032, 3024, 2_000_000), (3, 5, 1)],
)
def test_output_size_respects_the_pixel_budget(width: int, height: int, budget: int) -> None:
    """output_size keeps the pixel count within the budget, keeps the aspect ratio (to within
    rounding), and leaves an image that is already within it alone."""
    out_w, out_h = output_size(width, height, budget)
    if width * height <= budget:
        assert (out_w, out_h) == (width, height)
    else:
        assert 0 < out_w * out_h <= budget
        assert out_w <= width and out_h <= height
        assert out_w * out_h > 0.9 * budget or min(out_w, out_h) < 10  # not needlessly small


def test_large_fists_are_not_kept_after_use() -> None:
    """Renders of every size were cached (256 of them): full-photo fists kept 6 GB alive."""
    import tracemalloc

    tracemalloc.start()
    for side in range(1500, 1510):
        emoji.render(side, side)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert kept < 5_000_000, f"{kept:,} bytes still held after drawing ten 1500-px fists"


def test_a_jpeg_beyond_libjpegs_largest_side_is_a_typed_error() -> None:
    """A 50:1 strip past about 86 MP of output (ANON_MAX_OUTPUT_PIXELS raised) is wider than
    libjpeg can write: Pillow's OSError read as an internal error."""
    strip = np.zeros((2, JPEG_MAX_SIDE + 1, 3), np.uint8)
    with pytest.raises(OutputTooLarge, match="cannot be wider or taller than 65,500 pixels"):
        encode(strip, "jpeg", 10**8)
    assert encode(strip[:, :JPEG_MAX_SIDE], "jpeg", 10**8).format == "jpeg"
