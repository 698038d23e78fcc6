"""Opaque covering of head regions: every pixel inside a region is replaced.

Styles: ``emoji`` (a raised fist on an opaque backing), ``solid`` and ``noise`` (random values
from the operating system's generator, never derived from the image). There is deliberately no
blur or pixelation: both have been reversed in published attacks (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import emoji

Style = Literal["emoji", "solid", "noise"]
STYLES: tuple[str, ...] = ("emoji", "solid", "noise")


@dataclass(frozen=True)
class CoverStyle:
    """How covered regions are painted."""

    style: Style = "emoji"
    skin_tone: str = emoji.DEFAULT_TONE
    colour: tuple[int, int, int] = emoji.DEFAULT_BACKING

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; choose one of {', '.join(STYLES)}")
        if self.skin_tone not in emoji.SKIN_TONES:
            raise ValueError(f"unknown skin tone {self.skin_tone!r}")


def _clip(region: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in region)
    return max(0, x1), max(0, y1), min(w, x2), min(h, y2)


def cover(
    rgb: np.ndarray,
    regions: np.ndarray,
    style: CoverStyle = CoverStyle(),
    emblem: np.ndarray | None = None,
) -> np.ndarray:
    """Return a copy of ``rgb`` with every integer region ``[x1, y1, x2, y2)`` painted over.

    Every pixel of every region is replaced: first all regions get their opaque fill (backing
    colour, or noise), then, in the emoji style, a fist is drawn on the regions marked in
    ``emblem`` (all by default), largest first so small heads' fists stay visible. The fist
    tiles are opaque too, so the order never lets an original pixel through.
    """
    out = rgb.copy()
    h, w = out.shape[:2]
    boxes = np.asarray(regions, dtype=np.int64).reshape(-1, 4)
    rng = np.random.default_rng() if style.style == "noise" else None
    for region in boxes:
        x1, y1, x2, y2 = _clip(region, w, h)
        if x2 <= x1 or y2 <= y1:
            continue
        if rng is not None:
            out[y1:y2, x1:x2] = rng.integers(0, 256, size=(y2 - y1, x2 - x1, 3), dtype=np.uint8)
        else:
            out[y1:y2, x1:x2] = style.colour
    if style.style != "emoji":
        return out
    chosen = np.ones(len(boxes), bool) if emblem is None else np.asarray(emblem, bool)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for index in np.argsort(-areas, kind="stable"):
        if not chosen[index]:
            continue
        x1, y1, x2, y2 = _clip(boxes[index], w, h)
        if x2 > x1 and y2 > y1:
            out[y1:y2, x1:x2] = emoji.render(x2 - x1, y2 - y1, style.skin_tone, style.colour)
    return out


def covered_mask(shape: tuple[int, int], regions: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels inside any region."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in np.asarray(regions, dtype=np.int64).reshape(-1, 4):
        mask[max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)] = True
    return mask
