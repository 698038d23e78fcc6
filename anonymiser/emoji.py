"""A raised-fist emoji drawn by this project from simple vector shapes.

Drawn at the size it is needed (with supersampling for small sizes), so it stays crisp from
8 px to 2,000 px and needs no font or image asset; it is the project's own work under the
project's licence. The skin tone is configurable with the six Unicode emoji tones.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

#: Unicode's default yellow plus the five Fitzpatrick-based emoji modifier tones
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "yellow": (255, 200, 61),
    "light": (247, 222, 206),
    "medium-light": (243, 210, 162),
    "medium": (213, 171, 136),
    "medium-dark": (175, 126, 87),
    "dark": (124, 83, 62),
}
DEFAULT_TONE = "medium-dark"
#: the opaque backing under the fist fills the whole covered rectangle
DEFAULT_BACKING = (32, 32, 40)

# Shapes in a unit square (x0, y0, x1, y1, corner radius); drawn in this order.
_FOREARM = (0.37, 0.72, 0.63, 1.01, 0.0)
_PALM = (0.22, 0.30, 0.78, 0.80, 0.10)
_FINGERS = tuple((0.22 + i * 0.14, 0.12, 0.36 + i * 0.14, 0.50, 0.065) for i in range(4))
_THUMB = (0.20, 0.46, 0.64, 0.60, 0.07)
_OUTLINE = 0.025


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in colour)  # type: ignore[return-value]


def _supersample(side: int) -> int:
    if side <= 64:
        return 8
    if side <= 256:
        return 4
    if side <= 800:
        return 2
    return 1


#: renders up to this side are cached (256 of them take at most 50 MB); larger ones are drawn
#: with little or no supersampling each time, as caching them kept up to 256 full-photo fists (6 GB)
_CACHED_SIDE = 256


def _render_square(side: int, tone: str, backing: tuple[int, int, int]) -> np.ndarray:
    """The emoji on its backing, ``[side, side, 3]`` uint8, fully opaque."""
    if side <= _CACHED_SIDE:
        return _render_small(side, tone, backing)
    return _draw(side, tone, backing)


def _draw(side: int, tone: str, backing: tuple[int, int, int]) -> np.ndarray:
    skin = SKIN_TONES[tone]
    line = _shade(skin, 0.62)
    ss = _supersample(side)
    big = side * ss
    canvas = Image.new("RGB", (big, big), backing)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(_OUTLINE * big))

    def shape(box: tuple[float, float, float, float, float]) -> None:
        x0, y0, x1, y1, radius = (v * big for v in box)
        draw.rounded_rectangle((x0, y0, x1, y1), radius=radius, fill=skin, outline=line, width=width)

    shape(_FOREARM)
    shape(_PALM)
    for finger in _FINGERS:
        shape(finger)
    shape(_THUMB)
    if ss > 1:
        canvas = canvas.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(canvas, dtype=np.uint8)


_render_small = lru_cache(maxsize=256)(_draw)


def render(width: int, height: int, tone: str = DEFAULT_TONE, backing: tuple[int, int, int] = DEFAULT_BACKING) -> np.ndarray:
    """An opaque ``[height, width, 3]`` tile: backing everywhere, the fist centred on it."""
    if tone not in SKIN_TONES:
        raise ValueError(f"unknown skin tone {tone!r}; choose one of {', '.join(SKIN_TONES)}")
    if width <= 0 or height <= 0:
        raise ValueError("emoji size must be positive")
    tile = np.empty((height, width, 3), np.uint8)
    tile[:] = backing
    side = min(width, height)
    fist = _render_square(side, tone, tuple(backing))
    top, left = (height - side) // 2, (width - side) // 2
    tile[top : top + side, left : left + side] = fist
    return tile
