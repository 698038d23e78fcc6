"""Turn LSC-CNN logits into head boxes (spec §3.1-§3.7), in numpy (and a scipy k-d tree).

Vocabulary: the *grid* is the 1/2-resolution prediction map (``H/2 x W/2`` for an ``H x W``
network input). Scale ``s`` (0..3) has its cells ``f_s = 2**(3 - s)`` grid units apart. Box sides
``b`` are in grid units; in input pixels a detection at grid ``(y, x)`` is the square of side
``2b`` centred at ``(2x, 2y)``.

The reference upsamples every scale to the grid with a "sparse" operator and then compares maps
position by position. Its closed form (spec §3.3) is used here: cell ``(i, j)`` of scale ``s``
lands at grid ``(i*f_s, j*f_s)``, the top-left of its block, and every other grid position of that
scale is background. So only strided views of a grid-sized array are touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from ..errors import DeviceFailure
from .nms import greedy_rounds

NUM_SCALES = 4
BOXES_PER_SCALE = 3
BACKGROUND = 3  # channel index of the "no head" class
GAMMA = (1, 1, 2, 4)

#: Grid units between neighbouring cells of each scale, relative to the 1/2-resolution grid.
PRED_DOWNSCALE_FACTORS = (8, 4, 2, 1)

#: Input pixels per cell of each output (O0..O3).
OUTPUT_STRIDES = (16, 8, 4, 2)

#: NMS IoU threshold of the blm app (the published QNRF number used 0.20).
DEFAULT_NMS_THRESHOLD = 0.25


def box_size_bins() -> list[int]:
    """The 12 box sizes in grid units, built exactly as spec §3.2 describes."""
    bins = [1]
    pointer = 0
    while len(bins) < NUM_SCALES * BOXES_PER_SCALE:
        gamma = GAMMA[len(bins) // (len(GAMMA) - 1)]
        bins.append(bins[pointer] + gamma)
        pointer += 1
    return bins


BOX_SIZE_BINS: tuple[int, ...] = tuple(box_size_bins())

#: ``BOXES[s][c]``: side (grid units) of box class ``c`` at scale ``s``; rows reversed so that the
#: coarsest output (s0) owns the largest boxes.
BOXES: tuple[tuple[int, ...], ...] = tuple(
    tuple(BOX_SIZE_BINS[r * BOXES_PER_SCALE : (r + 1) * BOXES_PER_SCALE])
    for r in reversed(range(NUM_SCALES))
)

#: Largest head side in input pixels; tiling margins must be at least this.
MAX_BOX_PIXELS = 2 * max(BOX_SIZE_BINS)


@dataclass(frozen=True)
class GridDetections:
    """Kept candidates in grid units, in row-major grid order (as the reference's dot map)."""

    y: np.ndarray  # int64 [N] grid row
    x: np.ndarray  # int64 [N] grid column
    side: np.ndarray  # int64 [N] box side b (grid units)
    score: np.ndarray  # float32 [N] softmax probability of the winning class
    scale: np.ndarray  # int64 [N] scale index s that produced the candidate

    def __len__(self) -> int:
        return len(self.score)

    def pixel_boxes(self) -> np.ndarray:
        """``[N, 4]`` float32 ``x1, y1, x2, y2`` in network-input pixels (spec §3.7)."""
        cx, cy, b = 2.0 * self.x, 2.0 * self.y, self.side.astype(np.float64)
        return np.stack([cx - b, cy - b, cx + b, cy + b], axis=1).astype(np.float32).reshape(-1, 4)


def softmax_channels(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of a ``C x h x w`` map, computed in float32."""
    z = np.asarray(logits, dtype=np.float32)
    e = z - z.max(axis=0, keepdims=True)
    np.exp(e, out=e)  # in place: the same values, without two more grid-sized temporaries
    e /= e.sum(axis=0, keepdims=True)
    return e


def winning_class(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(label, conf)`` of a ``C x h x w`` map: exactly ``argmax(axis=0)`` (first index on ties)
    and ``max(axis=0)``.

    numpy's argmax along the slow axis walks each column on its own: 9 of the 22 ms that decoding
    a 1920x1088 photo took. Comparing each plane with the maximum, last class first so that
    earlier ones win ties, gives the same labels with whole-plane operations.
    """
    conf = probs.max(axis=0)
    label = np.full(conf.shape, probs.shape[0] - 1, np.int8)
    for c in range(probs.shape[0] - 2, -1, -1):
        np.copyto(label, np.int8(c), where=probs[c] == conf)
    return label, conf


def _check_shapes(maps: Sequence[np.ndarray]) -> tuple[int, int]:
    """Validate the four ``4 x h_s x w_s`` maps and return the grid size ``(H/2, W/2)``."""
    if len(maps) != NUM_SCALES:
        raise ValueError(f"expected {NUM_SCALES} maps (O0..O3), got {len(maps)}")
    gh, gw = maps[-1].shape[-2:]
    for s, m in enumerate(maps):
        f = PRED_DOWNSCALE_FACTORS[s]
        expected = (BOXES_PER_SCALE + 1, gh // f, gw // f)
        if m.ndim != 3 or tuple(m.shape) != expected or gh % f or gw % f:
            raise ValueError(f"map {s} has shape {tuple(m.shape)}, expected {expected}")
    return gh, gw


def merged_candidates(probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-grid-position winner over scales (spec §3.4-§3.5).

    Returns grid-sized ``score`` (float32, 0 = no candidate), ``side`` and ``scale`` maps.
    """
    gh, gw = _check_shapes(probs)
    score = np.zeros((gh, gw), np.float32)
    side = np.zeros((gh, gw), np.int64)
    scale = np.full((gh, gw), -1, np.int64)
    # merge(s0, s1) -> m1; merge(s2, m1); merge(s3, m2), where merge(A, B) takes A only if A is
    # strictly higher. Equivalently: start from s1 and let s0, s2, s3 (in that order) replace the
    # current winner only when strictly higher, which gives the tie priority s1 > s0 > s2 > s3.
    for s in (1, 0, 2, 3):
        label, conf = winning_class(np.asarray(probs[s], dtype=np.float32))
        conf[label == BACKGROUND] = 0
        f = PRED_DOWNSCALE_FACTORS[s]
        view_score = score[::f, ::f]
        take = conf > view_score
        view_score[take] = conf[take]
        side[::f, ::f][take] = np.asarray(BOXES[s] + (0,))[label[take]]
        scale[::f, ::f][take] = s
    return score, side, scale


#: above this many candidate pairs the pairwise form of NMS would need too much memory (an
#: untrained network's logits give a candidate at most grid positions) and the loop runs instead
MAX_NMS_PAIRS = 4_000_000


def _suppresses(
    i: np.ndarray, j: np.ndarray, x1: np.ndarray, x2: np.ndarray, y1: np.ndarray, y2: np.ndarray,
    area: np.ndarray, threshold: float,
) -> np.ndarray:
    """Whether kept box ``i`` removes box ``j`` (elementwise): IoU above the threshold, or one
    box inside the other, with the reference's "+1" areas."""
    w = np.maximum(0.0, np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j]) + 1.0)
    h = np.maximum(0.0, np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j]) + 1.0)
    inter = w * h
    iou = inter / (area[i] + area[j] - inter)
    return (inter == area[i]) | (inter == area[j]) | (iou > threshold)


