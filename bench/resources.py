"""CPU seconds and peak memory to anonymise a 1, 12 and 50 megapixel photo.

Each size runs in a fresh process so that its peak resident memory is its own. The photo is
scikit-image's public-domain astronaut, tiled to the target size and JPEG-encoded, so the
detectors find real faces at realistic density.

    python bench/resources.py [--sizes 1,12,50] [--locators centerface,heads]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photo(megapixels: float) -> bytes:
    """A JPEG of about ``megapixels`` MP (4:3) made of astronaut tiles."""
    import numpy as np
    from PIL import Image
    from skimage import data

    tile = data.astronaut()
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    reps = (height // tile.shape[0] + 1, width // tile.shape[1] + 1, 1)
    image = np.tile(tile, reps)[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def child(megapixels: float, locators: str | None) -> None:
    """Runs in the subprocess: one warm-up on a small image, then the measured photo."""
    from anonymiser.pipeline import Anonymiser, Settings

    photo = make_photo(megapixels)
    settings = Settings(locators=tuple(locators.split(",")) if locators else None)
    anonymiser = Anonymiser(settings)
    anonymiser.anonymise(make_photo(0.3))
    cpu, wall = time.process_time(), time.perf_counter()
    result = anonymiser.anonymise(photo)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "megapixels": megapixels,
        "size": result.report.input_size,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb),
        "heads": result.report.heads_covered,
        "locators": result.report.locators,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,12,50")
    parser.add_argument("--locators", default=None)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.locators)
        return
    print(f"CPU: {os.cpu_count()} cores")
    print("| photo | pixels | CPU s | wall s | peak RSS (MB) | heads covered | locators |")
    print("|---|---|---|---|---|---|---|")
    for size in (float(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(size)]
        if args.locators:
            cmd += ["--locators", args.locators]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
        row = json.loads(out.stdout.strip().splitlines()[-1])
        w, h = row["size"]
        print(f"| {size:g} MP | {w}x{h} | {row['cpu_s']} | {row['wall_s']} | {row['peak_rss_mb']} | {row['heads']} | {', '.join(row['locators'])} |")


if __name__ == "__main__":
    main()
