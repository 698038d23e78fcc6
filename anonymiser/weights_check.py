"""``anonymise check-weights``: every locator's weights are present, intact, load and run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import AnonymiserError
from .locators.registry import REGISTRY, default_weights_dir


def _sample_image() -> np.ndarray:
    """The public-domain astronaut photo from scikit-image, or a grey frame without it."""
    try:
        from skimage import data

        return np.ascontiguousarray(data.astronaut())
    except ImportError:  # pragma: no cover
        return np.full((512, 512, 3), 128, np.uint8)


def main(argv: Sequence[str] = ()) -> int:
    """Print one line per locator; exit 1 if a present file fails its checks."""
    parser = argparse.ArgumentParser(prog="anonymise check-weights")
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args(list(argv))
    weights = args.weights or default_weights_dir()
    image = _sample_image()
    broken = 0
    print(f"weights folder: {weights}" + ("" if weights.is_dir() else " (does not exist: only models shipped in packages can load)"))
    for name, entry in REGISTRY.items():
        if not entry.available(weights):
            print(f"  {name:11s} not installed ({entry.description})")
            continue
        try:
            start = time.perf_counter()
            locator = entry.load(weights)  # each loader checks size and checksum before parsing
            loaded = time.perf_counter() - start
            start = time.perf_counter()
            found = locator.locate(image)
            ran = time.perf_counter() - start
        except AnonymiserError as exc:
            broken += 1
            print(f"  {name:11s} BROKEN: {exc}")
            continue
        print(f"  {name:11s} ok: verified and loaded in {loaded:.1f}s, {len(found)} box(es) on the sample in {ran:.1f}s")
    return 1 if broken else 0
