"""The HEIF/AVIF ``meta`` reader: clean apertures and the real size of derived images.

Every file is built here: small pictures encoded by Pillow (AVIF) or pillow-heif (HEIC), then
taken apart and reassembled with the items, properties and references each case needs. Where
the real decoders can be asked, they are: libheif applies clean apertures itself, so its size
is the reference for the crop; Pillow's AVIF plugin does not, so cropping what it returns must
leave exactly the part a viewer shows.
"""

from __future__ import annotations

import io
import random
import struct
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageOps

from anonymiser.decode import decode
from anonymiser.errors import AnimatedImage, CorruptImage, ImageTooLarge, ImageTooNarrow
from anonymiser.isobmff import AV1_HEAD_BYTES, MAX_AV1_OBUS_BEFORE_FRAME, MAX_TOP_LEVEL_BOXES, PrimaryLayout, primary_layout
from anonymiser.limits import Limits

pillow_heif.register_heif_opener()

RED, GREY, GREEN, BLUE = (220, 30, 30), (128, 128, 128), (30, 200, 30), (30, 30, 220)


# --- building files ------------------------------------------------------------------------


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big") + payload)


def ispe(width: int, height: int) -> bytes:
    return full_box(b"ispe", 0, 0, struct.pack(">II", width, height))


def clap(width, height, h_off=0, v_off=0, width_d=1, height_d=1, h_off_d=1, v_off_d=1) -> bytes:
    """A clean aperture; the offsets move its centre away from the frame's centre."""
    return box(b"clap", struct.pack(">IIIIiIiI", width, width_d, height, height_d, h_off, h_off_d, v_off, v_off_d))


def clap_at_origin(frame: tuple[int, int], size: tuple[int, int]) -> bytes:
    """A clean aperture of ``size`` anchored at the frame's top-left corner, as AVIF writers
    make it: offset = (aperture - frame) / 2, in halves."""
    (fw, fh), (cw, ch) = frame, size
    return clap(cw, ch, cw - fw, ch - fh, h_off_d=2, v_off_d=2)


def irot(quarter_turns_ccw: int) -> bytes:
    return box(b"irot", bytes([quarter_turns_ccw & 3]))


def grid_descriptor(rows: int, cols: int, width: int, height: int) -> bytes:
    wide = width > 0xFFFF or height > 0xFFFF
    return bytes([0, int(wide), rows - 1, cols - 1]) + struct.pack(">II" if wide else ">HH", width, height)


def overlay_descriptor(width: int, height: int, offsets: list[tuple[int, int]]) -> bytes:
    wide = width > 0xFFFF or height > 0xFFFF
    code = ">i" if wide else ">h"
    body = bytes([0, int(wide)]) + struct.pack(">4H", 0, 0, 0, 0xFFFF)
    body += struct.pack(">II" if wide else ">HH", width, height)
    return body + b"".join(struct.pack(code, x) + struct.pack(code, y) for x, y in offsets)


@dataclass
class Item:
    id: int
    type: bytes
    data: bytes
    #: (raw property box, essential) in association order
    props: list[tuple[bytes, bool]] = field(default_factory=list)
    hidden: bool = False
    in_idat: bool = False


def assemble(brand: bytes, items: list[Item], primary: int, refs: list[tuple[bytes, int, list[int]]] = ()) -> bytes:
    """A HEIF/AVIF file: ftyp, meta (hdlr, pitm, iloc v1, iinf, iref, iprp, idat), mdat."""
    properties: list[bytes] = []
    for item in items:
        for raw, _ in item.props:
            if raw not in properties:
                properties.append(raw)
    def associations(item: Item) -> bytes:  # 16-bit indices, the top bit saying "essential"
        values = [(0x8000 if essential else 0) | (properties.index(raw) + 1) for raw, essential in item.props]
        return struct.pack(f">HB{len(values)}H", item.id, len(values), *values)

    ipma = b"".join(associations(item) for item in items)
    iprp = box(b"iprp", box(b"ipco", b"".join(properties)) + full_box(b"ipma", 0, 1, struct.pack(">I", len(items)) + ipma))
    iinf = full_box(
        b"iinf", 0, 0,
        struct.pack(">H", len(items))
        + b"".join(full_box(b"infe", 2, int(item.hidden), struct.pack(">HH4sx", item.id, 0, item.type)) for item in items),
    )
    references = b"".join(box(kind, struct.pack(f">HH{len(to)}H", source, len(to), *to)) for kind, source, to in refs)
    iref = full_box(b"iref", 0, 0, references) if refs else b""
    idat = b"".join(item.data for item in items if item.in_idat)
    ftyp = box(b"ftyp", brand + b"\0\0\0\0" + b"mif1miaf" + brand)

    def meta(mdat_payload: int) -> bytes:
        entries, in_mdat, in_idat = [], mdat_payload, 0
        for item in items:
            start = in_idat if item.in_idat else in_mdat
            entries.append(struct.pack(">HHHHII", item.id, int(item.in_idat), 0, 1, start, len(item.data)))
            if item.in_idat:
                in_idat += len(item.data)
            else:
                in_mdat += len(item.data)
        iloc = full_box(b"iloc", 1, 0, bytes([0x44, 0x00]) + struct.pack(">H", len(items)) + b"".join(entries))
        hdlr = full_box(b"hdlr", 0, 0, b"\0\0\0\0pict" + b"\0" * 13)
        pitm = full_box(b"pitm", 0, 0, struct.pack(">H", primary))
        return full_box(b"meta", 0, 0, hdlr + pitm + iloc + iinf + iref + iprp + (box(b"idat", idat) if idat else b""))

    head = ftyp + meta(0)
    head = ftyp + meta(len(head) + 8)
    return head + box(b"mdat", b"".join(item.data for item in items if not item.in_idat))


