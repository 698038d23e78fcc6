"""Coverage of the default locators on the shared dev set (../shared/evaldata/dev).

Prints recall per density band, false positives per image and CPU/wall seconds per megapixel,
as defined in that folder's README: a head counts as covered only if its point lies inside a
region the output really covers (the regions the anonymiser reports, in output pixels).

    python bench/coverage.py [--locators centerface,heads] [--no-safeguard] [--no-residual]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anonymiser.decode import decode  # noqa: E402
from anonymiser.pipeline import Anonymiser, Settings  # noqa: E402
from anonymiser.report import Report  # noqa: E402

DEV = Path(os.environ.get("ANON_EVAL_DIR", Path(__file__).resolve().parents[2] / "shared" / "evaldata" / "dev"))
HEADS_DIR = Path(os.environ.get("ANON_WEIGHTS_DIR", Path(__file__).resolve().parents[2] / "shared" / "models" / "heads"))
BANDS = ("sparse", "medium", "dense")


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``[P, B]``: point p lies inside integer region b (``[x1, x2) x [y1, y2)``)."""
    if len(points) == 0 or len(boxes) == 0:
        return np.zeros((len(points), len(boxes)), bool)
    x, y = points[:, None, 0], points[:, None, 1]
    return (x >= boxes[None, :, 0]) & (x < boxes[None, :, 2]) & (y >= boxes[None, :, 1]) & (y < boxes[None, :, 3])


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), bool)
    return (
        (np.minimum(a[:, None, 2], b[None, :, 2]) > np.maximum(a[:, None, 0], b[None, :, 0]))
        & (np.minimum(a[:, None, 3], b[None, :, 3]) > np.maximum(a[:, None, 1], b[None, :, 1]))
    )


def score_image(gt: dict, report: Report) -> dict:
    """Covered heads, false-positive regions and lost area for one image."""
    scale = report.output_size[0] / gt["width"]
    points = np.asarray(gt["heads"], np.float64).reshape(-1, 2) * scale
    boxes = np.asarray([r.box for r in report.regions], np.float64).reshape(-1, 4)
    head_regions = np.array([r.sources != ["safeguard"] for r in report.regions], bool)
    hits = _inside(points, boxes)
    covered = int(hits.any(axis=1).sum())
    empty = ~hits.any(axis=0)
    if gt.get("gt_type") == "face_boxes":
        known = np.asarray(list(gt.get("boxes", [])) + list(gt.get("ignore_boxes", [])), np.float64).reshape(-1, 4) * scale
        empty &= ~_overlaps(boxes, known).any(axis=1)
    return {
        "heads": len(points),
        "covered": covered,
        "fp": int((empty & head_regions).sum()),
        "fp_safeguard": int((empty & ~head_regions).sum()),
        "lost": report.covered_fraction,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locators", default=None, help="comma-separated; default: every available one")
    parser.add_argument("--no-safeguard", action="store_true")
    parser.add_argument("--no-residual", action="store_true")
    parser.add_argument("--gap-factor", type=float, default=Settings().gap_factor)
    parser.add_argument("--only", default=None, help="substring filter on image names")
    parser.add_argument("--json", type=Path, default=None, help="write per-image figures here")
    parser.add_argument("--grey", action="store_true", help="turn each photo into greyscale first (black-and-white photos)")
    args = parser.parse_args()
    if not DEV.is_dir():
        sys.exit(f"dev set not found at {DEV} (set ANON_EVAL_DIR)")

    settings = Settings(
        locators=tuple(args.locators.split(",")) if args.locators else None,
        safeguard=not args.no_safeguard,
        residual_pass=not args.no_residual,
        gap_factor=args.gap_factor,
    )
    anonymiser = Anonymiser(settings, weights_dir=HEADS_DIR)
    warm = np.zeros((480, 640, 3), np.uint8)
    anonymiser.anonymise_array(warm, Report("jpeg", (640, 480), 0, 1, False))

    rows = []
    for path in sorted(DEV.glob("*.jpg")):
        if args.only and args.only not in path.name:
            continue
        gt = json.loads(path.with_suffix(".json").read_text())
        rgb = decode(path.read_bytes()).rgb
        if args.grey:  # what a black-and-white JPEG decodes to: three equal channels
            rgb = np.ascontiguousarray(np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2))
        report = Report("jpeg", (gt["width"], gt["height"]), 0, 1, False)
        cpu, wall = time.process_time(), time.perf_counter()
        anonymiser.anonymise_array(rgb, report)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        row = score_image(gt, report) | {
            "image": path.name,
            "band": gt["density_band"],
            "mp": gt["width"] * gt["height"] / 1e6,
            "cpu_s": cpu,
            "wall_s": wall,
        }
        rows.append(row)
        print(f"{path.name:32s} {row['band']:6s} {row['covered']:5d}/{row['heads']:<5d} fp {row['fp']:4d} "
              f"(+{row['fp_safeguard']} safeguard) lost {row['lost']:.2f} cpu {cpu:6.1f}s", file=sys.stderr)

    print(f"\n{'greyscale photos; ' if args.grey else ''}locators: {', '.join(anonymiser.locators[i].name for i in range(len(anonymiser.locators)))}; "
          f"safeguard: {settings.safeguard} (gap {settings.gap_factor}); residual: {settings.residual_pass}")
    print("| band | images | heads | recall | FP/image (heads) | FP/image (safeguard) | area covered | CPU s/MP | wall s/MP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for band in BANDS + ("all",):
        sel = [r for r in rows if band == "all" or r["band"] == band]
        if not sel:
            continue
        heads = sum(r["heads"] for r in sel)
        mp = sum(r["mp"] for r in sel)
        print(f"| {band} | {len(sel)} | {heads} | {sum(r['covered'] for r in sel) / heads:.3f} | "
              f"{np.mean([r['fp'] for r in sel]):.1f} | {np.mean([r['fp_safeguard'] for r in sel]):.1f} | "
              f"{np.mean([r['lost'] for r in sel]):.2f} | {sum(r['cpu_s'] for r in sel) / mp:.2f} | "
              f"{sum(r['wall_s'] for r in sel) / mp:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
