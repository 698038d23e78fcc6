"""The one interface every head locator implements.

A locator takes an upright RGB image (``uint8``, shape ``[H, W, 3]``) and returns boxes in
pixel coordinates of that same image. ``kind`` says what the boxes enclose: ``"face"`` boxes
need generous padding to take in hair and ears, ``"head"`` boxes already enclose the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

BoxKind = Literal["face", "head"]


@dataclass(frozen=True)
class Detections:
    """Boxes ``[N, 4]`` as ``x1, y1, x2, y2`` (float32, pixels) with scores ``[N]``."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def concat(parts: list["Detections"]) -> "Detections":
        """All boxes of ``parts`` in one set (no suppression)."""
        if not parts:
            return Detections()
        return Detections(
            np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts])
        )


#: mean difference between neighbouring channels (0-255 scale) below which a photo counts as black
#: and white; the chroma noise of a B&W photo saved as a colour JPEG stays well below it
GREY_TOLERANCE = 2.0


def is_greyscale(rgb: np.ndarray) -> bool:
    """Whether ``rgb`` is a black-and-white photo (channels equal, or nearly: JPEG chroma noise).

    The face and head models score heads in black-and-white photos lower than in colour ones,
    so their locators use a lower threshold there. Judged on every fourth row and column.
    """
    sample = rgb[::4, ::4].astype(np.int16)
    if sample.size == 0:
        return False
    spread = np.abs(sample[..., 0] - sample[..., 1]).mean() + np.abs(sample[..., 1] - sample[..., 2]).mean()
    return bool(spread < GREY_TOLERANCE)


@runtime_checkable
class HeadLocator(Protocol):
    """Finds heads (or faces) in an upright RGB image."""

    name: str
    kind: BoxKind

    def locate(self, rgb: np.ndarray) -> Detections:
        """Return boxes in pixel coordinates of ``rgb`` (``uint8 [H, W, 3]``)."""
        ...