def children(data: bytes, start: int, end: int) -> dict[bytes, list[tuple[int, int]]]:
    """Payload (start, end) of each box in ``data[start:end]``; our encoders' files only."""
    out: dict[bytes, list[tuple[int, int]]] = {}
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        out.setdefault(kind, []).append((start + 8, start + size))
        start += size
    return out


@dataclass(frozen=True)
class Coded:
    """One coded picture taken out of an encoder's one-item file."""

    type: bytes
    #: the item's properties other than ispe (codec configuration, colour, pixi, and the clap
    #: libheif adds when the coded picture is larger than the image), as associated
    props: tuple[tuple[bytes, bool], ...]
    data: bytes
    size: tuple[int, int]

    def item(self, id: int, size: tuple[int, int] | None = None, extra=(), hidden: bool = False) -> Item:
        """An item of this picture; ``size`` is the ispe it claims (its true size by default)."""
        return Item(id, self.type, self.data, [*self.props, (ispe(*(size or self.size)), False), *extra], hidden)


def coded_from(encoded: bytes) -> Coded:
    top = children(encoded, 0, len(encoded))
    meta_start, meta_end = top[b"meta"][0]
    meta = children(encoded, meta_start + 4, meta_end)
    infe_at = children(encoded, meta[b"iinf"][0][0] + 6, meta[b"iinf"][0][1])[b"infe"][0][0]
    item_type = encoded[infe_at + 8 : infe_at + 12]
    # iloc version 0 as both encoders write it: one item, one extent
    iloc = meta[b"iloc"][0][0]
    sizes, more = encoded[iloc + 4], encoded[iloc + 5]
    assert sizes == 0x44 and encoded[iloc] == 0, (sizes, encoded[iloc])
    pos = iloc + 8 + 4  # count, item id, data reference
    base = int.from_bytes(encoded[pos : pos + (more >> 4)], "big")
    pos += (more >> 4) + 2
    offset, length = struct.unpack_from(">II", encoded, pos)
    iprp = children(encoded, *meta[b"iprp"][0])
    ipco_start, ipco_end = iprp[b"ipco"][0]
    raw, pos = [], ipco_start
    while pos < ipco_end:
        size = struct.unpack_from(">I", encoded, pos)[0]
        raw.append(encoded[pos : pos + size])
        pos += size
    ipma = iprp[b"ipma"][0][0]
    assert encoded[ipma : ipma + 4] == b"\0\0\0\0"  # version 0, 7-bit indices
    n = encoded[ipma + 10]
    props, size = [], None
    for value in encoded[ipma + 11 : ipma + 11 + n]:
        prop = raw[(value & 0x7F) - 1]
        if prop[4:8] == b"ispe":
            size = struct.unpack_from(">II", prop, 12)
        else:
            props.append((prop, bool(value & 0x80)))
    return Coded(item_type, tuple(props), encoded[base + offset : base + offset + length], size)


