"""Bytes in, an upright sRGB ``uint8 [H, W, 3]`` array out, or a typed error.

The format is sniffed from the content: a file name or a declared MIME type is never trusted.
Budgets are checked before pixels are decoded. EXIF orientation is applied first, colour is
converted to sRGB, and transparency is flattened onto an opaque background so that no later step
can let a covered head show through an alpha channel.
"""

from __future__ import annotations

import io
import itertools
import struct
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageCms, ImageFile

from .errors import AnimatedImage, CorruptImage, EmptyImage, ImageTooLarge, ImageTooNarrow, UnsupportedImage
from .icc import tame_profile
from .isobmff import has_tracks, primary_layout
from .limits import Limits

try:  # HEIC/HEIF support is optional at import time but installed by default
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on a broken install
    HEIF_AVAILABLE = False

# Our own pixel budget replaces Pillow's global bomb check, which only warns below 2x its limit.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: background that transparent pixels are flattened onto
FLATTEN_BACKGROUND = (255, 255, 255)

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
#: the only Pillow decoders allowed to open each sniffed format (JPEG files with an MPF block open
#: as MPO); without this a file Pillow's HEIF plugin accepts first never reaches the AVIF one
_DECODERS = {"jpeg": ["JPEG"], "png": ["PNG"], "gif": ["GIF"], "webp": ["WEBP"], "heif": ["HEIF"], "avif": ["AVIF"]}
#: progressive JPEG scans in the primary image: encoders write about 10, and each extra scan is
#: another pass over the whole picture, so thousands of tiny scans make a 3 MB file take minutes
MAX_JPEG_SCANS = 100
#: Pillow reads every segment before the first scan in Python (about 30 µs each) and keeps a
#: list entry for each: 45 MB of empty APP1 segments took 23 s and 1.6 GB. A photo has a
#: dozen; an ICC profile split into its most chunks (255), a long XMP and 100 scans' tables fit
#: well within this
MAX_JPEG_SEGMENTS = 2000
#: 0xFF fill bytes, which Pillow also skips one by one in Python (45 MB of them: 35 s); encoders
#: write none or a few
MAX_JPEG_FILL = 65536
#: PNG chunks: Pillow handles each in Python (3.9 million empty ones in 45 MB: 11 s, 0.5 GB);
#: encoders write image data in chunks of 8 KiB or more, so a 50 MB PNG has a few thousand
MAX_PNG_CHUNKS = 100_000
#: GIF blocks read before the second frame (extensions, their sub-blocks, the image's data
#: sub-blocks, stray bytes): Pillow reads each in Python and keeps every comment sub-block (45 MB
#: of one-byte ones: 5.6 s and 2 GB to open). Image data comes in sub-blocks of up to 255 bytes,
#: so a 50 MB photo has about 200,000
MAX_GIF_BLOCKS = 300_000
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"avc1", b"dash", b"f4v "}


@dataclass(frozen=True)
class DecodedImage:
    """An upright, opaque sRGB image and what we learnt while decoding it."""

    rgb: np.ndarray
    format: str
    had_alpha: bool
    orientation: int


def sniff(data: bytes) -> str:
    """Name the format of ``data`` from its first bytes.

    Returns one of ``jpeg``, ``png``, ``gif``, ``webp``, ``heif``, ``avif``; raises a typed error with a
    clear message for everything else.
    """
    if not data:
        raise EmptyImage("The file is empty (0 bytes).")
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        compatible = {head[i : i + 4] for i in range(16, min(len(head), 40), 4)}
        # AVIF files also list the HEIF brand mif1, so they are recognised first; some writers
        # put the generic mif1/msf1 first and say AVIF only among the compatible brands.
        if brand in (b"avif", b"avis") or (brand in (b"mif1", b"msf1") and compatible & {b"avif", b"avis"}):
            return "avif"
        if brand in _HEIF_BRANDS or (compatible & _HEIF_BRANDS and brand not in _VIDEO_BRANDS):
            return "heif"
        if brand in _VIDEO_BRANDS:
            raise UnsupportedImage("This looks like a video (MP4/MOV); only still images are supported.")
        # A camera raw (Canon CR3), JPEG XL in a box, ...: not a video, and not ours to read.
        raise UnsupportedImage(
            f"Not a supported image (an ISO media file of type {brand.decode('latin-1').strip()!r}); "
            "please send JPEG, PNG, WebP, HEIC, AVIF or GIF."
        )
    raise UnsupportedImage(f"Not a supported image ({_describe_unsupported(head)}); please send JPEG, PNG, WebP, HEIC, AVIF or GIF.")


