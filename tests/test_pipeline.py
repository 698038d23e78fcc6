"""End to end: bytes in, clean covered bytes out, with every head region opaque pixel by pixel,
the orientation applied, alpha flattened, the output budgets kept and the safeguards working."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anonymiser import regions as reg
from anonymiser.cover import CoverStyle, cover, covered_mask
from anonymiser.decode import FLATTEN_BACKGROUND, decode
from anonymiser.emoji import DEFAULT_BACKING, render
from anonymiser.errors import BadRegions, EmptyImage, WeightsError
from anonymiser.limits import Limits
from anonymiser.locators.nms import iou_matrix
from anonymiser.locators.base import Detections, HeadLocator
from anonymiser.pipeline import MAX_COVER_LAYERS, Anonymiser, Result, Settings, cover_given
from anonymiser.report import Report

from imaging import (
    ASTRONAUT_FACE,
    FixedLocator,
    assert_clean_output,
    decode_output,
    grey_jpeg_bytes,
    heic_bytes,
    jpeg_bytes,
    jpeg_with_metadata,
    png_bytes,
    png_with_metadata,
    save,
    webp_bytes,
)

#: the crop used for the orientation test: 384 wide, 512 tall, face included
CROP_X = 64
CROP_FACE = (ASTRONAUT_FACE[0] - CROP_X, ASTRONAUT_FACE[1], ASTRONAUT_FACE[2] - CROP_X, ASTRONAUT_FACE[3])


def new_report(rgb: np.ndarray) -> Report:
    return Report(input_format="png", input_size=(rgb.shape[1], rgb.shape[0]), input_bytes=0, orientation=1, had_alpha=False)


def region_boxes(result_report: Report) -> np.ndarray:
    return np.asarray([r.box for r in result_report.regions], np.int64).reshape(-1, 4)


def contains(box: tuple[int, ...] | np.ndarray, inner: tuple[int, int, int, int]) -> bool:
    return bool(box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3])


def assert_regions_in_bounds(report: Report) -> None:
    width, height = report.output_size
    for region in report.regions:
        x1, y1, x2, y2 = region.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, f"{region} outside {width}x{height}"
        assert region.sources


def expected_output(flat: np.ndarray, report: Report, style: CoverStyle) -> np.ndarray:
    """Rebuild the output from the decoded input and the report alone: locator and safeguard
    regions first (fists only on heads), then residual regions. If the pipeline's output equals
    this, every pixel is either the decoded input or cover."""
    main = [r for r in report.regions if r.sources != ["residual"]]
    residual = [r for r in report.regions if r.sources == ["residual"]]
    boxes = np.asarray([r.box for r in main], np.int64).reshape(-1, 4)
    emblem = np.array(["safeguard" not in r.sources for r in main], bool)
    out = cover(flat, boxes, style, emblem)
    if residual:
        out = cover(out, np.asarray([r.box for r in residual], np.int64), style)
    return out


# --------------------------------------------------------------------------- real formats


@pytest.fixture(scope="module")
def upright(astronaut: np.ndarray) -> np.ndarray:
    """A 384x512 portrait crop of the astronaut (non-square, so rotations change the shape)."""
    return np.ascontiguousarray(astronaut[:, CROP_X : CROP_X + 384])


@pytest.fixture(scope="module")
def rotated_result(full_anonymiser: Anonymiser, upright: np.ndarray) -> tuple[bytes, Result]:
    """The astronaut stored on its side with EXIF orientation 6 and every kind of metadata."""
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # orientation 6 turns it back upright
    data = jpeg_with_metadata(stored, orientation=6)
    return data, full_anonymiser.anonymise(data)


def test_camera_jpeg_output_is_clean(rotated_result: tuple[bytes, Result]) -> None:
    """A JPEG with EXIF (GPS, maker note, serial, thumbnail), XMP, ICC, comment and IPTC comes
    out with none of it, as a JPEG without alpha."""
    _, result = rotated_result
    assert result.mime == "image/jpeg" and result.report.output_format == "jpeg"
    assert_clean_output(result.data)


def test_camera_jpeg_output_is_upright(rotated_result: tuple[bytes, Result], upright: np.ndarray) -> None:
    """Orientation 6 is applied: the 512x384 stored image comes out 384x512 and matches the
    upright photo wherever nothing was covered."""
    data, result = rotated_result
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (512, 384)
    out = decode_output(result.data)
    assert out.shape == upright.shape
    assert result.report.orientation == 6
    assert result.report.input_size == (384, 512) and result.report.output_size == (384, 512)
    visible = ~covered_mask(out.shape[:2], region_boxes(result.report))
    assert visible.mean() > 0.5
    error = np.abs(out.astype(int) - upright.astype(int))[visible].mean()
    assert error < 6
    # a wrong rotation would be far off
    assert np.abs(out.astype(int) - np.rot90(np.rot90(upright)).astype(int))[visible].mean() > 30


def test_camera_jpeg_face_is_covered(rotated_result: tuple[bytes, Result], upright: np.ndarray) -> None:
    """Both locators ran, every region lies inside the output and one region covers the face;
    the face core pixels no longer resemble the face."""
    _, result = rotated_result
    report = result.report
    assert report.locators == ["centerface", "heads"]
    assert report.detections["centerface"] >= 1 and report.detections["heads"] >= 1
    assert_regions_in_bounds(report)
    face_regions = [r for r in report.regions if contains(r.box, CROP_FACE)]
    assert face_regions, f"no region covers the face {CROP_FACE}: {report.regions}"
    x1, y1, x2, y2 = CROP_FACE
    out = decode_output(result.data)
    assert np.abs(out[y1:y2, x1:x2].astype(int) - upright[y1:y2, x1:x2].astype(int)).mean() > 40
    assert report.heads_covered >= 1
    assert 0 < report.covered_fraction < 0.8


def _rgba_with_clear_corner(astronaut: np.ndarray) -> np.ndarray:
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[400:, :100, 3] = 0  # flag and arm hidden behind transparency
    return rgba


FORMATS = {
    "png rgba": (lambda a: png_bytes(_rgba_with_clear_corner(a)), "png"),
    "png palette": (lambda a: save(Image.fromarray(a).quantize(256), "PNG"), "png"),
    "png with metadata": (lambda a: png_with_metadata(Image.fromarray(a)), "png"),
    "webp": (lambda a: webp_bytes(a), "jpeg"),
    "heic": (lambda a: heic_bytes(a), "jpeg"),
    "grey jpeg": (lambda a: grey_jpeg_bytes(np.asarray(Image.fromarray(a).convert("L"))), "jpeg"),
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def format_case(request: pytest.FixtureRequest, cf_anonymiser: Anonymiser, astronaut: np.ndarray) -> tuple[str, bytes, Result]:
    """The astronaut in one input format, anonymised with CenterFace."""
    make, _ = FORMATS[request.param]
    data = make(astronaut)
    return request.param, data, cf_anonymiser.anonymise(data)


def test_every_format_is_anonymised(format_case: tuple[str, bytes, Result]) -> None:
    """Each format: clean output in the expected format, face covered, regions in bounds."""
    name, data, result = format_case
    assert result.report.output_format == FORMATS[name][1]
    assert_clean_output(result.data)
    assert_regions_in_bounds(result.report)
    assert any(contains(r.box, ASTRONAUT_FACE) for r in result.report.regions), result.report.regions
    out = decode_output(result.data)
    assert out.shape == (512, 512, 3)
    assert result.report.had_alpha == (name == "png rgba")
    if name == "png rgba":  # the transparent corner comes out as the flatten background
        visible = ~covered_mask((512, 512), region_boxes(result.report))[400:, :100]
        corner = out[400:, :100][visible]
        assert len(corner) > 1000 and np.all(corner == FLATTEN_BACKGROUND)


def test_output_is_input_plus_covers(format_case: tuple[str, bytes, Result], cf_anonymiser: Anonymiser) -> None:
    """Outside the reported regions the output is the decoded input (exactly for PNG output,
    within JPEG loss otherwise); inside, it is exactly the cover: nothing else is changed and
    no original pixel survives inside a region."""
    name, data, result = format_case
    flat = decode(data).rgb
    expected = expected_output(flat, result.report, cf_anonymiser.settings.style)
    out = decode_output(result.data)
    if result.report.output_format == "png":
        np.testing.assert_array_equal(out, expected)
    else:
        assert np.abs(out.astype(int) - expected.astype(int)).mean() < 3


def test_a_caller_can_tighten_the_output_budgets_but_never_loosen_them(cf_anonymiser: Anonymiser) -> None:
    """The bot passes the budgets a server publishes (smaller than mastodon.social's, or X's
    5 MB): the copy fits them; budgets larger than the configured ones change nothing."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)  # incompressible: many bytes
    data = jpeg_bytes(noisy, quality=95)
    tight = cf_anonymiser.anonymise(data, max_output_bytes=400_000, max_output_pixels=500_000)
    assert len(tight.data) <= 400_000 and tight.report.output_bytes == len(tight.data)
    w, h = Image.open(io.BytesIO(tight.data)).size
    assert w * h <= 500_000 and tight.report.output_size == (w, h)
    small = Anonymiser(Settings(residual_pass=False, safeguard=False, limits=Limits(max_output_pixels=300_000, max_output_bytes=200_000)),
                       locators=[FixedLocator([(100, 100, 200, 150)])])
    loose = small.anonymise(data, max_output_bytes=10**9, max_output_pixels=10**9)
    w, h = Image.open(io.BytesIO(loose.data)).size
    assert w * h <= 300_000 and len(loose.data) <= 200_000
    assert cf_anonymiser.anonymise(data).report.output_size == (1600, 1200), "unchanged without budgets"


