"""From detector boxes to the regions that get covered.

Padding: a face box (brows to chin) is widened 1.6x and heightened 1.7x, with its centre moved
up by 15 % of its height, so that hair, ears, forehead and chin are inside; measured on the dev
set, smaller factors left hairlines and ears visible and uncovered annotated head points (the
annotation point is often on the crown). A head box already encloses the head and gets 1.2x for
box jitter.

Merging: boxes of the same head from different locators (high IoU, or one mostly inside the
other) become one region, their enclosing box, so nothing either locator covered is lost.

Dense-crowd safeguard: where covered heads are packed tightly, a head the detectors missed is
most likely in the gap between two covered neighbours. For each region we take its (up to 8)
nearest neighbours whose centres are closer than ``gap_factor`` times the pair's mean side and cover a
head-sized square at the midpoint of the pair: exactly where a missed head between them would
be. Adjacent heads' squares fall mostly inside their own covers (little extra loss); heads one
gap apart get the gap filled. Isolated heads are left alone, so sparse photos lose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.spatial import cKDTree
from scipy.sparse.csgraph import connected_components

from .locators.base import BoxKind, Detections
from .locators.nms import enclosing, iou_matrix, pairs_where

#: (width factor, height factor, upward shift as a fraction of the box height)
PADDING: dict[str, tuple[float, float, float]] = {
    "face": (1.6, 1.7, 0.15),
    "head": (1.2, 1.2, 0.0),
}
MERGE_IOU = 0.45
MERGE_CONTAINMENT = 0.8


@dataclass
class Regions:
    """Float boxes ``[N, 4]`` with, per box, the set of sources that produced it."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    sources: list[frozenset[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)

    def extend(self, other: "Regions") -> "Regions":
        return Regions(np.concatenate([self.boxes, other.boxes]), self.sources + other.sources)


def pad_boxes(boxes: np.ndarray, kind: BoxKind) -> np.ndarray:
    """Grow boxes by the padding of their kind (see module docstring)."""
    fw, fh, shift = PADDING[kind]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cy = cy - shift * h
    return np.stack([cx - fw * w / 2, cy - fh * h / 2, cx + fw * w / 2, cy + fh * h / 2], axis=1)


def from_detections(found: Detections, kind: BoxKind, source: str) -> Regions:
    """Padded regions of one locator's detections."""
    return Regions(pad_boxes(found.boxes, kind), [frozenset({source})] * len(found))


def _containment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area, for every pair."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return ix * iy / np.maximum(np.minimum(area_a[:, None], area_b[None, :]), 1e-9)


def merge(regions: Regions) -> Regions:
    """Unite regions that cover the same head into their enclosing box.

    Regions come out in the order of their first member. Only boxes whose x ranges overlap can
    cover the same head, so each block of boxes (taken in order of their left edges) is compared
    with those alone: comparing every box with every other took 24 s for 30,000 boxes (a huge
    crowd seen by two locators) and grew with the square of the count.
    """
    n = len(regions)
    if n < 2:
        return regions
    boxes = regions.boxes
    rows, cols = pairs_where(
        boxes, lambda a, b: (iou_matrix(a, b) >= MERGE_IOU) | (_containment(a, b) >= MERGE_CONTAINMENT)
    )
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    # Labels are numbered by each component's lowest index: regions keep their first member's order.
    count, labels = connected_components(graph, directed=False)
    merged = enclosing(boxes, labels, count)
    sources: list[set[str]] = [set() for _ in range(count)]
    for label, source in zip(labels.tolist(), regions.sources):
        sources[label] |= source
    return Regions(merged, [frozenset(s) for s in sources])