def _describe_unsupported(head: bytes) -> str:
    stripped = head.lstrip()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if stripped[:5].lower() in (b"<?xml", b"<svg ") or stripped[:4].lower() == b"<svg":
        return "an SVG/XML document"
    if stripped[:1] == b"<":
        return "an HTML/XML document"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "a WebM/Matroska video"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "an AVI video"
    if head[:2] == b"BM":
        return "a BMP image, which we do not accept"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "a TIFF image, which we do not accept"
    if head[:2] == b"PK":
        return "a ZIP archive"
    return "unrecognised content"


def decode(data: bytes, limits: Limits = Limits()) -> DecodedImage:
    """Decode ``data`` into an upright, opaque sRGB image within ``limits``."""
    if len(data) > limits.max_input_bytes:
        raise ImageTooLarge(
            f"The file is {len(data):,} bytes; the limit is {limits.max_input_bytes:,} bytes."
        )
    fmt = sniff(data)
    if fmt == "heif" and not HEIF_AVAILABLE:  # pragma: no cover
        raise UnsupportedImage("HEIC/HEIF support is not installed on this server.")
    if fmt == "jpeg" and (problem := jpeg_layout(data).problem()):
        raise UnsupportedImage(problem)
    if fmt == "png":
        data = without_png_text(data)
    if fmt == "gif" and gif_blocks(data) > MAX_GIF_BLOCKS:
        raise UnsupportedImage(
            "The GIF file is padded with hundreds of thousands of empty blocks, which no camera or "
            "editor writes. Please re-save it, or send the photo as a JPEG."
        )
    # What the decoders' size reports hide: the pixels a derived (grid) image is built from, an
    # AV1 frame larger than the size stated for it, and an AVIF's clean aperture, which Pillow
    # does not apply (libheif does, for HEIF).
    layout = primary_layout(data) if fmt in ("heif", "avif") else None
    if fmt == "avif" and has_tracks(data):
        # Decoded from its track, which the item checks above cannot bound: even one frame
        # may be far larger than the track says (refused as sequences of HEIF are).
        raise AnimatedImage(
            "Animated images and AVIF image sequences are not supported: their frames cannot be "
            "checked before decoding. Please send a still photo."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_DECODERS[fmt])
            width, height = image.size
            # Checked on the header, before a single pixel is decompressed.
            if width * height > limits.max_input_pixels:
                raise ImageTooLarge(
                    f"The image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {limits.max_input_pixels:,} pixels."
                )
            if layout is not None and layout.decoded_pixels > limits.max_input_pixels:
                raise ImageTooLarge(
                    f"The image is {width}x{height}, but decoding it takes "
                    f"{layout.decoded_pixels:,} pixels; the limit is {limits.max_input_pixels:,} pixels."
                )
            if width <= 0 or height <= 0:
                raise CorruptImage("The image has no pixels.")
            crop = layout.crop if fmt == "avif" and layout is not None else None
            if crop is not None:
                if crop[2] > width or crop[3] > height:
                    raise CorruptImage("The AVIF file crops its image to an area outside the picture.")
                width, height = crop[2] - crop[0], crop[3] - crop[1]
            if max(width, height) > limits.max_aspect_ratio * min(width, height):
                # Named as viewers show it: a phone strip stored sideways is shown upright.
                shown = (height, width) if _exif_orientation(image) in _SIDEWAYS else (width, height)
                raise ImageTooNarrow(
                    f"The image is {shown[0]}x{shown[1]}, a strip rather than a photo; "
                    f"at most {limits.max_aspect_ratio}:1 between its sides is accepted."
                )
            # HEIF containers often hold extra images (thumbnails, depth, bursts): we use the
            # primary image, which is the photo people see. GIF/WebP/PNG/AVIF animations are
            # refused, and so are HEIF image sequences, whose frames pillow-heif never reads.
            # ``is_animated`` stops at the second frame; counting them all took 3.4 s for a
            # 49 MB GIF of two million frames.
            sequence = fmt == "heif" and str(getattr(image, "custom_mimetype", "") or "").endswith("-sequence")
            if sequence or (fmt in ("gif", "webp", "png", "avif") and getattr(image, "is_animated", False)):
                raise AnimatedImage(
                    "Animated images are not supported: the other frames would not be checked. "
                    "Please send a still photo."
                )
            image.load()
            turn = _exif_orientation(image)
            if crop is not None:
                # Before turning: the aperture is given in the coded frame, which is what
                # Pillow returns (the turn comes as an EXIF orientation).
                image = image.crop(crop)
            # pillow-heif rotates HEIC pixels itself and resets the tag, keeping the original here.
            orientation = int(image.info.get("original_orientation") or turn)
            image = _upright(image, turn)
            if fmt == "png" and data[24:25] == b"\x10":
                image = _key_in_8_bits(image)
            elif fmt == "png" and data[24] in (1, 2, 4) and data[25] == 0 and "transparency" in image.info:
                _grey_key_in_8_bits(image, data[24], _png_grey_key(data))
            had_alpha = _has_alpha(image)
            rgb = _to_srgb_array(image)
    except (ImageTooLarge, ImageTooNarrow, AnimatedImage, CorruptImage):
        raise
    except Image.DecompressionBombError as exc:  # pragma: no cover - our check comes first
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
            # what Pillow's plugins raise on some cut or damaged headers (a GIF cut inside its
            # second frame's header: struct.error or IndexError while counting frames)
            struct.error, IndexError, KeyError, TypeError) as exc:
        raise CorruptImage(f"The {fmt.upper()} file is damaged or truncated and cannot be read.") from exc
    except (MemoryError, RuntimeError) as exc:
        raise CorruptImage(f"The {fmt.upper()} file cannot be decoded.") from exc
    return DecodedImage(rgb=rgb, format=fmt, had_alpha=had_alpha, orientation=orientation)