def test_transparent_face_pixels_never_reach_the_output(cf_anonymiser: Anonymiser, astronaut: np.ndarray) -> None:
    """A PNG whose face area is fully transparent but still holds the face in its RGB: the
    output has no alpha and none of those face pixels, only background or cover."""
    x1, y1, x2, y2 = 160, 40, 290, 200
    rgba = np.dstack([astronaut, np.full((512, 512), 255, np.uint8)])
    rgba[y1:y2, x1:x2, 3] = 0
    result = cf_anonymiser.anonymise(png_bytes(rgba))
    assert_clean_output(result.data)
    assert result.report.had_alpha
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.mode == "RGB"
    out = decode_output(result.data)
    hidden = astronaut[y1:y2, x1:x2]
    shown = out[y1:y2, x1:x2]
    same = np.all(shown == hidden, axis=-1) & ~np.all(hidden == FLATTEN_BACKGROUND, axis=-1)
    assert not same.any(), f"{same.sum()} hidden face pixels reached the output"
    inside = covered_mask((512, 512), region_boxes(result.report))[y1:y2, x1:x2]
    assert np.all(shown[~inside] == FLATTEN_BACKGROUND)


# --------------------------------------------------------------------------- opaqueness


def _face_inverted(astronaut: np.ndarray) -> np.ndarray:
    other = astronaut.copy()
    x1, y1, x2, y2 = 150, 30, 300, 210
    other[y1:y2, x1:x2] = 255 - other[y1:y2, x1:x2]
    return other


