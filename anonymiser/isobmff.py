"""The layout of the primary image of a HEIF/AVIF file, read from its ``meta`` box without
decoding a pixel.

Two things the decoders' size reports hide:

* An image may mark only part of its coded picture for display (a clean aperture, ``clap``).
  Viewers crop to it and libheif does for HEIF, but Pillow's AVIF plugin does not, so an AVIF
  would come out with a border that nobody who saw the photo could see.
* An AV1 item's coded frame can be larger than its ``ispe`` says: libavif decodes the whole
  frame and then scales it to the ``ispe``, so a 3 KB file stating 300x200 made the decoder
  allocate a 16384x16384 frame (1 GB). The largest frame an AV1 stream may code is in its
  sequence header, at the start of the item's data; that is what is counted.
* A derived image (``grid``, ``iovl``, ``iden``) is assembled from other items while it is
  decoded. Pillow and pillow-heif report its ``ispe`` (or its clean aperture), while the decoder
  allocates the canvas its descriptor asks for and decodes every input it references, as often
  as it is referenced: a 2 KB file that says 1000x1000 can make libheif build 32768x32768.
  A canvas of another size than its ``ispe`` states is refused outright.

Everything here is read from bytes an attacker chose: every count is capped, every read is
checked against the end of its box, and whatever inside ``meta`` cannot be made sense of is a
:class:`CorruptImage` (a refusal, never a guess that could let a bomb or a hidden border
through).
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from .errors import CorruptImage

# Caps on the work a hostile file can ask for. Cameras and editors write a handful of top-level
# boxes, a few dozen items (an iPhone HEIC: 48 tiles plus thumbnail, alpha, depth, EXIF) and a
# few properties per item; the caps are orders of magnitude above that, and below what a Python
# loop gets through in well under a second.
MAX_TOP_LEVEL_BOXES = 1024
MAX_CHILD_BOXES = 4096
#: ipma stores property indices in at most 15 bits: later properties cannot be associated
MAX_PROPERTIES = 0x7FFF
#: a 100-megapixel grid of 512x512 tiles (what cameras write) has 400 of them
MAX_ITEMS = 1 << 14
MAX_REFERENCES = 1 << 20
#: pieces of one item's data; libheif refuses more than 32 as well
MAX_EXTENTS = 32
#: property associations looked at, over all the items the primary image is made of
MAX_ASSOCIATIONS = 1 << 18
#: grid of iden of iovl... : real files nest two deep
MAX_DERIVATION_DEPTH = 8

#: OBUs read at the start of an AV1 item's data before its first frame, and bytes they may take:
#: encoders write a sequence header, perhaps a metadata OBU or two, then the frame
MAX_AV1_OBUS_BEFORE_FRAME = 16
AV1_HEAD_BYTES = 1 << 16
_OBU_SEQUENCE_HEADER, _OBU_FRAME_HEADER, _OBU_TILE_GROUP, _OBU_FRAME = 1, 3, 4, 6

#: derived images whose item data describes a canvas the decoder allocates whatever the inputs
_CANVAS_TYPES = (b"grid", b"iovl")
#: properties that change the geometry after decoding (HEIF/MIAF order: clap, irot, imir)
_TRANSFORMS = (b"clap", b"irot", b"imir")
#: meta children that must be unique: libavif refuses a second one, and so do we rather than
#: read another one than a decoder does
_UNIQUE_META_BOXES = (b"pitm", b"iloc", b"iinf", b"iref", b"iprp", b"idat")


@dataclass(frozen=True)
class PrimaryLayout:
    """What the ``meta`` box says about the primary image, before anything is decoded."""

    #: The largest picture the decoder builds for the primary image: the item's ``ispe`` area
    #: (which for a ``grid``/``iovl`` must be the canvas its descriptor asks for, or the file
    #: is refused; for AV1, the largest frame its sequence header allows when that is larger),
    #: for any item with ``dimg`` inputs at least the sum over them (recursively,
    #: each counted as often as it is referenced), and an auxiliary (alpha) image of the
    #: primary when that is larger.
    decoded_pixels: int
    #: The clean aperture of the primary item in coded-frame pixels (left, top, right, bottom;
    #: right/bottom exclusive), before any ``irot``/``imir``; None when it has no ``clap``.
    crop: tuple[int, int, int, int] | None


def primary_layout(data: bytes) -> PrimaryLayout | None:
    """Read the primary image's layout from a HEIF/AVIF file's ``meta`` box.

    Returns None when the file has no ``meta`` box or no ``pitm`` in it (the decoder will say
    what is wrong); raises :class:`CorruptImage` for a ``meta`` box that is truncated, malformed,
    contradicts itself or asks for more work than any real photo needs.
    """
    try:
        meta = _find_meta(data)
        if meta is None:
            return None
        file = _Meta(data, *meta)
        if file.primary is None:
            return None
        return _layout(file)
    except (struct.error, IndexError, ValueError, ZeroDivisionError, OverflowError, RecursionError) as exc:
        # Every read is bounds-checked above; this net is here so that a parser slip on a
        # hostile file is a refusal of that file, never a crash of the worker.
        raise CorruptImage("The image file's structure is damaged and cannot be read.") from exc


def _top_level(data: bytes):
    """Yield (type, payload start, box end) of the file's top-level boxes.

    The top level is walked as libheif walks it: a box cut short or a header that makes no
    sense ends the walk (a truncated ``mdat`` after a whole ``meta`` is still read)."""
    pos, end = 0, len(data)
    for _ in range(MAX_TOP_LEVEL_BOXES):
        header = _header(data, pos, end)
        if header is None:
            return
        yield header
        if header[2] >= end:
            return
        pos = header[2]
    raise CorruptImage(f"The image file has more than {MAX_TOP_LEVEL_BOXES} top-level boxes.")


def _find_meta(data: bytes) -> tuple[int, int] | None:
    """(payload start, end) of the top-level ``meta`` box, None when there is none.

    The walk goes on after ``meta``, because libheif reads the last ``meta`` box and libavif
    refuses a second one: a harmless first index must not hide the one a decoder would use."""
    found = None
    for kind, payload, box_end in _top_level(data):
        if kind == b"meta":
            if box_end > len(data):
                raise CorruptImage("The image file is truncated: its index of images ('meta' box) is cut short.")
            if found is not None:
                raise CorruptImage("The image file has two indexes of images ('meta' boxes); decoders disagree on which to read.")
            found = payload, box_end
    return found


def has_tracks(data: bytes) -> bool:
    """Whether the file holds a track (a top-level ``moov`` box): an image sequence.

    libavif decodes the track rather than the ``meta`` item when the major brand is ``avis``
    (or neither ``avif`` nor ``avis``), and none of the item checks here apply to a track: a
    6 KB file whose track header said 64x48 made it decode a 16384x16384 frame (1 GB)."""
    return any(kind == b"moov" for kind, _, _ in _top_level(data))


def _header(data: bytes, pos: int, end: int) -> tuple[bytes, int, int] | None:
    """(type, payload start, box end) of the box at ``pos``; None when no box header fits.

    ``box end`` may lie past ``end``: the callers decide whether a box cut short is an error.
    Size 1 means a 64-bit size follows, size 0 means "to the end of the enclosing box"."""
    if end - pos < 8:
        return None
    size, kind = struct.unpack_from(">I4s", data, pos)
    header = 8
    if size == 1:
        if end - pos < 16:
            return None
        (size,) = struct.unpack_from(">Q", data, pos + 8)
        header = 16
    elif size == 0:
        size = end - pos
    if kind == b"uuid":
        header += 16  # the extended type
    if size < header:
        return None
    return kind, pos + header, pos + size


def _children(data: bytes, start: int, end: int, what: str, limit: int = MAX_CHILD_BOXES, beyond_limit: str = "refuse"):
    """Yield (type, payload start, end) of the boxes inside ``data[start:end]``, at most
    ``limit`` of them: more is corruption, unless ``beyond_limit`` is ``"ignore"``.

    Fewer than 8 bytes left over at the end are ignored (no box fits in them); a box that
    overruns its parent, or a header smaller than itself, is corruption: walking on from
    there would read another box's bytes as headers."""
    pos = start
    for _ in range(limit):
        if end - pos < 8:
            return
        header = _header(data, pos, end)
        if header is None or header[2] > end:
            raise CorruptImage(f"The image file is damaged: a box inside its {what} is malformed or cut short.")
        yield header
        pos = header[2]
    if end - pos >= 8 and beyond_limit != "ignore":
        raise CorruptImage(f"The image file's {what} holds more than {limit} boxes.")


