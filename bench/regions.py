"""Time of merging and bridging the regions of a huge crowd (the step after the locators).

A 10000x7000 photo packed with N heads, each seen by two locators (the second box jittered), so
2N boxes go into ``regions.merge`` and the merged regions into ``regions.gap_bridges``.

    python bench/regions.py [N ...]      (default: 1000 15000 50000)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anonymiser import regions as reg  # noqa: E402

WIDTH, HEIGHT = 10_000, 7_000


def crowd(n: int, seed: int = 0) -> reg.Regions:
    """``2n`` boxes: ``n`` packed heads and a jittered second detection of each."""
    rng = np.random.default_rng(seed)
    side = np.sqrt(WIDTH * HEIGHT / n)
    x, y = rng.uniform(0, WIDTH, n), rng.uniform(0, HEIGHT, n)
    s = rng.uniform(0.5, 1.0, n) * side
    boxes = np.stack([x - s / 2, y - s / 2, x + s / 2, y + s / 2], axis=1).astype(np.float32)
    again = boxes + rng.normal(0, side * 0.05, boxes.shape).astype(np.float32)
    return reg.Regions(np.concatenate([boxes, again]), [frozenset({"a"})] * n + [frozenset({"b"})] * n)


def main() -> None:
    print("| boxes | merge s | regions | bridges s | bridges |\n|---|---|---|---|---|")
    for n in [int(a) for a in sys.argv[1:]] or [1000, 15000, 50000]:
        regions = crowd(n)
        started = time.perf_counter()
        merged = reg.merge(regions)
        merge_s = time.perf_counter() - started
        started = time.perf_counter()
        bridges = reg.gap_bridges(merged, (WIDTH, HEIGHT))
        bridge_s = time.perf_counter() - started
        print(f"| {2 * n:,} | {merge_s:.2f} | {len(merged):,} | {bridge_s:.2f} | {len(bridges):,} |")


if __name__ == "__main__":
    main()