FIXED_BOXES = [(150.0, 30.0, 300.0, 210.0), (20.0, 400.0, 60.0, 440.0)]


@pytest.mark.parametrize("style", ["solid", "emoji"])
def test_covered_pixels_do_not_depend_on_the_original(astronaut: np.ndarray, style: str) -> None:
    """Two inputs that differ only inside the head area give identical output pixels inside
    every region (equal to the cover) and unchanged pixels outside."""
    settings = Settings(residual_pass=False, safeguard=False, style=CoverStyle(style))
    anonymiser = Anonymiser(settings, locators=[FixedLocator(FIXED_BOXES)])
    other = _face_inverted(astronaut)
    report_a, report_b = new_report(astronaut), new_report(other)
    out_a = anonymiser.anonymise_array(astronaut, report_a)
    out_b = anonymiser.anonymise_array(other, report_b)
    assert [r.box for r in report_a.regions] == [r.box for r in report_b.regions]
    boxes = region_boxes(report_a)
    assert len(boxes) == 2
    mask = covered_mask((512, 512), boxes)
    # the difference between the inputs lies inside the covered area
    assert mask[np.any(astronaut != other, axis=-1)].all()
    np.testing.assert_array_equal(out_a[mask], out_b[mask])
    np.testing.assert_array_equal(out_a[~mask], astronaut[~mask])
    for x1, y1, x2, y2 in boxes:
        tile = out_a[y1:y2, x1:x2]
        if style == "solid":
            assert np.all(tile == CoverStyle().colour)
        else:
            np.testing.assert_array_equal(tile, render(x2 - x1, y2 - y1))