_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(kind, start, end)`` of each chunk of a PNG, from its header on, up to ``IEND``; the
    last one yielded may run past the end of ``data`` (a cut file: the caller decides).
    ``UnsupportedImage`` past :data:`MAX_PNG_CHUNKS` chunks."""
    pos = 8
    for count in itertools.count(1):
        if pos + 12 > len(data):
            return
        if count > MAX_PNG_CHUNKS:
            raise UnsupportedImage(
                f"The PNG file is cut into more than {MAX_PNG_CHUNKS:,} pieces (chunks), which no "
                "camera or editor writes. Please re-save it as a normal PNG."
            )
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        yield kind, pos, end
        if end > len(data) or kind == b"IEND":
            return
        pos = end


def without_png_text(data: bytes) -> bytes:
    """``data`` without its PNG text chunks, which the output drops anyway.

    Pillow decompresses every zTXt/iTXt chunk while opening the file and refuses one over 1 MiB
    (editors embed XMP packets that large), which made a sound photo "damaged"; its XMP would
    also turn the photo by an orientation that viewers ignore. Walks the chunk headers only;
    returns ``data`` itself when there is nothing to drop or the layout is not understood
    (Pillow then says what is wrong). ``UnsupportedImage`` for a file of more than
    :data:`MAX_PNG_CHUNKS` chunks."""
    keep: list[memoryview] = []
    view = memoryview(data)
    start = 8
    dropped = False
    for kind, pos, end in _png_chunks(data):
        if end > len(data):
            return data
        if kind in _PNG_TEXT:
            keep.append(view[start:pos])
            start, dropped = end, True
    if not dropped:
        return data
    return b"".join([view[:8], *keep, view[start:]])


@dataclass(frozen=True)
class JpegLayout:
    """What the marker walk of a JPEG found, each count stopping one past its limit."""

    #: scans (SOS markers) of the primary image
    scans: int
    #: marker segments with a length (APPn, COM, tables, frame and scan headers)
    segments: int
    #: 0xFF fill bytes before markers, between segments and inside entropy-coded data
    fill: int

    def problem(self) -> str | None:
        """Why the file is refused before decoding, or None."""
        if self.scans > MAX_JPEG_SCANS:
            return (f"The JPEG file is split into more than {MAX_JPEG_SCANS} progressive scans (cameras "
                    "and editors write about 10). Please re-save it as a normal JPEG.")
        if self.segments > MAX_JPEG_SEGMENTS or self.fill > MAX_JPEG_FILL:
            return ("The JPEG file is padded with thousands of empty header segments or filler bytes, "
                    "which no camera or editor writes. Please re-save it as a normal JPEG.")
        return None


def jpeg_layout(data: bytes) -> JpegLayout:
    """The scans, segments and fill bytes of a JPEG's primary image, counted without decoding;
    the walk stops as soon as one count is past its limit, so a file of millions of tiny
    segments costs as little as a normal one.

    Walks the marker structure as libjpeg reads it: segments are skipped by their lengths (so
    an EXIF thumbnail or a COM payload is never mistaken for markers), bytes that are not a
    marker between segments are skipped as libjpeg skips them, entropy-coded data runs to the
    next marker that is not stuffing or a restart, and the walk ends at the first EOI (images
    appended after it, such as MPF depth maps, are never decoded).
    """
    n, pos, scans, segments, fill = len(data), 2, 0, 0, 0

    def layout() -> JpegLayout:
        return JpegLayout(scans, segments, fill)

    while pos + 1 < n:
        if scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS or fill > MAX_JPEG_FILL:
            break
        if data[pos] != 0xFF:  # junk between segments: libjpeg warns and skips it
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            fill += 1
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # markers without a length
            # Counted like segments: between segments no encoder writes them, and Pillow reads
            # each one in Python (20 MB of them took 5.6 s).
            segments += 1
            pos += 2
            continue
        if pos + 4 > n:
            break
        segments += 1
        pos += 2 + max(2, int.from_bytes(data[pos + 2 : pos + 4], "big"))
        if marker != 0xDA:
            continue
        scans += 1
        while fill <= MAX_JPEG_FILL:  # entropy-coded data up to the next real marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return layout()
            follower = data[pos + 1]
            if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                pos += 2
            elif follower == 0xFF:
                fill += 1
                pos += 1
            else:
                break
    return layout()


def gif_blocks(data: bytes) -> int:
    """The blocks Pillow reads one by one in Python to open a GIF and look for a second frame,
    counted without decoding and only up to one past :data:`MAX_GIF_BLOCKS`.

    The walk follows Pillow's: after the screen descriptor and global colour table, each
    extension (and each of its sub-blocks), each of the first image's data sub-blocks and each
    byte that starts no block is one step; it ends at the trailer, the end of the data or a
    second image descriptor (a second frame: the file is then refused as animated)."""
    n = len(data)
    if n < 13:
        return 0
    pos = 13 + ((3 << ((data[10] & 7) + 1)) if data[10] & 0x80 else 0)  # + the global colour table
    blocks, images = 0, 0

    def sub_blocks(at: int) -> int:
        nonlocal blocks
        while at < n and blocks <= MAX_GIF_BLOCKS:
            blocks += 1
            size = data[at]
            at += 1 + size
            if size == 0:
                break
        return at

    while pos < n and blocks <= MAX_GIF_BLOCKS:
        kind = data[pos]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x21:  # extension: label, then sub-blocks
            blocks += 1
            pos = sub_blocks(pos + 2)
        elif kind == 0x2C:  # image descriptor
            images += 1
            if images > 1 or pos + 10 > n:
                break
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # + a local colour table
            pos = sub_blocks(pos + 1)  # after the LZW code size
        else:  # a byte that starts no block: Pillow reads on, one byte at a time
            blocks += 1
            pos += 1
    return blocks


def _exif_orientation(image: Image.Image) -> int:
    """The orientation tag of the image's EXIF block, 1 if none or broken.

    Only EXIF: Pillow's ``getexif()`` falls back to an XMP ``tiff:Orientation``, which browsers
    and the platforms ignore, so a photo carrying one would come back turned from how everyone
    saw it. A broken EXIF block must not make the image unreadable."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(0x0112, 1) or 1)
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


