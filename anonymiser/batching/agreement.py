"""Comparing two sets of LSC-CNN detections of one photo: identical boxes and heads left uncovered.

The engine's precision checks (reduced precision against IEEE float32), the tests and the GPU
benchmark all measure agreement this way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..locators.base import Detections
from ..regions import pad_boxes, to_pixels


@dataclass(frozen=True)
class Agreement:
    """How far ``candidate`` detections reproduce ``reference`` ones on one photo."""

    reference: int
    candidate: int
    identical: int  # boxes present in both, coordinates equal
    uncovered: int  # reference heads not fully painted over by the candidate's covers

    @property
    def identical_fraction(self) -> float:
        most = max(self.reference, self.candidate)
        return 1.0 if most == 0 else self.identical / most

    def __add__(self, other: "Agreement") -> "Agreement":
        return Agreement(self.reference + other.reference, self.candidate + other.candidate,
                         self.identical + other.identical, self.uncovered + other.uncovered)


@dataclass(frozen=True)
class PrecisionCheck:
    """One photo run in the engine's reduced precision and again in IEEE float32."""

    precision: str  # the precision checked (fp16, bf16, tf32)
    agreement: Agreement  # reference: float32's boxes; candidate: the reduced precision's
    seconds: float  # the float32 pass, its decoding and the comparison
    failed: bool  # below the bar: a head uncovered here, or the checks' identical share < 99 %
    fell_back: bool  # this check switched the engine to float32


def agreement(reference: Detections, candidate: Detections, image_hw: tuple[int, int]) -> Agreement:
    """Identical boxes (multiset of exact coordinates) and reference heads left uncovered.

    A reference head counts as covered when every pixel of its box lies under the covers the
    pipeline would paint for the candidate's boxes (padded as head boxes, rounded outwards).
    """
    ref = Counter(map(tuple, np.asarray(reference.boxes).tolist()))
    cand = Counter(map(tuple, np.asarray(candidate.boxes).tolist()))
    identical = sum((ref & cand).values())
    h, w = image_hw
    painted = np.zeros((h, w), bool)
    boxes, _ = to_pixels(pad_boxes(candidate.boxes, "head"), 1.0, w, h)
    for x1, y1, x2, y2 in boxes:
        painted[y1:y2, x1:x2] = True
    uncovered = 0
    for x1, y1, x2, y2 in np.asarray(reference.boxes, np.float64):
        a, b = int(math.floor(x1)), int(math.ceil(x2))
        c, d = int(math.floor(y1)), int(math.ceil(y2))
        region = painted[max(c, 0) : min(d, h), max(a, 0) : min(b, w)]
        if region.size and not region.all():
            uncovered += 1
    return Agreement(len(reference), len(candidate), identical, uncovered)