def test_regions_are_padded_head_boxes(astronaut: np.ndarray) -> None:
    """A head box becomes a 1.2x region rounded outwards, reported with its locator's name."""
    anonymiser = Anonymiser(Settings(residual_pass=False, safeguard=False), locators=[FixedLocator([(100, 100, 200, 150)])])
    report = new_report(astronaut)
    anonymiser.anonymise_array(astronaut, report)
    assert [r.box for r in report.regions] == [(90, 95, 210, 155)]
    assert report.regions[0].sources == ["fixed"]
    assert report.detections == {"fixed": 1} and report.regions_by_source == {"fixed": 1}
    assert report.covered_fraction == pytest.approx(120 * 60 / 512**2)


# --------------------------------------------------------------------------- output budget


def test_large_image_is_scaled_and_regions_follow(astronaut: np.ndarray) -> None:
    """Over max_output_pixels the output is scaled down, regions are reported in output pixels
    and exactly those output pixels are covered."""
    budget = 200 * 200
    locator = FixedLocator([(150, 30, 300, 210)])
    settings = Settings(residual_pass=False, safeguard=False, style=CoverStyle("solid"), limits=Limits(max_output_pixels=budget))
    result = Anonymiser(settings, locators=[locator]).anonymise(png_bytes(astronaut))
    out = decode_output(result.data)
    assert out.shape[0] * out.shape[1] <= budget
    assert result.report.output_size == (out.shape[1], out.shape[0])
    assert locator.calls == [(512, 512, 3)]  # located at full resolution
    scale = out.shape[1] / 512
    (region,) = result.report.regions
    padded = reg.pad_boxes(np.array([[150, 30, 300, 210]], np.float32), "head")[0] * scale
    assert np.allclose(region.box, padded, atol=1.01)
    x1, y1, x2, y2 = region.box
    assert np.all(out[y1:y2, x1:x2] == CoverStyle().colour)
    ring = out[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2]
    assert not np.all(ring == CoverStyle().colour)


def test_tall_image_cover_lands_on_the_head() -> None:
    """Scaling a tall, narrow image to the budget must keep each cover on its head: no pixel of
    the (pure red) head survives."""
    image = np.full((10000, 100, 3), 128, np.uint8)
    image[9000:9050, 25:75] = (255, 0, 0)
    settings = Settings(residual_pass=False, safeguard=False, style=CoverStyle("solid"), limits=Limits(max_output_pixels=250_000))
    anonymiser = Anonymiser(settings, locators=[FixedLocator([(25, 9000, 75, 9050)])])
    out = anonymiser.anonymise_array(image, new_report(image))
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    assert not red.any(), f"{red.sum()} head pixels left uncovered"


def test_extreme_aspect_ratio_keeps_the_pixel_budget() -> None:
    """A 4000x1 image with a 1000-pixel output budget must come out within 1000 pixels."""
    image = np.full((1, 4000, 3), 128, np.uint8)
    settings = Settings(residual_pass=False, safeguard=False, limits=Limits(max_output_pixels=1000))
    out = Anonymiser(settings, locators=[FixedLocator([])]).anonymise_array(image, new_report(image))
    assert out.shape[0] * out.shape[1] <= 1000