def picture(width: int, height: int, aperture: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Red everywhere but ``aperture``, whose left half is green and right half blue (so that a
    turn or a mirror shows); without an aperture, a flat grey."""
    rgb = np.empty((height, width, 3), np.uint8)
    if aperture is None:
        rgb[:] = GREY
        return rgb
    rgb[:] = RED
    left, top, right, bottom = aperture
    middle = (left + right) // 2
    rgb[top:bottom, left:middle] = GREEN
    rgb[top:bottom, middle:right] = BLUE
    return rgb


def encoded(fmt: str, width: int, height: int, aperture=None, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture(width, height, aperture)).save(buffer, fmt, quality=quality)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def coded(fmt: str, width: int, height: int, aperture=None, quality: int = 90) -> Coded:
    return coded_from(encoded(fmt, width, height, aperture, quality))


BRAND = {"HEIF": b"heic", "AVIF": b"avif"}


def single(fmt: str, width: int, height: int, aperture=None, extra: list[tuple[bytes, bool]] = (), claimed=None) -> bytes:
    """A one-item file of a ``width`` x ``height`` picture with extra properties after its own."""
    return assemble(BRAND[fmt], [coded(fmt, width, height, aperture).item(1, claimed, list(extra))], 1)


def grid(fmt: str, tile: Coded, rows: int, cols: int, canvas: tuple[int, int], claimed: tuple[int, int] | None = None,
         extra: list[tuple[bytes, bool]] = (), distinct: bool = False, in_idat: bool = False) -> bytes:
    """A grid (item 1) of rows x cols references to one tile item, or to as many ``distinct``
    items of the same picture (libavif takes each tile item for one place in one grid)."""
    pixi = [p for p in tile.props if p[0][4:8] == b"pixi"]
    props = [(ispe(*(claimed or canvas)), False), *pixi, *extra]
    grid_item = Item(1, b"grid", grid_descriptor(rows, cols, *canvas), props, in_idat=in_idat)
    ids = list(range(2, 2 + rows * cols)) if distinct else [2] * (rows * cols)
    tiles = [tile.item(i, hidden=True) for i in sorted(set(ids))]
    return assemble(BRAND[fmt], [grid_item, *tiles], 1, [(b"dimg", 1, ids)])


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def outcome(data: bytes):
    try:
        return primary_layout(data)
    except CorruptImage as exc:
        return exc


# --- plain files, as the encoders write them ----------------------------------------------


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_a_plain_file_is_its_own_size_and_uncropped(fmt):
    data = encoded(fmt, 96, 64)
    layout = primary_layout(data)
    assert layout == PrimaryLayout(decoded_pixels=96 * 64, crop=None)
    assert opened(data).size == (96, 64)


def test_libheif_writes_a_clean_aperture_itself_for_an_odd_size():
    """HEVC codes whole 2x2 chroma blocks: a 65x65 picture is coded as 66x66 and cropped by a
    clap that pillow-heif writes. Real photos carry clean apertures, not only hostile ones."""
    data = encoded("HEIF", 65, 65)
    assert primary_layout(data) == PrimaryLayout(66 * 66, (0, 0, 65, 65))
    assert opened(data).size == (65, 65)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_a_reassembled_file_still_decodes(fmt):
    """The builder itself: a file taken apart and put together again is read by the decoders."""
    data = single(fmt, 96, 64)
    assert primary_layout(data) == PrimaryLayout(96 * 64, None)
    image = opened(data)
    image.load()
    assert image.size == (96, 64)


# --- clean apertures ------------------------------------------------------------------------


def test_the_auditors_avif_clean_aperture_is_the_top_left_quarter():
    # 512x512, aperture 256x256 at offsets -128,-128: its centre is the top-left quarter's centre
    data = single("AVIF", 512, 512, (0, 0, 256, 256), [(clap(256, 256, -128, -128), True)])
    assert primary_layout(data) == PrimaryLayout(512 * 512, (0, 0, 256, 256))


def test_a_centred_clean_aperture_is_the_centred_rectangle():
    data = single("AVIF", 512, 384, None, [(clap(200, 100), True)])
    assert primary_layout(data).crop == (156, 142, 356, 242)


def test_an_aperture_anchored_at_the_origin_in_halves():
    data = single("AVIF", 512, 512, None, [(clap_at_origin((512, 512), (300, 170)), True)])
    assert primary_layout(data).crop == (0, 0, 300, 170)


def test_a_fractional_aperture_is_rounded_inward():
    # width 301 in a 512 frame starts at 105.5: pixels 105 and 406 are half outside, dropped;
    # height 200/3 in a 384 frame runs from 158.67 to 225.33: pixels 159 to 224 are whole
    data = single("AVIF", 512, 384, None, [(clap(301, 200, height_d=3), True)])
    left, top, right, bottom = primary_layout(data).crop
    assert (left, right) == (106, 406)
    assert (top, bottom) == (159, 225)


def test_an_aperture_reaching_past_the_frame_is_clamped():
    data = single("AVIF", 512, 512, None, [(clap(400, 400, 200, -200), True)])
    assert primary_layout(data).crop == (256, 0, 512, 256)


@pytest.mark.parametrize(
    "aperture",
    [clap(256, 256, width_d=0), clap(256, 256, height_d=0), clap(256, 256, h_off_d=0), clap(256, 256, v_off_d=0)],
    ids=["width", "height", "horizontal offset", "vertical offset"],
)
def test_a_zero_denominator_is_corrupt(aperture):
    with pytest.raises(CorruptImage, match="divides by zero"):
        primary_layout(single("AVIF", 64, 64, None, [(aperture, True)]))


@pytest.mark.parametrize(
    "aperture",
    [clap(0, 64), clap(64, 64, 1000, 0), clap(1, 1, height_d=2)],
    ids=["zero wide", "beside the frame", "under a pixel"],
)
def test_an_aperture_without_a_whole_pixel_is_corrupt(aperture):
    with pytest.raises(CorruptImage, match="no pixel"):
        primary_layout(single("AVIF", 64, 64, None, [(aperture, True)]))


def test_an_aperture_without_a_size_to_refer_to_is_corrupt():
    tile = coded("AVIF", 64, 64)
    item = Item(1, tile.type, tile.data, [*tile.props, (clap(32, 32), True)])
    with pytest.raises(CorruptImage, match="how large"):
        primary_layout(assemble(b"avif", [item], 1))


def test_two_apertures_or_a_turn_before_the_aperture_are_refused():
    with pytest.raises(CorruptImage, match="two clean apertures"):
        primary_layout(single("AVIF", 64, 64, None, [(clap(32, 32), True), (clap(16, 16), True)]))
    with pytest.raises(CorruptImage, match="rotates or mirrors"):
        primary_layout(single("AVIF", 64, 64, None, [(irot(1), True), (clap(32, 32), True)]))


def test_a_truncated_aperture_is_corrupt():
    with pytest.raises(CorruptImage, match="cut short"):
        primary_layout(single("AVIF", 64, 64, None, [(box(b"clap", bytes(28)), True)]))


@pytest.mark.parametrize(
    "aperture, expected",
    [
        (clap(256, 256, -128, -128), (0, 0, 256, 256)),
        (clap(256, 256), (128, 128, 384, 384)),
        (clap_at_origin((512, 512), (300, 170)), (0, 0, 300, 170)),
        (clap(200, 100, 40, -60), (196, 146, 396, 246)),
    ],
    ids=["top-left quarter", "centred", "at the origin", "offset"],
)
def test_libheif_shows_the_size_of_the_computed_crop(aperture, expected):
    """libheif applies clean apertures for HEIC: what pillow-heif reports and decodes is the
    size of our crop, and none of the red outside it."""
    left, top, right, bottom = expected
    data = single("HEIF", 512, 512, expected, [(aperture, True)])
    assert primary_layout(data).crop == expected
    image = opened(data)
    assert image.size == (right - left, bottom - top)
    assert red_pixels(np.asarray(image.convert("RGB"))) == 0


def test_libheif_shows_at_most_a_pixel_more_of_a_fractional_aperture():
    data = single("HEIF", 512, 384, None, [(clap(301, 201), True)])
    left, top, right, bottom = primary_layout(data).crop
    width, height = opened(data).size
    assert (right - left, bottom - top) == (300, 200)
    assert (width, height) == (301, 201)  # libheif rounds the first pixel down, we round it away


def red_pixels(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_pillow_ignores_an_avif_aperture_and_our_crop_removes_exactly_the_hidden_part():
    """The finding itself: Pillow returns the whole coded frame, red border included; cropped to
    the computed aperture, what is left is what a viewer shows."""
    data = single("AVIF", 512, 512, (0, 0, 256, 256), [(clap(256, 256, -128, -128), True)])
    image = opened(data)
    assert image.size == (512, 512)
    full = np.asarray(image.convert("RGB"))
    assert red_pixels(full) > 100_000
    cropped = np.asarray(image.crop(primary_layout(data).crop).convert("RGB"))
    assert cropped.shape == (256, 256, 3) and red_pixels(cropped) == 0


def test_a_turned_avif_is_cropped_in_its_coded_frame_before_it_is_turned():
    """HEIF/MIAF apply clap, then irot, then imir. Pillow returns an AVIF's coded frame with the
    turn as an EXIF orientation, so the crop is taken before the orientation is applied; the
    same file as HEIC, where libheif does both, shows the same picture."""
    aperture = (0, 0, 256, 128)  # green left half, blue right half, red elsewhere
    extra = [(clap_at_origin((512, 512), (256, 128)), True), (irot(1), True)]  # clap first, as MIAF orders them
    avif = single("AVIF", 512, 512, aperture, extra)
    heic = single("HEIF", 512, 512, aperture, extra)
    assert primary_layout(avif).crop == primary_layout(heic).crop == aperture

    image = opened(avif)
    assert image.size == (512, 512)
    assert image.getexif().get(0x0112) == 8  # a quarter turn anticlockwise
    shown = np.asarray(ImageOps.exif_transpose(image.crop(aperture)).convert("RGB"))
    reference = np.asarray(opened(heic).convert("RGB"))
    assert shown.shape == reference.shape == (256, 128, 3)
    # turned anticlockwise, the blue right half is on top
    for rgb in (shown, reference):
        assert red_pixels(rgb) == 0
        assert rgb[:128, :, 2].mean() > 150 and rgb[128:, :, 1].mean() > 150


# --- derived images -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def big_tile() -> Coded:
    """A real 2048x2048 HEVC tile, as the auditor's bomb repeats it."""
    return coded("HEIF", 2048, 2048, quality=10)


def test_a_grid_that_lies_about_its_size_is_refused():
    """The auditor's bomb: the grid's ispe says 1000x1000, which pillow-heif reports and the
    budget passes; its 256 references to a 2048x2048 tile make libheif assemble 32768x32768
    (and only then refuse it, the canvas not being the size signalled)."""
    data = grid("HEIF", big_tile(), 16, 16, (32768, 32768), claimed=(1000, 1000))
    assert len(data) < 4000
    assert opened(data).size == (1000, 1000)
    with pytest.raises(CorruptImage, match="two different ways"):
        primary_layout(data)


def test_a_grid_counts_every_reference_to_its_tiles():
    # the same 2048x2048 tile 256 times, on an honest 32768x32768 grid
    data = grid("HEIF", big_tile(), 16, 16, (32768, 32768))
    assert primary_layout(data).decoded_pixels == 256 * 2048 * 2048


def test_a_grid_whose_tiles_are_too_few_for_its_canvas_counts_the_canvas():
    data = grid("HEIF", coded("HEIF", 64, 64), 1, 1, (32768, 32768))
    assert primary_layout(data).decoded_pixels == 32768 * 32768


def test_an_honest_grid_cropped_to_a_small_aperture_counts_the_whole_grid():
    data = grid("HEIF", big_tile(), 16, 16, (32768, 32768), extra=[(clap_at_origin((32768, 32768), (1000, 1000)), True)])
    assert opened(data).size == (1000, 1000)  # what pillow-heif reports, and the budget saw
    layout = primary_layout(data)
    assert layout.decoded_pixels >= 32768 * 32768
    assert layout.crop == (0, 0, 1000, 1000)


def test_an_avif_grid_whose_size_is_stated_twice_is_refused_rather_than_sheared():
    """libavif builds the 128x128 canvas; Pillow reads it as the 100x100 its ispe says, so each
    row starts 28 pixels further into the picture than the last (here the green left half of
    each tile drifts right, row by row)."""
    data = grid("AVIF", coded("AVIF", 64, 64, (0, 0, 64, 64)), 2, 2, (128, 128), claimed=(100, 100), distinct=True)
    image = opened(data)
    assert image.size == (100, 100)
    rgb = np.asarray(image.convert("RGB")).astype(int)
    greens = [int((rgb[row, :, 1] > 150).sum()) for row in (0, 50, 99)]
    assert greens[0] != greens[1] != greens[2]  # an honest picture has the same count in every row
    with pytest.raises(CorruptImage, match="two different ways"):
        primary_layout(data)


def test_an_aperture_on_a_grid_whose_size_is_stated_twice_is_refused():
    data = grid("HEIF", coded("HEIF", 64, 64), 2, 2, (128, 128), claimed=(100, 100), extra=[(clap(50, 50), True)])
    with pytest.raises(CorruptImage, match="two different ways"):
        primary_layout(data)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("in_idat", [False, True], ids=["descriptor in mdat", "descriptor in idat"])
def test_an_honest_grid_is_the_size_the_decoders_build(fmt, in_idat):
    # tiles of 64 covering a 120x100 canvas, as cameras overhang the last row and column
    data = grid(fmt, coded(fmt, 64, 64), 2, 2, (120, 100), distinct=True, in_idat=in_idat)
    layout = primary_layout(data)
    assert layout == PrimaryLayout(4 * 64 * 64, None)
    image = opened(data)
    image.load()
    assert image.size == (120, 100)


def test_an_overlay_counts_its_canvas_whatever_its_inputs():
    """libheif allocates an iovl's canvas as its descriptor says, whatever the inputs: a 64x64
    input on a 16384x16384 canvas. When its ispe says 64x64, that is what pillow-heif reports."""
    tile = coded("HEIF", 64, 64)
    for in_idat in (False, True):
        for claimed in ((16384, 16384), (64, 64)):
            descriptor = overlay_descriptor(16384, 16384, [(0, 0)])
            overlay = Item(2, b"iovl", descriptor, [(ispe(*claimed), False)], in_idat=in_idat)
            data = assemble(b"heic", [tile.item(1, hidden=True), overlay], 2, [(b"dimg", 2, [1])])
            assert opened(data).size == claimed
            if claimed == (64, 64):
                with pytest.raises(CorruptImage, match="two different ways"):
                    primary_layout(data)
            else:
                assert primary_layout(data).decoded_pixels == 16384 * 16384


def test_an_identity_image_counts_its_input():
    tile = coded("HEIF", 64, 64)
    iden = Item(2, b"iden", b"", [(ispe(64, 64), False)])
    data = assemble(b"heic", [tile.item(1, size=(4096, 4096), hidden=True), iden], 2, [(b"dimg", 2, [1])])
    assert primary_layout(data).decoded_pixels == 4096 * 4096


def test_an_alpha_plane_larger_than_the_photo_counts():
    tile = coded("HEIF", 64, 64)
    alpha = Item(3, b"grid", grid_descriptor(1, 1, 16384, 16384), [(ispe(16384, 16384), False)])
    primary = tile.item(1)
    data = assemble(b"heic", [primary, tile.item(2, hidden=True), alpha], 1, [(b"dimg", 3, [2]), (b"auxl", 3, [1])])
    assert primary_layout(data).decoded_pixels == 16384 * 16384


def test_a_layered_derivation_is_counted_without_walking_every_path():
    # six levels of 1000 references each: 10^18 tiles, counted in one look per item
    tile = coded("HEIF", 64, 64)
    items = [tile.item(1, hidden=True)] + [Item(i, b"iden", b"", [(ispe(64, 64), False)]) for i in range(2, 8)]
    refs = [(b"dimg", i, [i - 1] * 1000) for i in range(2, 8)]
    start = time.perf_counter()
    layout = primary_layout(assemble(b"heic", items, 7, refs))
    assert time.perf_counter() - start < 5.0  # a hang guard, with room for a loaded machine
    assert layout.decoded_pixels == 1000**6 * 64 * 64


@pytest.mark.parametrize(
    "refs",
    [[(b"dimg", 2, [2])], [(b"dimg", 2, [3]), (b"dimg", 3, [2])], [(b"dimg", 2, [3]), (b"dimg", 3, [4]), (b"dimg", 4, [2])]],
    ids=["self", "pair", "triangle"],
)
def test_a_reference_cycle_is_corrupt(refs):
    tile = coded("HEIF", 64, 64)
    items = [tile.item(1, hidden=True)] + [Item(i, b"iden", b"", [(ispe(64, 64), False)]) for i in (2, 3, 4)]
    with pytest.raises(CorruptImage, match="loop"):
        primary_layout(assemble(b"heic", items, 2, refs))


def test_a_derivation_too_deep_is_corrupt():
    tile = coded("HEIF", 64, 64)
    items = [tile.item(1, hidden=True)] + [Item(i, b"iden", b"", [(ispe(64, 64), False)]) for i in range(2, 22)]
    refs = [(b"dimg", i, [i - 1]) for i in range(2, 22)]
    with pytest.raises(CorruptImage, match="levels deep"):
        primary_layout(assemble(b"heic", items, 21, refs))


def test_a_missing_input_or_descriptor_is_corrupt():
    tile = coded("HEIF", 64, 64)
    iden = Item(2, b"iden", b"", [(ispe(64, 64), False)])
    with pytest.raises(CorruptImage, match="how large"):
        primary_layout(assemble(b"heic", [tile.item(1, hidden=True), iden], 2, [(b"dimg", 2, [9])]))
    short = Item(2, b"grid", b"\0\0\0", [(ispe(64, 64), False)])
    with pytest.raises(CorruptImage, match="cut short"):
        primary_layout(assemble(b"heic", [tile.item(1, hidden=True), short], 2, [(b"dimg", 2, [1])]))


# --- hostile and broken input ---------------------------------------------------------------


def test_files_without_an_index_are_left_to_the_decoder():
    assert primary_layout(b"") is None
    assert primary_layout(b"\xff\xd8\xff\xe0" + bytes(100)) is None  # a JPEG
    assert primary_layout(box(b"ftyp", b"heic\0\0\0\0mif1") + box(b"mdat", bytes(50))) is None
    no_pitm = full_box(b"meta", 0, 0, full_box(b"hdlr", 0, 0, bytes(20)))
    assert primary_layout(box(b"ftyp", b"heic") + no_pitm) is None


def test_box_sizes_zero_and_one_are_understood():
    data = single("HEIF", 96, 64)
    top = children(data, 0, len(data))
    meta_start, meta_end = top[b"meta"][0]
    ftyp = data[: meta_start - 8]
    meta_payload = data[meta_start:meta_end]
    # the meta box with a 64-bit size, the mdat box with size 0 (to the end of the file);
    # the iloc offsets shift by the 8 extra bytes of the 64-bit header, which this reader ignores
    large_meta = struct.pack(">I4sQ", 1, b"meta", 16 + len(meta_payload)) + meta_payload
    rebuilt = ftyp + large_meta + struct.pack(">I4s", 0, b"mdat") + data[meta_end + 8 :]
    assert primary_layout(rebuilt) == PrimaryLayout(96 * 64, None)


def test_a_box_smaller_than_its_header_inside_meta_is_corrupt():
    data = bytearray(single("HEIF", 96, 64))
    pitm = data.find(b"pitm") - 4
    data[pitm : pitm + 4] = struct.pack(">I", 4)
    with pytest.raises(CorruptImage):
        primary_layout(bytes(data))


def test_a_truncated_index_is_corrupt():
    data = single("HEIF", 96, 64)
    meta_end = children(data, 0, len(data))[b"meta"][0][1]
    with pytest.raises(CorruptImage, match="truncated"):
        primary_layout(data[: meta_end - 10])
    # the picture data cut short is for the decoder to notice; the index is whole
    assert primary_layout(data[: meta_end + 20]) == PrimaryLayout(96 * 64, None)


def test_too_many_top_level_boxes_are_refused():
    data = single("HEIF", 96, 64)
    ftyp = struct.unpack_from(">I", data)[0]
    for padded in (
        data[:ftyp] + box(b"free", b"") * MAX_TOP_LEVEL_BOXES + data[ftyp:],
        data + box(b"free", b"") * MAX_TOP_LEVEL_BOXES,
    ):
        with pytest.raises(CorruptImage, match="top-level boxes"):
            primary_layout(padded)
    assert primary_layout(data + box(b"free", b"") * 100) == PrimaryLayout(96 * 64, None)


def test_a_second_index_is_refused():
    """libheif reads the last top-level meta box, libavif refuses a second one: a harmless
    first index must not vouch for the one the decoder reads."""
    data = single("HEIF", 96, 64)
    meta_start, meta_end = children(data, 0, len(data))[b"meta"][0]
    with pytest.raises(CorruptImage, match="two indexes"):
        primary_layout(data + data[meta_start - 8 : meta_end])


def test_counts_far_beyond_the_data_are_refused_at_once():
    data = single("HEIF", 96, 64)
    for kind, at in ((b"ipma", 4), (b"iloc", 6)):
        broken = bytearray(data)
        where = broken.find(kind) + 4
        broken[where + at : where + at + 2] = b"\xff\xff"
        start = time.perf_counter()
        assert isinstance(outcome(bytes(broken)), CorruptImage)
        assert time.perf_counter() - start < 5.0  # a hang guard


def fuzz_corpus() -> list[bytes]:
    tile = coded("HEIF", 64, 64)
    overlay = Item(2, b"iovl", overlay_descriptor(128, 128, [(0, 0), (64, 64)]), [(ispe(128, 128), False)], in_idat=True)
    return [
        encoded("AVIF", 96, 64),
        encoded("HEIF", 96, 64),
        single("AVIF", 512, 512, (0, 0, 256, 256), [(clap(256, 256, -128, -128), True), (irot(1), False)]),
        single("HEIF", 128, 128, None, [(clap(301, 201, 3, -7, 2, 3, 5, 7), True)]),
        grid("HEIF", tile, 4, 4, (250, 250), extra=[(clap(200, 200), True)]),
        grid("AVIF", coded("AVIF", 64, 64), 2, 2, (120, 100), distinct=True, in_idat=True),
        assemble(b"heic", [tile.item(1, hidden=True), overlay], 2, [(b"dimg", 2, [1, 1]), (b"auxl", 1, [2])]),
    ]


def test_damaged_files_are_read_or_refused_and_never_anything_else_and_fast():
    """Truncations, flipped bits and hostile values (0, 1, 0xFFFFFFFF) written over size and
    count fields: the answer is a layout, None or CorruptImage, none hanging."""
    rng = random.Random(20240501)
    hostile = [b"\0\0\0\0", b"\0\0\0\x01", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\0\0\0\x08", b"\0\0\xff\xff"]
    seen = {PrimaryLayout: 0, type(None): 0, CorruptImage: 0}
    slowest = 0.0
    for original in fuzz_corpus():
        meta_end = children(original, 0, len(original))[b"meta"][0][1]
        for case in range(600):
            data = bytearray(original)
            kind = case % 3
            if kind == 0:
                data = data[: rng.randrange(len(original))]
            elif kind == 1:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(meta_end)] ^= 1 << rng.randrange(8)
            else:
                at = rng.randrange(meta_end - 4)
                data[at : at + 4] = rng.choice(hostile)
            start = time.perf_counter()
            result = outcome(bytes(data))
            slowest = max(slowest, time.perf_counter() - start)
            assert type(result) in seen, f"case {case}: {result!r}"
            seen[type(result)] += 1
    assert slowest < 5.0, f"slowest damaged file took {slowest:.3f} s"  # a hang guard
    assert all(seen.values()), seen  # the mutations reach every outcome


def test_random_bytes_are_never_anything_but_none_or_corrupt():
    rng = random.Random(7)
    for n in range(2000):
        data = rng.randbytes(rng.randrange(1, 400))
        if n % 2:  # most of them look like an ISOBMFF file to begin with
            data = box(b"ftyp", b"heic\0\0\0\0mif1") + struct.pack(">I4s", rng.randrange(8, 400), b"meta") + data
        result = outcome(data)
        assert result is None or isinstance(result, (CorruptImage, PrimaryLayout)), result


# --- through decode() -----------------------------------------------------------------------


def test_decode_shows_an_avif_as_viewers_do():
    """Pillow returned the whole coded frame: the red border nobody who saw the post could see
    would have been published. Cropped in the coded frame, then turned."""
    data = single("AVIF", 512, 512, (0, 0, 256, 256), [(clap(256, 256, -128, -128), True)])
    rgb = decode(data).rgb
    assert rgb.shape == (256, 256, 3) and red_pixels(rgb) == 0
    extra = [(clap_at_origin((512, 512), (256, 128)), True), (irot(1), True)]
    turned = decode(single("AVIF", 512, 512, (0, 0, 256, 128), extra))
    assert turned.rgb.shape == (256, 128, 3) and red_pixels(turned.rgb) == 0
    assert turned.rgb[:128, :, 2].mean() > 150 and turned.rgb[128:, :, 1].mean() > 150  # blue on top


def test_decode_judges_a_cropped_avif_strip_by_what_it_shows():
    data = single("AVIF", 512, 512, None, [(clap_at_origin((512, 512), (512, 8)), True)])
    with pytest.raises(ImageTooNarrow):
        decode(data)


def test_decode_refuses_a_grid_built_from_more_pixels_than_the_budget_before_decoding():
    """pillow-heif reports the 1000x1000 aperture; libheif built the whole 32768x32768 grid
    (1.5 GB) to crop it."""
    data = grid("HEIF", big_tile(), 16, 16, (32768, 32768), extra=[(clap_at_origin((32768, 32768), (1000, 1000)), True)])
    with pytest.raises(ImageTooLarge, match="decoding it takes 1,073,741,824 pixels"):
        decode(data)
    with pytest.raises(CorruptImage):
        decode(grid("HEIF", big_tile(), 16, 16, (32768, 32768), claimed=(1000, 1000)))


# --- AV1 frames larger than their stated size -------------------------------------------------


class Bits:
    """Most-significant-bit-first writer for AV1 syntax (the spec's f(n) and uvlc())."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def f(self, n: int, value: int) -> "Bits":
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def uvlc(self, value: int) -> "Bits":
        zeros = (value + 1).bit_length() - 1
        return self.f(zeros, 0).f(zeros + 1, value + 1)

    def payload(self) -> bytes:
        bits = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)  # trailing_bits()
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def obu(kind: int, payload: bytes, extension: bool = False) -> bytes:
    header = bytes([kind << 3 | int(extension) << 2 | 2]) + (b"\x00" if extension else b"")
    return header + leb128(len(payload)) + payload


def sequence_header(width: int, height: int, *, reduced: bool = False, timing: bool = False,
                    decoder_model: bool = False, display_delay: bool = False, points: int = 1,
                    extension: bool = False) -> bytes:
    """A sequence header OBU allowing frames up to ``width`` x ``height``, exercising the optional
    parts of the syntax that come before the frame size (AV1 5.5.1)."""
    bits = Bits().f(3, 0).f(1, 1).f(1, int(reduced))
    if reduced:
        bits.f(5, 8)
    else:
        bits.f(1, int(timing))
        if timing:
            bits.f(32, 1001).f(32, 30000).f(1, 1).uvlc(6)
            bits.f(1, int(decoder_model))
            if decoder_model:
                bits.f(5, 9).f(32, 90000).f(5, 31).f(5, 22)
        bits.f(1, int(display_delay)).f(5, points - 1)
        for point in range(points):
            level = 12 if point % 2 else 4  # above 7 a tier bit follows
            bits.f(12, 0x101 + point).f(5, level)
            if level > 7:
                bits.f(1, 1)
            if decoder_model:
                bits.f(1, 1).f(10, 500).f(10, 300).f(1, 0)  # buffer delays of 9 + 1 bits
            if display_delay:
                bits.f(1, 1).f(4, 9)
    width_bits, height_bits = max(width - 1, 1).bit_length(), max(height - 1, 1).bit_length()
    bits.f(4, width_bits - 1).f(4, height_bits - 1).f(width_bits, width - 1).f(height_bits, height - 1)
    bits.f(1, 0).f(1, 0).f(1, 0)  # frame_id_numbers_present_flag, use_128x128_superblock, ... (not read)
    return obu(1, bits.payload(), extension)


def av1_file(data: bytes, claimed: tuple[int, int] = (64, 48)) -> bytes:
    """A one-item AVIF whose item data is ``data``, stating ``claimed`` as its size."""
    real = coded("AVIF", 64, 48)
    return assemble(b"avif", [Item(1, b"av01", data, [*real.props, (ispe(*claimed), False)])], 1)


def real_frame() -> bytes:
    """The OBUs of a real 64x48 AV1 picture from its first frame on (libavif writes a temporal
    delimiter and the sequence header before it)."""
    data = coded("AVIF", 64, 48).data
    pos, kinds = 0, []
    while data[pos] >> 3 & 15 not in (3, 6):
        kinds.append(data[pos] >> 3 & 15)
        assert data[pos] & 2 and data[pos + 1] < 0x80  # sized, one-byte sizes: short OBUs
        pos += 2 + data[pos + 1]
    assert kinds == [2, 1], kinds
    return data[pos:]


@pytest.mark.parametrize("size", [(64, 48), (300, 200), (1000, 3)])
def test_the_sequence_header_libavif_writes_gives_the_frame_size(size):
    data = encoded("AVIF", *size)
    assert primary_layout(data).decoded_pixels == size[0] * size[1]


@pytest.mark.parametrize("options", [
    dict(reduced=True),
    dict(),
    dict(timing=True),
    dict(timing=True, decoder_model=True),
    dict(display_delay=True, points=3),
    dict(timing=True, decoder_model=True, display_delay=True, points=4),
])
def test_every_form_of_sequence_header_gives_its_largest_frame(options):
    data = av1_file(sequence_header(9000, 7001, **options) + real_frame())
    assert primary_layout(data).decoded_pixels == 9000 * 7001


def test_an_av1_frame_larger_than_its_stated_size_is_refused_before_decoding():
    """libavif decoded the whole 16384x16384 frame of a 3 KB file stating 300x200 (1 GB of
    memory, measured) and scaled it down; the pixel budget only saw 300x200."""
    data = single("AVIF", 640, 480, claimed=(64, 48))
    assert primary_layout(data).decoded_pixels == 640 * 480
    tight = Limits(max_input_pixels=100_000)
    with pytest.raises(ImageTooLarge, match="The image is 64x48, but decoding it takes 307,200 pixels"):
        decode(data, tight)
    assert decode(data).rgb.shape == (48, 64, 3)  # within the budget, the decoder's scaled picture
    assert decode(single("AVIF", 64, 48), tight).rgb.shape == (48, 64, 3)


def test_every_sequence_header_before_the_frame_counts():
    """The decoder takes the last one before the frame; a small first one must not hide it."""
    data = sequence_header(64, 48) + obu(5, b"\x01" * 40) + sequence_header(20000, 20000) + real_frame()
    assert primary_layout(av1_file(data)).decoded_pixels == 20000 * 20000
    extended = obu(15, b"") + sequence_header(5000, 4000, extension=True)
    assert primary_layout(av1_file(extended + real_frame())).decoded_pixels == 5000 * 4000


def test_a_sequence_header_after_the_first_frame_is_not_read():
    data = sequence_header(64, 48) + real_frame() + sequence_header(20000, 20000)
    assert primary_layout(av1_file(data)).decoded_pixels == 64 * 48


@pytest.mark.parametrize("data, message", [
    (obu(15, b"") * MAX_AV1_OBUS_BEFORE_FRAME + sequence_header(20000, 20000), "more than 16 pieces"),
    (obu(5, b"\0" * AV1_HEAD_BYTES) + sequence_header(20000, 20000), "64 KB before its first frame"),
    (bytes([1 << 3 | 2]) + leb128(0x3FFF) + b"\0" * 4, "sequence header is cut short"),  # past the item
    (obu(1, b"\x00"), "sequence header is cut short"),  # its fields run past its own size
    (bytes([1 << 3 | 2]) + b"\xff" * 9, "impossible OBU size"),
], ids=["many pieces", "64 KB", "past the item", "past its size", "size of 9 bytes"])
def test_av1_data_that_hides_its_sequence_header_is_refused(data, message):
    with pytest.raises(CorruptImage, match=message):
        primary_layout(av1_file(data + real_frame()))


# --- image sequences --------------------------------------------------------------------------

_TRACK_BOXES = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"iprp", b"ipco")


def _boxes(data: bytes, start: int, end: int):
    """(type, payload start, payload end) of every box, descending into tracks and meta."""
    for kind, spans in children(data, start, end).items():
        for s, e in spans:
            yield kind, s, e
            if kind in _TRACK_BOXES:
                yield from _boxes(data, s, e)
            elif kind == b"meta":
                yield from _boxes(data, s + 4, e)


def one_frame_sequence(frame: tuple[int, int], stated: tuple[int, int]) -> bytes:
    """An AVIF image sequence cut to one frame of ``frame`` pixels, whose track header and item
    state ``stated``: libavif decodes the track (the major brand is ``avis``) and scales it."""
    frames = [Image.new("RGB", frame, (200, 40 * i, 30)) for i in range(2)]
    out = io.BytesIO()
    frames[0].save(out, "AVIF", save_all=True, append_images=frames[1:], speed=10, quality=30)
    data = bytearray(out.getvalue())
    assert data[8:12] == b"avis"
    for kind, s, e in list(_boxes(bytes(data), 0, len(data))):
        if kind in (b"stts", b"stsz"):
            struct.pack_into(">I", data, s + 8, 1)  # the first entry's sample count / the count
        elif kind == b"stsc":
            struct.pack_into(">I", data, s + 12, 1)  # samples per chunk
        elif kind == b"tkhd":
            struct.pack_into(">II", data, e - 8, stated[0] << 16, stated[1] << 16)
        elif kind == b"ispe":
            struct.pack_into(">II", data, s + 4, *stated)
    return bytes(data)


def test_an_avif_sequence_is_refused_before_its_track_is_decoded():
    """A track is decoded without any of the item checks: a one-frame sequence that states
    64x48 looks like a small still to Pillow, while the decoder builds the whole frame."""
    data = one_frame_sequence((640, 480), (64, 48))
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 48) and not getattr(image, "is_animated", False)
    with pytest.raises(AnimatedImage, match="sequences"):
        decode(data)
    # a still AVIF (an item, no track) still decodes
    still = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(still, "AVIF")
    assert decode(still.getvalue()).rgb.shape[:2] == (48, 64)
