"""CPU cost of decoding LSC-CNN logits (softmax, cross-scale merge, NMS) for one photo, and how
photos per second grow with decoding threads (the GPU worker decodes in a thread pool).

The logits are synthetic but shaped like a trained model's on a crowd photo: background wins
almost everywhere, and ``--heads`` confident heads are spread over the four scales. Nothing here
needs a GPU or weights.

    python bench/decode.py [--size 1920x1088] [--heads 200] [--threads 1,2,4] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anonymiser.locators.lsccnn_decode import (  # noqa: E402
    OUTPUT_STRIDES,
    decode,
    decode_probabilities,
    merged_candidates,
    softmax_channels,
)


def confident_logits(height: int, width: int, heads: int, seed: int = 0) -> list[np.ndarray]:
    """Four ``4 x h/d x w/d`` logit maps: noisy background everywhere, ``heads`` peaks."""
    rng = np.random.default_rng(seed)
    maps = []
    for d in OUTPUT_STRIDES:
        z = rng.normal(0.0, 1.0, (4, height // d, width // d)).astype(np.float32)
        z[3] += 8.0
        maps.append(z)
    for _ in range(heads):
        s = int(rng.integers(0, 4))
        _, h, w = maps[s].shape
        maps[s][int(rng.integers(0, 3)), int(rng.integers(0, h)), int(rng.integers(0, w))] += 20.0
    return maps


def per_photo_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1920x1088", help="network input WxH (multiples of 16)")
    parser.add_argument("--heads", type=int, default=200)
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    maps = confident_logits(height, width, args.heads)
    probs = [softmax_channels(m) for m in maps]
    score, _, _ = merged_candidates(probs)
    kept = len(decode(maps))
    print(f"{width}x{height}, {args.heads} planted heads: {int((score > 0).sum())} candidates, {kept} kept; "
          f"{os.cpu_count()} CPUs")
    softmax_ms = per_photo_ms(lambda: [softmax_channels(m) for m in maps], args.repeat)
    merge_ms = per_photo_ms(lambda: merged_candidates(probs), args.repeat)
    total_ms = per_photo_ms(lambda: decode(maps), args.repeat)
    nms_ms = per_photo_ms(lambda: decode_probabilities(probs), args.repeat) - merge_ms
    print("| stage | ms per photo (one thread) |\n|---|---|")
    for name, ms in (("softmax", softmax_ms), ("cross-scale merge", merge_ms), ("candidates + NMS", nms_ms),
                     ("whole decode", total_ms)):
        print(f"| {name} | {ms:.1f} |")
    print("\n| decoding threads | photos/s |\n|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        jobs = max(args.repeat, 4 * threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: decode(maps), range(threads)))
            started = time.perf_counter()
            list(pool.map(lambda _: decode(maps), range(jobs)))
            seconds = time.perf_counter() - started
        print(f"| {threads} | {jobs / seconds:.0f} |")


if __name__ == "__main__":
    main()