def test_reviewed_regions_are_painted_once_each_and_within_reason() -> None:
    """10,000 whole-image boxes took five minutes to paint. Repeats are painted once; a list
    that would paint the image more than MAX_COVER_LAYERS times over is refused."""
    image = png_bytes(np.full((60, 80, 3), 200, np.uint8))
    result = cover_given(image, [(0, 0, 80, 60)] * 10_000 + [(5, 5, 20, 20), (0, 0, 80, 60)], Settings(style=CoverStyle("solid")))
    assert [r.box for r in result.report.regions] == [(0, 0, 80, 60), (5, 5, 20, 20)]
    assert np.all(decode_output(result.data) == CoverStyle().colour)
    layers = [(0, 0, 80 - i, 60) for i in range(2 * MAX_COVER_LAYERS)]  # ~1.6x the limit
    with pytest.raises(BadRegions, match="times over"):
        cover_given(image, layers)
    assert cover_given(image, layers[:MAX_COVER_LAYERS]).report.heads_covered == MAX_COVER_LAYERS


# --------------------------------------------------------------------------- residual pass


def test_residual_pass_covers_a_face_the_locators_missed(centerface_available: None, astronaut: np.ndarray) -> None:
    """With a locator that finds nothing, the residual CenterFace pass still covers the face."""
    anonymiser = Anonymiser(Settings(residual_pass=True), locators=[FixedLocator([])])
    report = new_report(astronaut)
    out = anonymiser.anonymise_array(astronaut, report)
    assert report.regions_by_source.get("residual", 0) >= 1
    residual = [r for r in report.regions if r.sources == ["residual"]]
    assert any(contains(r.box, ASTRONAUT_FACE) for r in residual), report.regions
    x1, y1, x2, y2 = ASTRONAUT_FACE
    assert not np.array_equal(out[y1:y2, x1:x2], astronaut[y1:y2, x1:x2])
    assert report.heads_covered == len(report.regions)


def test_residual_pass_ignores_our_own_emoji(centerface_available: None, astronaut: np.ndarray) -> None:
    """When the face is already covered, the residual pass adds nothing (the fist is not a face)."""
    anonymiser = Anonymiser(Settings(residual_pass=True, safeguard=False), locators=[FixedLocator([(150, 30, 300, 210)])])
    report = new_report(astronaut)
    anonymiser.anonymise_array(astronaut, report)
    assert "residual" not in report.regions_by_source
    assert len(report.regions) == 1


def test_residual_face_cut_by_the_frame_is_padded_from_its_whole_box() -> None:
    """A face the residual pass finds half outside the left edge is padded from its whole
    predicted box (up to x = 64), not from its visible half (x = 52): as for the locators."""
    image = np.full((300, 300, 3), 128, np.uint8)
    anonymiser = Anonymiser(Settings(residual_pass=True, safeguard=False), locators=[FixedLocator([])])
    anonymiser._residual = FixedLocator([(-40, 100, 40, 200)], name="centerface", kind="face")
    report = new_report(image)
    anonymiser.anonymise_array(image, report)
    assert [(r.box, r.sources) for r in report.regions] == [((0, 50, 64, 220), ["residual"])]


def test_no_residual_pass_when_disabled(astronaut: np.ndarray) -> None:
    """residual_pass=False really skips it: a missed face stays uncovered (this is why the
    pass is on by default)."""
    anonymiser = Anonymiser(Settings(residual_pass=False), locators=[FixedLocator([])])
    report = new_report(astronaut)
    out = anonymiser.anonymise_array(astronaut, report)
    assert report.regions == [] and report.covered_fraction == 0.0
    np.testing.assert_array_equal(out, astronaut)


# --------------------------------------------------------------------------- safeguard and regions


def _grid(rows: int, cols: int, side: float, pitch: float, missing: set[tuple[int, int]] = frozenset()) -> reg.Regions:
    """Square regions of ``side`` on a ``pitch`` grid starting at (50, 50), minus ``missing``."""
    boxes = [
        [50 + c * pitch, 50 + r * pitch, 50 + c * pitch + side, 50 + r * pitch + side]
        for r in range(rows)
        for c in range(cols)
        if (r, c) not in missing
    ]
    return reg.Regions(np.asarray(boxes, np.float32), [frozenset({"heads"})] * len(boxes))