def _uint(data: bytes, pos: int, size: int, end: int) -> int:
    """Big-endian unsigned integer of ``size`` bytes (0, 2, 4 or 8) at ``pos``, within ``end``."""
    if pos + size > end:
        raise CorruptImage("The image file is damaged: a box is shorter than its contents.")
    return int.from_bytes(data[pos : pos + size], "big")


class _Meta:
    """The parts of a ``meta`` box that say how the primary image is built.

    Item data (``iloc``), item associations (``ipma``) and references (``iref``) are indexed,
    not interpreted: only the items the primary image is made of are looked at closely."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data = data
        if end - start < 4:
            raise CorruptImage("The image file is damaged: its index of images ('meta' box) is empty.")
        boxes: dict[bytes, tuple[int, int]] = {}
        for kind, payload, box_end in _children(data, start + 4, end, "'meta' box"):
            if kind in _UNIQUE_META_BOXES:
                if kind in boxes:
                    raise CorruptImage(f"The image file is damaged: its index of images has two '{kind.decode()}' boxes.")
                boxes[kind] = (payload, box_end)
        self.primary = self._pitm(*boxes[b"pitm"]) if b"pitm" in boxes else None
        self.types = self._iinf(*boxes[b"iinf"]) if b"iinf" in boxes else {}
        self.locations = self._iloc(*boxes[b"iloc"]) if b"iloc" in boxes else {}
        self.idat = boxes.get(b"idat")
        self.properties: list[tuple[bytes, int, int]] = []
        self.associations: dict[int, list[tuple[int, int, int]]] = {}
        self.entries = self.examined = 0
        if b"iprp" in boxes:
            self._iprp(*boxes[b"iprp"])
        self.dimg: dict[int, list[int]] = {}
        self.auxl: dict[int, list[int]] = {}
        if b"iref" in boxes:
            self._iref(*boxes[b"iref"])

    def _pitm(self, start: int, end: int) -> int:
        version = _uint(self.data, start, 1, end)
        return _uint(self.data, start + 4, 2 if version == 0 else 4, end)

    def _iinf(self, start: int, end: int) -> dict[int, bytes]:
        """Item types by item id (``infe`` versions 2 and 3; older ones carry no type)."""
        data = self.data
        version = _uint(data, start, 1, end)
        types: dict[int, bytes] = {}
        first = start + 4 + (2 if version == 0 else 4)
        for kind, payload, box_end in _children(data, first, end, "item list ('iinf')", MAX_ITEMS):
            if kind != b"infe":
                continue
            infe_version = _uint(data, payload, 1, box_end)
            if infe_version < 2:
                continue
            id_size = 2 if infe_version == 2 else 4
            item = _uint(data, payload + 4, id_size, box_end)
            kind_at = payload + 4 + id_size + 2
            if kind_at + 4 > box_end:
                raise CorruptImage("The image file is damaged: an item entry ('infe') is cut short.")
            if item in types:
                raise CorruptImage(f"The image file is damaged: item {item} is declared twice.")
            types[item] = bytes(data[kind_at : kind_at + 4])
        return types

    def _iloc(self, start: int, end: int) -> dict[int, tuple[int, int, int, int, tuple[int, int, int]]]:
        """Where each item's data is: (construction method, data reference, base offset,
        position of its extent table, (extent count, index size, offset size, length size))."""
        data = self.data
        version = _uint(data, start, 1, end)
        if version > 2:
            raise CorruptImage(f"The image file uses an item location table of version {version}, which is not defined.")
        sizes = _uint(data, start + 4, 1, end)
        more = _uint(data, start + 5, 1, end)
        offset_size, length_size, base_size = sizes >> 4, sizes & 15, more >> 4
        index_size = more & 15 if version > 0 else 0
        if any(s not in (0, 4, 8) for s in (offset_size, length_size, base_size, index_size)):
            raise CorruptImage("The image file is damaged: its item location table has impossible field sizes.")
        id_size = 4 if version == 2 else 2
        count = _uint(data, start + 6, id_size, end)
        if count > MAX_ITEMS:
            raise CorruptImage(f"The image file lists {count:,} items; at most {MAX_ITEMS:,} are accepted.")
        pos = start + 6 + id_size
        extent_size = index_size + offset_size + length_size
        locations = {}
        for _ in range(count):
            item = _uint(data, pos, id_size, end)
            pos += id_size
            method = 0
            if version > 0:
                method = _uint(data, pos, 2, end) & 15
                pos += 2
            reference = _uint(data, pos, 2, end)
            base = _uint(data, pos + 2, base_size, end)
            pos += 2 + base_size
            extents = _uint(data, pos, 2, end)
            pos += 2
            table = pos
            pos += extents * extent_size
            if pos > end:
                raise CorruptImage("The image file is damaged: its item location table is cut short.")
            if item in locations:
                raise CorruptImage(f"The image file is damaged: the data of item {item} is located twice.")
            locations[item] = (method, reference, base, table, (extents, index_size, offset_size, length_size))
        return locations

    def _iprp(self, start: int, end: int) -> None:
        data = self.data
        seen_ipco = False
        for kind, payload, box_end in _children(data, start, end, "item properties ('iprp')"):
            if kind == b"ipco":
                if seen_ipco:
                    raise CorruptImage("The image file is damaged: it has two property containers ('ipco').")
                seen_ipco = True
                # Properties past MAX_PROPERTIES cannot be associated with anything: not read.
                self.properties.extend(_children(data, payload, box_end, "image properties ('ipco')",
                                                 MAX_PROPERTIES, beyond_limit="ignore"))
            elif kind == b"ipma":
                self._ipma(payload, box_end)

    def _ipma(self, start: int, end: int) -> None:
        """Index each entry's associations; several ``ipma`` boxes (or entries) for one item
        add up, which can only make us see more properties than a decoder does, never fewer."""
        data = self.data
        version = _uint(data, start, 1, end)
        flags = _uint(data, start + 1, 3, end)
        count = _uint(data, start + 4, 4, end)
        self.entries += count  # over every ipma box: a thousand boxes must not multiply the cap
        if self.entries > MAX_ITEMS:
            raise CorruptImage(f"The image file lists properties for more than {MAX_ITEMS:,} items.")
        id_size = 2 if version == 0 else 4
        width = 2 if flags & 1 else 1
        pos = start + 8
        for _ in range(count):
            item = _uint(data, pos, id_size, end)
            n = _uint(data, pos + id_size, 1, end)
            pos += id_size + 1
            if pos + n * width > end:
                raise CorruptImage("The image file is damaged: its property associations ('ipma') are cut short.")
            self.associations.setdefault(item, []).append((pos, n, width))
            pos += n * width

    def _iref(self, start: int, end: int) -> None:
        data = self.data
        version = _uint(data, start, 1, end)
        id_size, code = (2, "H") if version == 0 else (4, "I")
        total = 0
        for kind, payload, box_end in _children(data, start + 4, end, "item references ('iref')", MAX_ITEMS):
            source = _uint(data, payload, id_size, box_end)
            n = _uint(data, payload + id_size, 2, box_end)
            first = payload + id_size + 2
            if first + n * id_size > box_end:
                raise CorruptImage("The image file is damaged: an item reference box is cut short.")
            total += n
            if total > MAX_REFERENCES:
                raise CorruptImage(f"The image file has more than {MAX_REFERENCES:,} item references.")
            if kind == b"dimg":
                self.dimg.setdefault(source, []).extend(struct.unpack_from(f">{n}{code}", data, first))
            elif kind == b"auxl":
                self.auxl.setdefault(source, []).extend(struct.unpack_from(f">{n}{code}", data, first))

    def properties_of(self, item: int) -> list[tuple[bytes, int, int]]:
        """The properties associated with ``item``, in association order (the order libheif
        applies transformations in)."""
        found = []
        for pos, n, width in self.associations.get(item, ()):
            self.examined += n
            if self.examined > MAX_ASSOCIATIONS:
                raise CorruptImage(f"The image file's images have more than {MAX_ASSOCIATIONS:,} properties in all.")
            values = struct.unpack_from(f">{n}H", self.data, pos) if width == 2 else self.data[pos : pos + n]
            for value in values:
                index = value & (0x7FFF if width == 2 else 0x7F)  # the top bit says "essential"
                if index == 0:  # "no property"
                    continue
                if index > len(self.properties):
                    raise CorruptImage(f"The image file is damaged: item {item} refers to a property that does not exist.")
                found.append(self.properties[index - 1])
        return found

    def item_head(self, item: int, size: int) -> bytes:
        """Up to ``size`` first bytes of an item's data (fewer only if the item is shorter)."""
        location = self.locations.get(item)
        if location is None:
            raise CorruptImage(f"The image file is damaged: the data of item {item} is missing.")
        method, reference, base, table, (extents, index_size, offset_size, length_size) = location
        if extents > MAX_EXTENTS:
            raise CorruptImage(f"The image file splits the data of item {item} into more than {MAX_EXTENTS} pieces.")
        if reference != 0 or method not in (0, 1):
            # Data in another file, or built from other items' data: neither decoder reads it.
            raise CorruptImage(f"The image file keeps the data of item {item} where it cannot be read.")
        if method == 1:
            if self.idat is None:
                raise CorruptImage(f"The image file is damaged: the data of item {item} is missing ('idat').")
            origin, limit = self.idat
        else:
            origin, limit = 0, len(self.data)
        out = bytearray()
        pos = table
        for _ in range(extents):
            if len(out) >= size:
                break
            offset = int.from_bytes(self.data[pos + index_size : pos + index_size + offset_size], "big")
            length = int.from_bytes(self.data[pos + index_size + offset_size : pos + index_size + offset_size + length_size], "big")
            pos += index_size + offset_size + length_size
            begin = origin + base + offset
            stop = limit if length == 0 else begin + length  # length 0: to the end
            want = min(stop, begin + size - len(out))
            if begin > limit or want > limit:
                raise CorruptImage(f"The image file is truncated: the data of item {item} is cut short.")
            out += self.data[begin:want]
        return bytes(out[:size])


