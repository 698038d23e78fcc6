"""CPU workers: photos per second with 1..N worker processes on this machine, default locators.

Each process is what one Celery prefork child does with a photo: load the anonymiser once
(CenterFace + the head model when its weights are present, as in the bot), then decode, locate,
cover, encode. ONNX Runtime gets one thread per process (``ANON_ONNX_THREADS=1``), so one
process is one core's worth of work. The processes pull from one shared list of 1 MP JPEG photos
(the public-domain astronaut tiled to size); the clock runs from the moment every process has
loaded its models until the last photo is done.

    ANON_WEIGHTS_DIR=../shared/models/heads python bench/cpu_scaling.py [--processes 1,2,3] [--photos 12]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photo(megapixels: float, seed: int) -> bytes:
    import numpy as np
    from PIL import Image
    from skimage import data

    side_w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    side_h = int(side_w * 3 / 4)
    base = data.astronaut()
    big = np.tile(base, (side_h // 512 + 2, side_w // 512 + 2, 1))
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, 512, 2)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(big[y : y + side_h, x : x + side_w])).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def child(photos: list[bytes], queue: "mp.Queue[int | None]", ready: "mp.Barrier", results: "mp.Queue[tuple]") -> None:
    from anonymiser.limits import Limits
    from anonymiser.pipeline import Anonymiser, Settings

    anonymiser = Anonymiser(Settings(limits=Limits.from_env()))
    anonymiser.anonymise(photos[0])  # warm-up (first-run allocations)
    ready.wait()
    cpu0 = time.process_time()
    done = 0
    names = ",".join(l.name for l in anonymiser.locators)
    while True:
        index = queue.get()
        if index is None:
            break
        anonymiser.anonymise(photos[index])
        done += 1
    results.put((done, time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, names))


def measure(processes: int, photos: list[bytes]) -> dict:
    ctx = mp.get_context("fork")
    queue: "mp.Queue[int | None]" = ctx.Queue()
    results: "mp.Queue[tuple]" = ctx.Queue()
    ready = ctx.Barrier(processes + 1)
    workers = [ctx.Process(target=child, args=(photos, queue, ready, results)) for _ in range(processes)]
    for w in workers:
        w.start()
    ready.wait()  # every process has its models loaded
    start = time.perf_counter()
    for index in range(len(photos)):
        queue.put(index)
    for _ in workers:
        queue.put(None)
    rows = [results.get() for _ in workers]
    wall = time.perf_counter() - start
    for w in workers:
        w.join()
    return {
        "processes": processes,
        "wall": wall,
        "rate": len(photos) / wall,
        "cpu_per_photo": sum(r[1] for r in rows) / len(photos),
        "rss_mb": max(r[2] for r in rows),
        "locators": rows[0][3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--processes", default=",".join(str(n) for n in range(1, cores + 2)))
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--megapixels", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("ANON_ONNX_THREADS", "1")
    if "ANON_WEIGHTS_DIR" not in os.environ and (ROOT.parent / "shared" / "models" / "heads").is_dir():
        os.environ["ANON_WEIGHTS_DIR"] = str(ROOT.parent / "shared" / "models" / "heads")
    photos = [make_photo(args.megapixels, seed) for seed in range(args.photos)]
    print(f"{cores} cores; {args.photos} photos of {args.megapixels:g} MP; ONNX threads per process: "
          f"{os.environ['ANON_ONNX_THREADS']}; load average before: {os.getloadavg()[0]:.2f}")
    rows = [measure(int(n), photos) for n in args.processes.split(",")]
    print(f"locators: {rows[0]['locators']}")
    print("| worker processes | photos/s | speed-up vs 1 | photos/s per busy core | CPU s per photo | peak RSS per process (MB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        busy = min(row["processes"], cores)
        print(f"| {row['processes']} | {row['rate']:.3f} | {row['rate'] / rows[0]['rate']:.2f} | "
              f"{row['rate'] / busy:.3f} | {row['cpu_per_photo']:.2f} | {row['rss_mb']:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