def _coverage(regions: reg.Regions, cell: tuple[int, int, int, int], size: int = 400) -> float:
    """Fraction of ``cell`` inside the union of ``regions``."""
    if not len(regions):
        return 0.0
    pixels, _ = reg.to_pixels(regions.boxes, 1.0, size, size)
    x1, y1, x2, y2 = cell
    return float(covered_mask((size, size), pixels)[y1:y2, x1:x2].mean())


@pytest.mark.parametrize("side,pitch", [(20, 20), (24, 20)])
def test_gap_bridge_fills_a_missing_head_in_a_row(side: int, pitch: int) -> None:
    """In a row of touching (or overlapping, as padded regions do) heads with one missing, a
    'safeguard' bridge covers the whole missing head."""
    row = _grid(1, 7, side, pitch, missing={(0, 3)})
    bridges = reg.gap_bridges(row, (400, 400))
    assert len(bridges) >= 1
    assert all(s == frozenset({"safeguard"}) for s in bridges.sources)
    x = 50 + 3 * pitch
    assert _coverage(bridges, (x, 50, x + pitch, 50 + side)) == 1.0


@pytest.mark.parametrize("side,pitch", [(20, 20), (24, 20)])
def test_gap_bridge_fills_a_missing_head_in_a_packed_grid(side: int, pitch: int) -> None:
    """In a packed 5x5 grid of heads with the centre one missing, heads and bridges together
    cover the missing cell."""
    grid = _grid(5, 5, side, pitch, missing={(2, 2)})
    bridges = reg.gap_bridges(grid, (400, 400))
    x = 50 + 2 * pitch
    assert _coverage(grid.extend(bridges), (x, x, x + pitch, x + pitch)) == 1.0


def test_gap_bridges_leave_isolated_heads_alone() -> None:
    """Heads far apart (a sparse photo) get no bridge; nor does a small far head next to a
    large near one; nor does a packed crowd where every head was found."""
    assert len(reg.gap_bridges(_grid(3, 3, 20, 100), (400, 400))) == 0
    mixed = reg.Regions(np.array([[0, 0, 100, 100], [110, 0, 130, 20]], np.float32), [frozenset({"a"})] * 2)
    assert len(reg.gap_bridges(mixed, (400, 400))) == 0
    assert len(reg.gap_bridges(reg.Regions(), (400, 400))) == 0
    assert len(reg.gap_bridges(_grid(1, 5, 20, 20), (400, 400), gap_factor=0)) == 0
    complete = _grid(5, 5, 24, 20)
    assert _coverage(reg.gap_bridges(complete, (400, 400)), (0, 0, 400, 400)) < 0.01


def test_safeguard_regions_are_covered_without_fist(astronaut: np.ndarray) -> None:
    """Through the pipeline, a row of heads with one missing gets a 'safeguard' region over the
    gap, painted opaque backing (no fist) and not counted as a head."""
    boxes = [(100 + 30 * c, 300, 130 + 30 * c, 330) for c in (0, 1, 3, 4)]
    anonymiser = Anonymiser(Settings(residual_pass=False, safeguard=True), locators=[FixedLocator(boxes)])
    report = new_report(astronaut)
    out = anonymiser.anonymise_array(astronaut, report)
    bridges = [r for r in report.regions if r.sources == ["safeguard"]]
    assert len(bridges) >= 1
    assert report.heads_covered == 4
    assert report.regions_by_source["safeguard"] == len(bridges)
    missing = (160, 300, 190, 330)
    assert any(contains(r.box, missing) for r in bridges), report.regions
    heads = covered_mask((512, 512), np.array([r.box for r in report.regions if r.sources != ["safeguard"]]))
    for region in bridges:
        x1, y1, x2, y2 = region.box
        own = out[y1:y2, x1:x2][~heads[y1:y2, x1:x2]]
        assert len(own) and np.all(own == DEFAULT_BACKING)


