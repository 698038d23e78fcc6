"""The CPU work a GPU worker does per photo, with the networks' answers replayed.

A GPU worker runs the networks on the GPU, but everything around them runs on its CPU threads in
one process: decoding the JPEG, the locators' tiling, resizing and decoding of network outputs,
merging regions, the crowd safeguard, painting the fists, the residual pass's bookkeeping and
encoding. If that work holds the GIL, or simply costs more CPU than the machine has, the GPU
waits. This benchmark measures it without a GPU:

- the ONNX locators (CenterFace, the head model) run for real once per photo while their
  sessions record the outputs; every timed run replays those outputs, so only their CPU side
  (tiles, blobs, output decoding, NMS) is timed;
- LSC-CNN is replaced by its real host side (resize to the network size, then the real decoder)
  fed with logits shaped like a trained model's: background everywhere, a confident head at
  each annotated head of the photo, of the box size nearest the head's size;
- photos are the dev photos (``ANON_EVAL_DIR``), resized to ``--size`` and encoded as JPEG, read
  in place and never copied.

Prints one thread's time per stage, then photos per second with 1..N threads in one process
(how far the GIL lets the host side scale), and CPU seconds per photo.

    ANON_EVAL_DIR=../shared/evaldata/dev ANON_WEIGHTS_DIR=../shared/models/heads \\
        python bench/host_path.py [--size 1920x1088] [--threads 1,2] [--photos 39] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anonymiser.decode import decode  # noqa: E402
from anonymiser.locators import lsccnn_decode as lsd  # noqa: E402
from anonymiser.locators.base import Detections  # noqa: E402
from anonymiser.locators.lsccnn import network_size, prepare_input, to_original  # noqa: E402
from anonymiser.pipeline import Anonymiser, Settings  # noqa: E402
from anonymiser.locators.registry import REGISTRY, default_weights_dir  # noqa: E402


class ReplayedSession:
    """Stands in for an ONNX Runtime session: records real outputs, then replays them.

    Keyed by the input's shape and a sparse sample of its values, so the same tile of the same
    photo gets its own outputs back in any order and from any thread.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.recorded: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self.replaying = False
        self.network_s = 0.0

    @staticmethod
    def _key(feeds: dict[str, np.ndarray]) -> tuple[Any, ...]:
        x, *rest = feeds.values()  # the pixels, then the upscale and padding of a graph taking bytes
        flat = x.reshape(-1)
        return (x.shape, flat[:: max(1, flat.size // 4096)].tobytes(), *(r.tobytes() for r in rest))

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = self._key(feeds)
        if self.replaying:
            return self.recorded[key]
        started = time.perf_counter()
        out = self.real.run(names, feeds)
        self.network_s += time.perf_counter() - started
        self.recorded[key] = out
        return out

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def feeds(self, batch: Any) -> dict[str, np.ndarray]:
        return self.real.feeds(batch)


def _annotated_heads(meta: dict[str, Any], sx: float, sy: float) -> tuple[np.ndarray, np.ndarray]:
    """Head centres (x, y) and sides in the resized photo: face boxes where annotated, else the
    distance to the nearest other head (clipped), the usual estimate for head points."""
    from scipy.spatial import cKDTree

    points = np.asarray(meta["heads"], np.float64).reshape(-1, 2) * (sx, sy)
    if meta.get("boxes"):
        boxes = np.asarray(meta["boxes"], np.float64).reshape(-1, 4)
        sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * sx * (boxes[:, 3] - boxes[:, 1]) * sy)
        return (boxes[:, :2] + boxes[:, 2:]) / 2 * (sx, sy), sides
    if len(points) < 2:
        return points, np.full(len(points), 64.0)
    distances, _ = cKDTree(points).query(points, k=2)
    return points, np.clip(distances[:, 1], 8.0, 160.0)


def planted_logits(net_hw: tuple[int, int], centres: np.ndarray, sides: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Logits like a trained model's: noisy background everywhere, one confident cell per head
    at the scale and class whose box side (2 x grid units, network pixels) is nearest."""
    rng = np.random.default_rng(seed)
    h, w = net_hw
    maps = []
    for stride in lsd.OUTPUT_STRIDES:
        z = rng.normal(0.0, 1.0, (4, h // stride, w // stride)).astype(np.float32)
        z[lsd.BACKGROUND] += 8.0
        maps.append(z)
    options = [(s, c, 2 * side) for s, row in enumerate(lsd.BOXES) for c, side in enumerate(row)]
    for (x, y), size in zip(centres, sides):
        s, c, _ = min(options, key=lambda o: abs(o[2] - size))
        stride = lsd.OUTPUT_STRIDES[s]
        _, gh, gw = maps[s].shape
        maps[s][c, min(int(y) // stride, gh - 1), min(int(x) // stride, gw - 1)] += 20.0
    return maps


class ReplayedLSCCNN:
    """LSC-CNN's host side (resize, decode) on planted logits; its GPU side is ``bench/gpu.py``'s."""

    name = "lsccnn"
    kind = "head"

    def __init__(self) -> None:
        self.logits: dict[bytes, list[np.ndarray]] = {}

    @staticmethod
    def key(rgb: np.ndarray) -> bytes:
        flat = rgb.reshape(-1)
        return flat[:: max(1, flat.size // 4096)].tobytes()

    def plant(self, rgb: np.ndarray, centres: np.ndarray, sides: np.ndarray) -> None:
        """Logits for ``rgb`` with a head at each of ``centres`` (photo pixels)."""
        net_hw = network_size(*rgb.shape[:2])
        scale = np.array([net_hw[1] / rgb.shape[1], net_hw[0] / rgb.shape[0]])
        self.logits[self.key(rgb)] = planted_logits(net_hw, centres * scale, sides * scale.mean())

    def locate(self, rgb: np.ndarray) -> Detections:
        net = prepare_input(rgb)
        logits = self.logits[self.key(rgb)]
        return to_original(lsd.decode(logits), net.shape[:2], rgb.shape[:2])


def load_photos(folder: Path, size: tuple[int, int], limit: int) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
    """``(jpeg, centres, sides)`` per dev photo, resized to ``size`` (W, H)."""
    from PIL import Image

    photos = []
    for meta_path in sorted(folder.glob("*.json"))[:limit]:
        meta = json.loads(meta_path.read_text())
        with Image.open(folder / meta["image"]) as im:
            resized = im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        resized.save(buffer, "JPEG", quality=90)
        centres, sides = _annotated_heads(meta, size[0] / meta["width"], size[1] / meta["height"])
        photos.append((buffer.getvalue(), centres, sides))
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1920x1088", help="photo size WxH")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--photos", type=int, default=39)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the photos per thread count")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = Path(os.environ.get("ANON_EVAL_DIR", ROOT.parent / "shared" / "evaldata" / "dev"))
    if not folder.is_dir():
        sys.exit(f"no dev photos in {folder}: set ANON_EVAL_DIR")
    photos = load_photos(folder, size, args.photos)  # type: ignore[arg-type]

    weights = default_weights_dir()
    onnx_names = [n for n in ("centerface", "heads") if REGISTRY[n].available(weights)]
    lsccnn = ReplayedLSCCNN()
    locators: list[Any] = [REGISTRY[n].load(weights) for n in onnx_names] + [lsccnn]
    sessions = []
    for locator in locators[:-1]:
        locator._session = ReplayedSession(locator._session)
        sessions.append(locator._session)
    anonymiser = Anonymiser(Settings(), locators=locators)
    for data, centres, sides in photos:
        lsccnn.plant(decode(data, anonymiser.settings.limits).rgb, centres, sides)

    def one(k: int) -> dict[str, float]:
        return anonymiser.anonymise(photos[k % len(photos)][0]).report.timings_s

    # Recording pass: the real networks, one photo at a time.
    started = time.perf_counter()
    for k in range(len(photos)):
        one(k)
    record_s = time.perf_counter() - started
    for s in sessions:
        s.replaying = True
    heads = sum(len(c) for _, c, _ in photos)
    inputs = "uint8 bytes (the graph makes the planes)" if all(l._uint8_input for l in locators[:-1]) else "float planes built on the host"
    print(f"{len(photos)} dev photos at {size[0]}x{size[1]} ({heads} annotated heads), locators "
          f"{onnx_names + ['lsccnn (host side)']}, ONNX inputs: {inputs} (ANON_ONNX_UINT8_INPUT), {os.cpu_count()} CPUs")
    network_s = sum(s.network_s for s in sessions)
    print(f"recording pass: {record_s / len(photos) * 1000:.0f} ms per photo, of which the ONNX "
          f"networks on this CPU {network_s / len(photos) * 1000:.0f} ms (replayed from here on)")

    timings = [one(k) for k in range(len(photos))]
    stages = sorted({k for t in timings for k in t if k != "total"}, key=lambda k: list(timings[0]).index(k))
    print("\n| stage (one thread, networks replayed) | median ms per photo | mean |\n|---|---|---|")
    for stage in stages + ["total"]:
        values = [t.get(stage, 0.0) * 1000 for t in timings]
        print(f"| {stage} | {statistics.median(values):.1f} | {statistics.fmean(values):.1f} |")
    other = [t["total"] - sum(t.get(s, 0.0) for s in stages) for t in timings]
    print(f"| (merge, safeguard, bookkeeping) | {statistics.median(other) * 1000:.1f} | {statistics.fmean(other) * 1000:.1f} |")

    print("\n| threads in one process | photos/s | speed-up vs 1 | CPU s per photo |\n|---|---|---|---|")
    base = None
    for threads in (int(t) for t in args.threads.split(",")):
        jobs = max(args.rounds * len(photos), 4 * threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(threads)))
            cpu, started = time.process_time(), time.perf_counter()
            list(pool.map(one, range(jobs)))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        rate = jobs / wall
        base = base or rate
        print(f"| {threads} | {rate:.1f} | {rate / base:.2f} | {cpu / jobs:.3f} |")


if __name__ == "__main__":
    main()