def nms(y: np.ndarray, x: np.ndarray, side: np.ndarray, score: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS of spec §3.6; returns the kept indices (in suppression order).

    Semantics kept exactly: "+1" areas; a box survives a kept one only if IoU <= threshold; a box
    containing or contained in a kept one never survives (the reference forces IoU to 1 there; the
    spec says such boxes go "whatever the threshold", so they also go at threshold 1.0, the one
    value where "IoU := 1, keep if IoU <= thr" would read differently); processing order =
    numpy's default argsort of the scores, reversed.

    Greedy NMS keeps a box iff no kept box earlier in that order suppresses it. Boxes are at most
    24 grid units wide, so only pairs of candidates that close can interact: those pairs are found
    at once (a k-d tree) and the rule is applied to all of them in rounds, each deciding every box
    whose earlier neighbours are all decided (:func:`_nms_pairs`). A dense crowd's 1,600 heads
    took 24 ms in a loop of one Python step per kept box, holding the GIL the GPU worker's decode
    threads share. When the pairs would be too many (:data:`MAX_NMS_PAIRS`) the loop runs
    (:func:`_nms_loop`); both give the same boxes (tested).
    """
    n = len(score)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(score)[::-1]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    half = side.astype(np.float64) / 2.0
    boxes = (x - half, x + half, y - half, y + half)
    area = (boxes[1] - boxes[0] + 1.0) * (boxes[3] - boxes[2] + 1.0)
    # Boxes overlap under the +1 convention iff centres are < (b_i + b_j)/2 + 1 apart.
    reach = float(side.max()) + 1.0
    # Pairs are counted only when this bound cannot vouch for them, and never for a field of
    # candidates so large that counting alone would cost what the loop does.
    bound = n * min(n, (2 * reach + 1) ** 2) // 2
    tree = None if bound > MAX_NMS_PAIRS and n > MAX_NMS_PAIRS // 80 else cKDTree(np.stack([y, x], axis=1).astype(np.float64))
    if tree is None or (bound > MAX_NMS_PAIRS and (tree.count_neighbors(tree, reach, p=np.inf) - n) // 2 > MAX_NMS_PAIRS):
        return _nms_loop(order, rank, y, x, side, boxes, area, threshold)
    pairs = tree.query_pairs(reach, p=np.inf, output_type="ndarray")
    return _nms_pairs(order, rank, pairs, boxes, area, threshold)


def _nms_pairs(
    order: np.ndarray, rank: np.ndarray, pairs: np.ndarray, boxes: tuple[np.ndarray, ...],
    area: np.ndarray, threshold: float,
) -> np.ndarray:
    """Greedy NMS over the candidate pairs that could overlap, in vectorised rounds."""
    first, second = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    earlier = rank[first] < rank[second]
    hi, lo = np.where(earlier, first, second), np.where(earlier, second, first)
    hit = _suppresses(hi, lo, *boxes, area, threshold)
    return greedy_rounds(order, hi[hit], lo[hit])


def _nms_loop(
    order: np.ndarray, rank: np.ndarray, y: np.ndarray, x: np.ndarray, side: np.ndarray,
    boxes: tuple[np.ndarray, ...], area: np.ndarray, threshold: float,
) -> np.ndarray:
    """Greedy NMS one kept box at a time, looking up its neighbours through a grid index."""
    n = len(rank)
    gh, gw = int(y.max()) + 1, int(x.max()) + 1
    index = np.full((gh, gw), -1, np.int64)
    index[y, x] = np.arange(n)
    max_side = int(side.max())
    alive = np.ones(n, bool)
    keep: list[int] = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(int(i))
        r = int(np.ceil((side[i] + max_side) / 2.0)) + 1
        win = index[max(y[i] - r, 0) : y[i] + r + 1, max(x[i] - r, 0) : x[i] + r + 1].ravel()
        j = win[win >= 0]
        j = j[alive[j] & (rank[j] > rank[i])]
        if len(j):
            alive[j[_suppresses(np.full(len(j), i), j, *boxes, area, threshold)]] = False
    return np.asarray(keep, np.int64)


def decode_probabilities(probs: Sequence[np.ndarray], nms_threshold: float = DEFAULT_NMS_THRESHOLD) -> GridDetections:
    """Decode softmaxed maps ``(P0..P3)``, each ``4 x h_s x w_s``, into kept grid detections."""
    if not 0.0 <= nms_threshold <= 1.0:
        raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
    score_map, side_map, scale_map = merged_candidates(probs)
    # Row-major enumeration (y, then x) fixes which index each candidate gets, and with it the
    # tie order numpy's argsort produces inside NMS.
    y, x = np.nonzero(score_map > 0)
    score = score_map[y, x]
    side = side_map[y, x]
    keep = np.sort(nms(y, x, side, score, nms_threshold))
    return GridDetections(
        y=y[keep].astype(np.int64),
        x=x[keep].astype(np.int64),
        side=side[keep].astype(np.int64),
        score=score[keep].astype(np.float32),
        scale=scale_map[y[keep], x[keep]].astype(np.int64),
    )


class NonFiniteLogits(DeviceFailure):
    """The network's logits hold NaN or infinity: corrupt weights, or arithmetic that overflowed.
    Decoded, such a position's softmax matches no class and counts as background, so every head
    there would vanish without an error; a worker fault, never "no heads"."""


def decode(logits: Sequence[np.ndarray], nms_threshold: float = DEFAULT_NMS_THRESHOLD) -> GridDetections:
    """Decode the raw network logits ``(O0..O3)`` of one image (no batch axis);
    :class:`NonFiniteLogits` if any of them is not finite."""
    if not all(np.isfinite(m).all() for m in logits):
        raise NonFiniteLogits("LSC-CNN's logits are not finite (NaN or infinity): its weights or arithmetic are broken")
    return decode_probabilities([softmax_channels(m) for m in logits], nms_threshold)