# Orientations whose upright image swaps width and height.
_SIDEWAYS = frozenset({5, 6, 7, 8})

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF ``orientation`` (pillow-heif has already rotated HEIF and reset the tag).

    Unlike ImageOps.exif_transpose this never rewrites the EXIF block (which raises on
    malformed tags); the metadata is dropped anyway."""
    method = _TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def _key_in_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit RGB PNG with its tRNS colour matched on each sample's high byte.

    Pillow keeps only the high byte of a 16-bit RGB sample but leaves the key in 16 bits, so
    the transparent colour never matched and its pixels kept their hidden colour. A pixel within
    1/256 of the key now turns background too, which hides more than a viewer does, never less.
    """
    key = image.info.get("transparency")
    if image.mode != "RGB" or not isinstance(key, tuple):
        return image
    image = image.copy()
    image.info["transparency"] = tuple(v >> 8 for v in key)
    return image


def _png_grey_key(data: bytes) -> int | None:
    """The grey level a grey PNG's tRNS chunk makes transparent, as written (in the file's
    bits); None without one."""
    for kind, pos, end in _png_chunks(data):
        if kind == b"tRNS" and end - pos >= 14 and end <= len(data):
            return int.from_bytes(data[pos + 8:pos + 10], "big")
        if kind == b"IDAT":
            return None
    return None