def test_pad_boxes_geometry() -> None:
    """Face boxes grow 1.6x wide, 1.7x high and move up by 15 % of their height; head boxes
    grow 1.2x around their centre."""
    face = reg.pad_boxes(np.array([[100, 100, 200, 300]]), "face")[0]
    np.testing.assert_allclose(face, [70, 0, 230, 340], atol=1e-4)
    head = reg.pad_boxes(np.array([[100, 100, 200, 300]]), "head")[0]
    np.testing.assert_allclose(head, [90, 80, 210, 320], atol=1e-4)


def test_merge_unites_boxes_of_one_head_only() -> None:
    """Overlapping boxes from two locators merge into their enclosing box with both sources;
    a separate head stays separate."""
    regions = reg.Regions(
        np.array([[10, 10, 50, 50], [12, 8, 52, 48], [200, 200, 240, 240], [20, 20, 40, 40]], np.float32),
        [frozenset({"centerface"}), frozenset({"heads"}), frozenset({"heads"}), frozenset({"heads"})],
    )
    merged = reg.merge(regions)
    assert len(merged) == 2
    order = np.argsort(merged.boxes[:, 0])
    np.testing.assert_array_equal(merged.boxes[order[0]], [10, 8, 52, 50])
    assert merged.sources[order[0]] == frozenset({"centerface", "heads"})
    np.testing.assert_array_equal(merged.boxes[order[1]], [200, 200, 240, 240])


def test_merge_of_a_huge_crowd_equals_comparing_every_pair() -> None:
    """Merging compares each block of boxes only with those whose x ranges overlap it: the same
    groups as comparing every pair (checked here over several blocks, with chains of boxes that
    merge across blocks), in the order of each group's first box."""
    rng = np.random.default_rng(3)
    n = 2600
    centres = rng.uniform(0, 3000, (n, 2))
    sides = rng.uniform(10, 40, (n, 1))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).astype(np.float32)
    shift = rng.normal(0, 3, (len(boxes[::7]), 2))
    boxes[::7] += np.concatenate([shift, shift], axis=1).astype(np.float32)
    sources = [frozenset({str(k % 3)}) for k in range(n)]
    merged = reg.merge(reg.Regions(boxes, sources))

    same = (iou_matrix(boxes, boxes) >= reg.MERGE_IOU) | (reg._containment(boxes, boxes) >= reg.MERGE_CONTAINMENT)
    np.fill_diagonal(same, True)
    group = np.arange(n)
    for _ in range(n):  # label propagation to the lowest index in each connected group
        lowest = np.where(same, group[None, :], n).min(axis=1)
        if np.array_equal(lowest, group):
            break
        group = np.minimum(group, lowest)[group]
    firsts = np.unique(group)
    assert 50 < n - len(firsts) < n // 2, "the crowd should have both merges and lone heads"
    assert len(merged) == len(firsts)
    for out, first in enumerate(firsts):
        members = group == first
        expected = [boxes[members, 0].min(), boxes[members, 1].min(), boxes[members, 2].max(), boxes[members, 3].max()]
        np.testing.assert_array_equal(merged.boxes[out], np.asarray(expected, np.float32))
        assert merged.sources[out] == frozenset().union(*(sources[k] for k in np.nonzero(members)[0]))


def test_safeguard_coverage_table_stays_lean() -> None:
    """The safeguard's summed-area table runs at the photo's full size: an int32 mask and two
    int64 sums took 20 bytes per pixel (2 GB at 100 MP). Same fractions, under 12 bytes."""
    import tracemalloc

    w, h = 3000, 2000
    covered = np.array([[100, 100, 400, 300], [350, 250, 900, 700], [2500, 1500, 3000, 2000]], np.float32)
    squares = np.array([[100, 100, 200, 200], [380, 260, 420, 300], [0, 0, 50, 50], [2900, 1900, 3100, 2100]], np.float32)
    tracemalloc.start()
    fractions = reg._coverage_fraction(squares, covered, w, h)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(fractions, [1.0, 1.0, 0.0, 1.0])
    assert peak < 12 * w * h, f"{peak / (w * h):.1f} bytes per pixel"


