"""Embedded ICC profiles made safe to hand to LittleCMS.

A profile is the file's own program for its colours, and LittleCMS runs it at 33³ sample points
while it builds a transform. One tag type chains processing elements without a bound
(``multiProcessElementType``, ``mpet``, which only the floating-point ``D2Bx``/``B2Dx`` tags
carry), and its element table may point every element at the same few bytes: an 801 KB JPEG
took six minutes to decode, and a 2 KB PNG (profiles are compressed there) several. Cameras,
phones and editors describe colour with matrices, curves and ``A2Bx`` lookup tables, whose size
is bounded by the profile's bytes; LittleCMS uses those whenever the ``D2Bx`` tags are absent.
"""

from __future__ import annotations

#: tags whose only type is ``mpet``: LittleCMS prefers them to ``A2Bx``/``B2Ax`` when present
_FLOAT_TAGS = {b"D2B0", b"D2B1", b"D2B2", b"D2B3", b"B2D0", b"B2D1", b"B2D2", b"B2D3"}
_HEADER = 128
_ENTRY = 12
#: real profiles have a few dozen tags; more is no profile a camera or editor wrote
MAX_TAGS = 1000


def tame_profile(icc: bytes) -> bytes | None:
    """``icc`` with its multi-process-element tags hidden from LittleCMS (renamed to private
    signatures it never reads), ``icc`` itself when it has none, or None when its tag table is
    not understood (the caller then converts without it)."""
    if len(icc) < _HEADER + 4 or icc[36:40] != b"acsp":
        return None
    count = int.from_bytes(icc[_HEADER:_HEADER + 4], "big")
    if count > MAX_TAGS or _HEADER + 4 + count * _ENTRY > len(icc):
        return None
    tamed = bytearray(icc)
    for index in range(count):
        entry = _HEADER + 4 + index * _ENTRY
        signature = icc[entry:entry + 4]
        offset = int.from_bytes(icc[entry + 4:entry + 8], "big")
        if signature in _FLOAT_TAGS or icc[offset:offset + 4] == b"mpet":
            # A private signature, distinct per entry so that no two tags share one.
            tamed[entry:entry + 4] = b"pp" + index.to_bytes(2, "big")
    return bytes(tamed) if tamed != icc else icc