def _ispe(file: _Meta, item: int, properties: list[tuple[bytes, int, int]]) -> list[tuple[int, int]]:
    """Every (width, height) an item's ``ispe`` properties give, in association order."""
    sizes = []
    for kind, payload, end in properties:
        if kind == b"ispe":
            if end - payload < 12:
                raise CorruptImage(f"The image file is damaged: the size of item {item} is cut short.")
            sizes.append(struct.unpack_from(">II", file.data, payload + 4))
    return sizes


class _Bits:
    """Most-significant-bit-first reader over an AV1 OBU's payload; reading past it is damage."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def f(self, n: int) -> int:
        """The next ``n`` bits as an unsigned number (the AV1 spec's f(n))."""
        if self.pos + n > 8 * len(self.data):
            raise CorruptImage("The image file is damaged: its AV1 sequence header is cut short.")
        value = 0
        for _ in range(n):
            value = (value << 1) | (self.data[self.pos >> 3] >> (7 - (self.pos & 7)) & 1)
            self.pos += 1
        return value

    def uvlc(self) -> int:
        """The AV1 spec's uvlc(): leading zeros, a one, then that many bits."""
        zeros = 0
        while not self.f(1):
            zeros += 1
            if zeros >= 32:
                return (1 << 32) - 1
        return self.f(zeros) + (1 << zeros) - 1


def _av1_max_frame(payload: bytes) -> tuple[int, int]:
    """(max_frame_width, max_frame_height) from a sequence header OBU's payload (AV1 5.5)."""
    bits = _Bits(payload)
    bits.f(3)  # seq_profile
    bits.f(1)  # still_picture
    if bits.f(1):  # reduced_still_picture_header
        bits.f(5)  # seq_level_idx[0]
    else:
        decoder_model_info = False
        delay_bits = 0
        if bits.f(1):  # timing_info_present_flag
            bits.f(32), bits.f(32)  # num_units_in_display_tick, time_scale
            if bits.f(1):  # equal_picture_interval
                bits.uvlc()  # num_ticks_per_picture_minus_1
            decoder_model_info = bool(bits.f(1))
            if decoder_model_info:
                delay_bits = bits.f(5) + 1  # buffer_delay_length_minus_1
                bits.f(32), bits.f(5), bits.f(5)  # decoding tick, removal and presentation time lengths
        initial_display_delay = bits.f(1)
        for _ in range(bits.f(5) + 1):  # operating_points_cnt_minus_1
            bits.f(12)  # operating_point_idc
            if bits.f(5) > 7:  # seq_level_idx
                bits.f(1)  # seq_tier
            if decoder_model_info and bits.f(1):  # decoder_model_present_for_this_op
                bits.f(delay_bits), bits.f(delay_bits), bits.f(1)  # buffer delays, low_delay_mode_flag
            if initial_display_delay and bits.f(1):
                bits.f(4)  # initial_display_delay_minus_1
    width_bits, height_bits = bits.f(4) + 1, bits.f(4) + 1
    return bits.f(width_bits) + 1, bits.f(height_bits) + 1


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of an AV1 leb128 number, at most 8 bytes."""
    value = 0
    for i in range(8):
        if pos + i >= len(data):
            raise CorruptImage("The image file is damaged: its AV1 data is cut short.")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise CorruptImage("The image file is damaged: its AV1 data has an impossible OBU size.")


def _av1_frame_limit(file: _Meta, item: int) -> tuple[int, int] | None:
    """The largest frame the sequence headers before an AV1 item's first frame allow, or None
    when there is none (the decoder then has nothing to decode with and refuses the file).

    Every sequence header before the first frame counts (a later one would replace an
    earlier one in the decoder); a file that puts more than a few OBUs or 64 KB before its
    first frame is refused rather than read further."""
    head = file.item_head(item, AV1_HEAD_BYTES)
    largest: tuple[int, int] | None = None
    pos = 0
    for _ in range(MAX_AV1_OBUS_BEFORE_FRAME):
        if pos >= len(head):
            if len(head) < AV1_HEAD_BYTES:
                return largest  # the item ends without a frame: the decoder refuses it
            break
        header = head[pos]
        kind, extension, has_size = header >> 3 & 15, header >> 2 & 1, header >> 1 & 1
        pos += 1 + extension
        if has_size:
            size, pos = _leb128(head, pos)
        else:
            size = len(head) - pos  # the last OBU of the data
        if kind in (_OBU_FRAME_HEADER, _OBU_TILE_GROUP, _OBU_FRAME):
            return largest
        if kind == _OBU_SEQUENCE_HEADER:
            if pos + size > len(head):
                raise CorruptImage("The image file is damaged: its AV1 sequence header is cut short.")
            width, height = _av1_max_frame(head[pos : pos + size])
            if largest is None or width * height > largest[0] * largest[1]:
                largest = (width, height)
        pos += size
    raise CorruptImage(
        f"The image file's AV1 data has more than {MAX_AV1_OBUS_BEFORE_FRAME} pieces or "
        f"{AV1_HEAD_BYTES // 1024} KB before its first frame.")


def _canvas(file: _Meta, item: int) -> tuple[int, int] | None:
    """The canvas a ``grid`` or ``iovl`` item's descriptor asks the decoder to allocate."""
    kind = file.types.get(item)
    if kind not in _CANVAS_TYPES:
        return None
    # grid: version, flags, rows - 1, columns - 1, width, height; iovl: version, flags, four
    # 16-bit fill values, width, height, offsets. Flag bit 0: 32-bit width and height.
    at = 4 if kind == b"grid" else 10
    head = file.item_head(item, at + 8)
    wide = len(head) >= 2 and head[1] & 1
    need = at + (8 if wide else 4)
    fields = ">II" if wide else ">HH"
    if len(head) < need:
        raise CorruptImage(f"The image file is damaged: the layout of its '{kind.decode()}' image is cut short.")
    if head[0] != 0:
        raise CorruptImage(f"The image file uses a '{kind.decode()}' image of version {head[0]}, which is not defined.")
    return struct.unpack_from(fields, head, at)


def _pixels(file: _Meta, item: int, memo: dict[int, int], path: set[int], need_size: bool = True) -> int:
    """The largest picture the decoder builds for ``item`` (see :attr:`PrimaryLayout.decoded_pixels`).

    Memoised, so that a tile referenced 65,536 times, or a diamond of derivations, costs one
    look each; ``path`` holds the items being derived from, to catch a reference cycle."""
    if item in memo:
        return memo[item]
    if item in path:
        raise CorruptImage("The image file is damaged: its images are derived from each other in a loop.")
    if len(path) >= MAX_DERIVATION_DEPTH:
        raise CorruptImage(f"The image file derives images from images more than {MAX_DERIVATION_DEPTH} levels deep.")
    path.add(item)
    sizes = _ispe(file, item, file.properties_of(item))
    canvas = _canvas(file, item)
    if canvas is not None and any(size != canvas for size in sizes):
        # HEIF has the ispe of a derived image give the size of its canvas. Pillow and
        # pillow-heif report the ispe; libheif builds the canvas and refuses the file only
        # afterwards, and Pillow reads libavif's canvas as if it had the ispe's width, which
        # shears the picture (faces included) row by row.
        raise CorruptImage("The image file states the size of its image in two different ways.")
    inputs = sum(count * _pixels(file, child, memo, path) for child, count in Counter(file.dimg.get(item, ())).items())
    path.discard(item)
    frame = _av1_frame_limit(file, item) if file.types.get(item) == b"av01" else None
    pixels = max([w * h for w, h in sizes] + [canvas[0] * canvas[1] if canvas else 0, inputs,
                                               frame[0] * frame[1] if frame else 0])
    if pixels == 0 and need_size:
        raise CorruptImage(f"The image file is damaged: it does not say how large image item {item} is.")
    memo[item] = pixels
    return pixels


def _layout(file: _Meta) -> PrimaryLayout:
    primary = file.primary
    assert primary is not None
    memo: dict[int, int] = {}
    pixels = _pixels(file, primary, memo, set())
    # libheif and libavif decode the primary's alpha plane with it, and an auxiliary image can
    # be a grid of its own. Depth maps and gain maps (also 'auxl') are not decoded, but no real
    # one is larger than the photo, so counting them costs nothing; one without a size is left
    # to the decoder, which ignores it or refuses the file.
    for aux, targets in file.auxl.items():
        if primary in targets:
            pixels = max(pixels, _pixels(file, aux, memo, set(), need_size=False))
    return PrimaryLayout(decoded_pixels=pixels, crop=_crop(file, primary))


def _crop(file: _Meta, item: int) -> tuple[int, int, int, int] | None:
    """The clean aperture of ``item`` in its coded frame, rounded inward, or None."""
    properties = file.properties_of(item)
    transforms = [kind for kind, _, _ in properties if kind in _TRANSFORMS]
    if b"clap" not in transforms:
        return None
    if transforms.count(b"clap") > 1:
        raise CorruptImage("The image file gives its image two clean apertures ('clap'); viewers disagree on which applies.")
    if transforms[0] != b"clap":
        # MIAF fixes the order clap, irot, imir, and that is the order an AVIF gets through
        # Pillow (it returns the coded frame and the turn as an EXIF orientation, the crop is
        # ours); libheif applies them in association order. The two would show other pixels.
        raise CorruptImage("The image file rotates or mirrors its image before cropping it; viewers disagree on what it shows.")
    sizes = _ispe(file, item, properties)
    if not sizes:
        raise CorruptImage("The image file crops its image (a 'clap' box) but does not say how large the image is.")
    # The first one, as libheif reads it; a grid's or overlay's canvas, which is what the
    # decoders crop, has been checked to agree with it (see _pixels).
    width, height = sizes[0]
    payload, end = next((p, e) for kind, p, e in properties if kind == b"clap")
    if end - payload < 32:
        raise CorruptImage("The image file is damaged: its clean aperture ('clap') is cut short.")
    width_n, width_d, height_n, height_d = struct.unpack_from(">IIII", file.data, payload)
    h_off_n, h_off_d, v_off_n, v_off_d = struct.unpack_from(">iIiI", file.data, payload + 16)
    if 0 in (width_d, height_d, h_off_d, v_off_d):
        raise CorruptImage("The image file is damaged: its clean aperture ('clap') divides by zero.")
    aperture_w, aperture_h = Fraction(width_n, width_d), Fraction(height_n, height_d)
    # ISO/IEC 14496-12: the aperture is centred at offset + (size - 1) / 2, and its first pixel
    # lies (aperture - 1) / 2 before that centre.
    left = Fraction(h_off_n, h_off_d) + Fraction(width - 1, 2) - (aperture_w - 1) / 2
    top = Fraction(v_off_n, v_off_d) + Fraction(height - 1, 2) - (aperture_h - 1) / 2
    # Whole pixels only, rounding inward: a sliver less than a viewer shows is harmless, a
    # sliver more is what this crop exists to prevent.
    box = (
        max(0, math.ceil(left)),
        max(0, math.ceil(top)),
        min(width, math.floor(left + aperture_w)),
        min(height, math.floor(top + aperture_h)),
    )
    if box[0] >= box[2] or box[1] >= box[3]:
        raise CorruptImage("The image file's clean aperture ('clap') leaves no pixel to show.")
    return box