def _grey_key_in_8_bits(image: Image.Image, depth: int, key: int | None) -> None:
    """A 1-, 2- or 4-bit grey PNG's tRNS level on the 8-bit scale of Pillow's pixels (in
    place: ``image`` is the decoder's own).

    Pillow scales such pixels to 8 bits (a 2-bit level 1 reads 85) but kept a 2- or 4-bit key
    as written, so the transparent level never matched and showed its grey where a viewer shows
    the background. A key no pixel can have makes nothing transparent."""
    top = (1 << depth) - 1
    if key is None or key > top:
        image.info.pop("transparency", None)
    else:
        image.info["transparency"] = key * (255 // top)


#: Pillow's modes for grey wider than 8 bits (16-bit PNG grey among them)
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ) or (image.mode in ("RGB", "L", "1", *_WIDE_GREY) and "transparency" in image.info)


def _to_srgb_array(image: Image.Image) -> np.ndarray:
    """Flatten alpha, convert to 8-bit sRGB and return a contiguous ``[H, W, 3]`` array."""
    if image.mode in _WIDE_GREY:
        # Pillow's convert("L") clips 16-bit values instead of scaling them.
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
        grey = np.clip(wide * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        key = image.info.get("transparency")
        if isinstance(key, int):
            # A tRNS grey level: Pillow's convert() ignores it for 16-bit grey, as it would
            # everything else here; flatten it as a viewer would show it.
            rgb[wide == key] = FLATTEN_BACKGROUND
        return np.ascontiguousarray(rgb)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))

    icc = image.info.get("icc_profile")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        base = Image.new("RGB", rgba.size, FLATTEN_BACKGROUND)
        colour = _convert_colour(rgba.convert("RGB"), icc)
        base.paste(colour, mask=alpha)
        rgb_image = base
    else:
        rgb_image = _convert_colour(image, icc)
    return np.ascontiguousarray(np.asarray(rgb_image.convert("RGB"), dtype=np.uint8))


_SRGB = ImageCms.createProfile("sRGB")


def _convert_colour(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert to sRGB through the embedded ICC profile when there is one."""
    icc = tame_profile(icc) if icc else None
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            mode = image.mode if image.mode in ("RGB", "CMYK", "L") else "RGB"
            return ImageCms.profileToProfile(image.convert(mode), source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: fall back to Pillow's own conversion
    return image.convert("RGB")