def test_to_pixels_rounds_outwards_and_clips() -> None:
    """Integer regions always contain the float ones; boxes are clipped; empty ones dropped."""
    boxes = np.array([[1.7, 2.7, 10.1, 20.2], [-5, -5, 3.5, 3.5], [50, 50, 60, 60], [9, 9, 9, 12]])
    pixels, keep = reg.to_pixels(boxes, 1.0, 40, 40)
    np.testing.assert_array_equal(keep, [True, True, False, False])
    np.testing.assert_array_equal(pixels, [[1, 2, 11, 21], [0, 0, 4, 4]])
    scaled, _ = reg.to_pixels(np.array([[10.0, 10.0, 21.0, 21.0]]), 0.5, 40, 40)
    np.testing.assert_array_equal(scaled, [[5, 5, 11, 11]])


def test_a_downscaled_cover_takes_in_every_output_pixel_a_covered_source_pixel_blends_into() -> None:
    """Downscaling averages each output pixel's footprint (``INTER_AREA``): every output pixel
    holding any source pixel the full-size cover would paint must be covered, including the
    source pixels only partly inside a box."""
    rng = np.random.default_rng(7)
    h, w = 97, 131
    for _ in range(300):
        x1, y1 = rng.uniform(-3, 120, 2)
        box = np.array([[x1, y1, x1 + rng.uniform(0.2, 12), y1 + rng.uniform(0.2, 12)]])
        out_w, out_h = int(rng.integers(5, w)), int(rng.integers(5, h))
        full, _ = reg.to_pixels(box, 1.0, w, h)
        head = np.zeros((h, w), np.float32)
        for bx1, by1, bx2, by2 in full:
            head[by1:by2, bx1:bx2] = 1.0
        blended = cv2.resize(head, (out_w, out_h), interpolation=cv2.INTER_AREA) > 0
        scaled, _ = reg.to_pixels(box, (out_w / w, out_h / h), out_w, out_h)
        assert not (blended & ~covered_mask((out_h, out_w), scaled)).any(), (box, out_w, out_h)


# --------------------------------------------------------------------------- plumbing


def test_report_is_json_ready_and_anonymous(cf_anonymiser: Anonymiser, astronaut: np.ndarray) -> None:
    """The report serialises to JSON, holds timings and counts, and never a file name or pixels."""
    small = np.ascontiguousarray(astronaut[::2, ::2])
    result = cf_anonymiser.anonymise(png_bytes(small))
    text = json.dumps(result.report.to_dict())
    loaded = json.loads(text)
    assert loaded["input_format"] == "png" and loaded["output_size"] == [256, 256]
    assert loaded["input_bytes"] > 0 and loaded["output_bytes"] == len(result.data)
    assert {"decode", "cover", "encode", "total"} <= set(loaded["timings_s"])
    assert len(text) < 5000


def test_anonymise_propagates_decode_errors(cf_anonymiser: Anonymiser) -> None:
    """Undecodable input raises the decoder's typed error, not a generic one."""
    with pytest.raises(EmptyImage):
        cf_anonymiser.anonymise(b"")


def test_anonymiser_refuses_unknown_or_missing_locators(tmp_path: Path) -> None:
    """An unknown locator name is a ValueError; a locator without its weights a WeightsError."""
    with pytest.raises(ValueError, match="unknown locator"):
        Anonymiser(Settings(locators=("nope",)), weights_dir=tmp_path)
    with pytest.raises(WeightsError):
        Anonymiser(Settings(locators=("heads",)), weights_dir=tmp_path)


def test_fixed_locator_satisfies_the_protocol() -> None:
    """The test double is a HeadLocator, so the pipeline tests exercise the real interface."""
    locator = FixedLocator([(0, 0, 1, 1)])
    assert isinstance(locator, HeadLocator)
    assert isinstance(locator.locate(np.zeros((4, 4, 3), np.uint8)), Detections)