def _coverage_fraction(boxes: np.ndarray, covered: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fraction of each box's pixels already inside a covered region (summed-area table)."""
    mask = np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in np.clip(np.round(covered), 0, [width, height, width, height]).astype(int):
        mask[y1:y2, x1:x2] = 1
    # OpenCV's table, with its leading row and column of zeros, as narrow as the pixel count
    # allows: 0.5 ms at 1920x1088 against 10.5 ms for two numpy cumulative sums (int32 mask and
    # two int64 sums took 2 GB at a 100 MP photo's full size).
    depth = cv2.CV_32S if (height + 1) * (width + 1) < 2**31 else cv2.CV_64F
    table = cv2.integral(mask, sdepth=depth)
    del mask
    b = np.clip(np.round(boxes), 0, [width, height, width, height]).astype(int)
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1)
    inside = table[b[:, 3], b[:, 2]] - table[b[:, 1], b[:, 2]] - table[b[:, 3], b[:, 0]] + table[b[:, 1], b[:, 0]]
    return inside / area


def gap_bridges(
    regions: Regions,
    size: tuple[int, int],
    gap_factor: float = 2.0,
    neighbours: int = 8,
    already_covered: float = 0.75,
) -> Regions:
    """Bridge regions between tightly packed covered heads (the dense-crowd safeguard).

    ``size`` is the image's ``(width, height)``. A bridge whose square is already mostly
    (``already_covered``) inside covered regions adds nothing and is dropped, so adjacent heads
    cost no extra area.
    """
    n = len(regions)
    if n < 2 or gap_factor <= 0:
        return Regions()
    boxes = regions.boxes
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    sides = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None))
    k = min(neighbours, n - 1)
    # Nearest neighbours from a k-d tree: distances from every region to every other took 15 s
    # for 100,000 regions.
    dist, nearest = cKDTree(centres).query(centres, k=k + 1)
    i = np.repeat(np.arange(n), k + 1)
    j, d = nearest.ravel(), dist.ravel()
    other = j != i
    i, j, d = i[other], j[other], d[other]
    # Only heads of similar size are neighbours in a crowd; a small far head next to a large
    # near one is perspective, not a packed crowd.
    close = d <= gap_factor * (sides[i] + sides[j]) / 2
    similar = np.maximum(sides[i], sides[j]) <= 2.0 * np.minimum(sides[i], sides[j])
    i, j = i[close & similar], j[close & similar]
    idx = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0)
    if len(idx) == 0:
        return Regions()
    mid = (centres[idx[:, 0]] + centres[idx[:, 1]]) / 2
    half = (sides[idx[:, 0]] + sides[idx[:, 1]]) / 4
    bridges = np.stack([mid[:, 0] - half, mid[:, 1] - half, mid[:, 0] + half, mid[:, 1] + half], axis=1)
    bridges = bridges[_coverage_fraction(bridges, boxes, *size) < already_covered]
    return Regions(bridges.astype(np.float32), [frozenset({"safeguard"})] * len(bridges))


def to_pixels(boxes: np.ndarray, scale: float | tuple[float, float], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale float boxes to an image of ``width`` x ``height`` and round *outwards* to ints.

    ``scale`` is one factor or ``(x, y)`` factors. Rounding outwards means the integer region
    always contains the float one. Returns the integer boxes that are not empty after clipping,
    and the mask of which input boxes they are.

    Edges are rounded outwards to whole source pixels before scaling: a source pixel partly
    inside a box is covered at full size, so in a downscaled photo every output pixel it
    blends into (``INTER_AREA`` averages each output pixel's footprint) must be covered too.
    Scaling the float edges first could leave one such output pixel beside the cover (left
    edge 6.9 at scale 0.3: output pixel 1 holds source pixel 6, but 6.9 * 0.3 rounds down to 2).
    """
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    whole = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    whole[:, :2] = np.floor(whole[:, :2])
    whole[:, 2:] = np.ceil(whole[:, 2:])
    scaled = whole * np.array([sx, sy, sx, sy])
    out = np.empty_like(scaled, dtype=np.int64)
    out[:, 0] = np.clip(np.floor(scaled[:, 0]), 0, width)
    out[:, 1] = np.clip(np.floor(scaled[:, 1]), 0, height)
    out[:, 2] = np.clip(np.ceil(scaled[:, 2]), 0, width)
    out[:, 3] = np.clip(np.ceil(scaled[:, 3]), 0, height)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep
