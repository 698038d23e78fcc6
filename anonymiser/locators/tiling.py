"""Windows over an image, so detectors see bounded inputs whatever the photo's size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from .base import Detections
from .nms import nms_union


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap``.

    The last tile is flush with the end, so every pixel is inside a tile and tiles are evenly
    spread rather than leaving a thin sliver at the edge.
    """
    if length <= tile:
        return [0]
    if overlap >= tile:
        raise ValueError("overlap must be smaller than the tile")
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [round(i * step) for i in range(count)]


#: a tile's window in source pixels: ``(x0, y0, x1, y1)``, end exclusive
Window = tuple[int, int, int, int]


def tile_windows(
    width: int, height: int, tile_w: int, tile_h: int, overlap: int, overlap_y: int | None = None
) -> list[Window]:
    """``(x0, y0, x1, y1)`` windows (clipped to the image) that cover it with ``overlap``
    (``overlap_y`` between rows when given)."""
    return [
        (x, y, min(x + tile_w, width), min(y + tile_h, height))
        for y in tile_origins(height, tile_h, overlap if overlap_y is None else overlap_y)
        for x in tile_origins(width, tile_w, overlap)
    ]


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def balanced_tile(width: int, height: int, overlap: int, max_pixels: int, align: int = 32) -> tuple[int, int]:
    """The tile size ``(tile_w, tile_h)`` whose tiles (as ``tile_windows`` lays them out, with
    ``overlap``) cover a ``width x height`` image with the least network input, each tile at
    most ``max_pixels`` once padded to multiples of ``align``; then the fewest tiles.

    Fixed square tiles waste work on ordinary photos: 1024x1024 tiles with 256 px of overlap
    cover 1920x1088 with six tiles, 6.3 MP of network input for a 2.1 MP photo (the last row
    and column sit flush with the edge, overlapping the others by 960 and 576 px); three
    832x1088 tiles cover it with 2.7 MP under the same bound. Sides of split axes are multiples
    of ``align``, so every tile pads to the same shape and a photo's tiles batch together.
    """
    if max_pixels < 1 or overlap < 0 or align < 1:
        raise ValueError("max_pixels and align must be positive and overlap not negative")

    def side(length: int, count: int) -> int:
        return length if count == 1 else min(length, _align_up(-(-(length + (count - 1) * overlap) // count), align))

    best: tuple[int, int, int, int] | None = None  # (padded area, tiles, tile_w, tile_h)
    for nx in range(1, max(1, -(-width // align)) + 1):
        tile_w = side(width, nx)
        if nx > 1 and tile_w <= overlap:
            break
        # The tallest aligned tile that fits the bound at this width, and how many rows it takes.
        tallest = max_pixels // _align_up(tile_w, align) // align * align
        if height <= tallest:
            ny = 1
        elif tallest <= overlap:
            continue
        else:
            ny = -(-(height - overlap) // (tallest - overlap))
        tile_h = side(height, ny)
        candidate = (nx * ny * _align_up(tile_w, align) * _align_up(tile_h, align), nx * ny, tile_w, tile_h)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        raise ValueError(f"no tiling of {width}x{height} fits {max_pixels} pixels with overlap {overlap}")
    return best[2], best[3]


#: how tiles are upscaled on the host: bilinear, rounded half up, bit for bit what a graph's
#: Resize (linear, half-pixel) and Floor(x + 0.5) compute (``onnx_models.take_uint8_hwc``), so a
#: GPU worker that upscales on the device feeds the networks exactly a CPU worker's pixels.
#: OpenCV's plain INTER_LINEAR rounds in fixed point and is 1 off in about a third of the pixels.
UPSCALE_INTERPOLATION = cv2.INTER_LINEAR_EXACT
#: factors a graph may upscale by: their bilinear weights (quarters, eighths, sixteenths) are
#: exact in float32 and in OpenCV's fixed point, so both sides agree bit for bit (3x does not)
GRAPH_UPSCALES = (2, 4, 8)


@dataclass(frozen=True)
class Tile:
    """One window of a photo, resized to the detector's scale, and how to map boxes back.

    With ``upscale`` > 1 the window is still at the photo's scale: the network graph applies that
    integer factor itself (:func:`tiles` with ``defer_upscale``), and :meth:`scaled` is the
    host's equal of it.
    """

    image: np.ndarray
    x0: int
    y0: int
    sx: float
    sy: float
    upscale: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` at the detector's scale."""
        h, w = self.image.shape[:2]
        return h * self.upscale, w * self.upscale

    def scaled(self) -> np.ndarray:
        """The tile at the detector's scale (upscaled on the host where it was deferred)."""
        if self.upscale == 1:
            return self.image
        h, w = self.shape
        return cv2.resize(self.image, (w, h), interpolation=UPSCALE_INTERPOLATION)

    def to_source(self, found: Detections) -> Detections:
        """Boxes found in the scaled tile as pixels of the photo the tile was cut from."""
        if not len(found):
            return found
        sx, sy = self.sx, self.sy
        return Detections(found.boxes / [sx, sy, sx, sy] + [self.x0, self.y0, self.x0, self.y0], found.scores)


def tiles(rgb: np.ndarray, factor: float, tile_w: int, tile_h: int, overlap: int,
          defer_upscale: bool = False,
          select: Callable[[list[Window]], list[Window]] | None = None,
          ) -> Iterator[Tile]:
    """The tiles of ``rgb`` scaled by ``factor``, one at a time.

    Tiles are cut from the source image and resized individually, so a 2x pass over a 50 MP
    photo never holds a 200 MP copy in memory. ``tile_w``, ``tile_h`` and ``overlap`` are in
    scaled (network) pixels. With ``defer_upscale`` an integer ``factor`` above 1 is left to
    the network graph (``Tile.upscale``) when it is one of :data:`GRAPH_UPSCALES`: on a GPU the
    host then neither resizes nor copies 4x the pixels to the device; resizing was most of the
    ONNX locators' host work. ``select`` picks which of the ``(x0, y0, x1, y1)`` source windows
    to cut (before any is resized, so a pass over part of a photo costs only that part).
    """
    h, w = rgb.shape[:2]
    src_tw, src_th = _source_side(w, tile_w, factor), _source_side(h, tile_h, factor)
    # Rounded up, so that the overlap in network pixels is never short of ``overlap``.
    src_overlap = math.ceil(overlap / factor)
    windows = tile_windows(w, h, src_tw, src_th, min(src_overlap, src_tw - 1), min(src_overlap, src_th - 1))
    if select is not None:
        windows = select(windows)
    deferred = defer_upscale and factor in GRAPH_UPSCALES
    for x0, y0, x1, y1 in windows:
        crop = rgb[y0:y1, x0:x1]
        if deferred:
            yield Tile(np.ascontiguousarray(crop), x0, y0, float(factor), float(factor), int(factor))
            continue
        if factor != 1.0:
            size = (max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor)))
            crop = cv2.resize(crop, size, interpolation=UPSCALE_INTERPOLATION if factor > 1 else cv2.INTER_AREA)
            sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
        else:
            sx = sy = 1.0
        yield Tile(np.ascontiguousarray(crop), x0, y0, sx, sy)


def _source_side(length: int, tile: int, factor: float) -> int:
    """A tile side of ``tile`` network pixels in source pixels: the whole axis when one tile
    spans it, else rounded down, so that a resized tile never outgrows ``tile`` (and with it
    the padded shape and memory bound it was planned for)."""
    if tile >= max(1, round(length * factor)):
        return length
    return max(1, math.floor(tile / factor))


def run_tiled(
    rgb: np.ndarray,
    factor: float,
    tile_w: int,
    tile_h: int,
    overlap: int,
    detect: Callable[[np.ndarray], Detections],
) -> Detections:
    """Run ``detect`` over ``rgb`` scaled by ``factor``, one tile at a time; boxes in ``rgb`` pixels."""
    return Detections.concat([t.to_source(detect(t.image)) for t in tiles(rgb, factor, tile_w, tile_h, overlap)])


def planar_float32(rgb: np.ndarray, height: int, width: int, fill: float = 0.0, bgr: bool = False) -> np.ndarray:
    """``rgb`` (``h x w x 3`` uint8, ``h <= height``, ``w <= width``) as a network input
    ``[3, height, width]`` float32: the photo's channels (reversed when ``bgr``) at the top left,
    ``fill`` elsewhere.

    Copied plane by plane: converting the transposed view in one ``astype`` walks memory 3
    bytes apart and took 4.6 ms per 640x480 tile against 0.14 ms, and a 1920x1088 photo feeds
    the two models about 60 tiles (twice over, with the residual pass).
    """
    h, w = rgb.shape[:2]
    blob = np.full((3, height, width), fill, np.float32) if (h, w) != (height, width) else np.empty((3, h, w), np.float32)
    planes = cv2.split(np.ascontiguousarray(rgb))
    for c, plane in enumerate(planes[::-1] if bgr else planes):
        np.copyto(blob[c, :h, :w], plane, casting="unsafe")
    return blob


@dataclass(frozen=True)
class NetInput:
    """A network input as the host hands it over, and what the graph still does to it.

    ``pixels``: float32 planes ``[3, H, W]`` or the bytes ``[h, w, 3]`` (with a leading batch
    axis once batched). For a graph that takes bytes (``onnx_models.take_uint8_hwc``),
    ``upscale`` is the integer factor it applies and ``pad`` the ``(rows, columns)`` of fill it
    then adds at the bottom and right.
    """

    pixels: np.ndarray
    upscale: int = 1
    pad: tuple[int, int] = (0, 0)

    @property
    def group(self) -> tuple[Any, ...]:
        """Inputs with equal groups can share one network call."""
        return (self.pixels.shape, self.upscale, self.pad)


def network_input(rgb: np.ndarray, height: int, width: int, uint8: bool, fill: int = 0, bgr: bool = False,
                  upscale: int = 1) -> NetInput:
    """``rgb`` upscaled by ``upscale`` and padded to ``height x width`` with ``fill``, as the
    network takes it: float planes (:func:`planar_float32`), or with ``uint8`` the bytes,
    ``[height, width, 3]`` RGB, for a graph that converts them itself
    (``onnx_models.take_uint8_hwc``; it also puts the channels in BGR order where the network
    wants that). Without padding the bytes are passed on uncopied. An ``upscale`` above 1 is
    left to that graph, and so is the padding after it: the bytes go as they are."""
    h, w = rgb.shape[:2]
    if upscale > 1:
        if not uint8:
            raise ValueError("only a graph that takes the bytes upscales them")
        pad = (height - h * upscale, width - w * upscale)
        if min(pad) < 0:
            raise ValueError(f"{w}x{h} upscaled {upscale}x does not fit {width}x{height}")
        return NetInput(np.ascontiguousarray(rgb), upscale, pad)
    if not uint8:
        return NetInput(planar_float32(rgb, height, width, float(fill), bgr))
    if (h, w) == (height, width):
        return NetInput(np.ascontiguousarray(rgb))
    padded = np.full((height, width, 3), fill, np.uint8)
    padded[:h, :w] = rgb
    return NetInput(padded)


#: a network input and what turns its raw output into boxes in photo pixels
Job = tuple[NetInput, Callable[[Any], Detections]]


def run_batched(jobs: Iterable[Job], infer: Callable[[NetInput], Sequence[Any]], batch: int) -> Detections:
    """Run network inputs through ``infer`` in batches of up to ``batch`` inputs of equal shape.

    ``infer`` takes the inputs stacked (``NetInput.pixels`` ``[B, C, H, W]`` float planes or
    ``[B, h, w, 3]`` bytes, :func:`network_input`) and returns one raw output per input. Inputs
    are grouped by exact shape and what the graph still does to them, never padded to each
    other, so every input gives the network exactly what it would get alone (the batch changes
    throughput, not detections). Jobs are consumed lazily and a group runs as soon as it is
    full, so at most ``batch`` inputs per group are held at once.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    pending: dict[tuple[Any, ...], list[Job]] = {}
    parts: list[Detections] = []

    def flush(key: tuple[Any, ...]) -> None:
        group = pending.pop(key)
        first = group[0][0]
        # A lone input needs no copy into a batch (one tile at a time is the CPU default).
        pixels = first.pixels[None] if len(group) == 1 else np.stack([net.pixels for net, _ in group])
        outputs = infer(NetInput(pixels, first.upscale, first.pad))
        parts.extend(finish(out) for (_, finish), out in zip(group, outputs, strict=True))

    for net, finish in jobs:
        group = pending.setdefault(net.group, [])
        group.append((net, finish))
        if len(group) >= batch:
            flush(net.group)
    for key in list(pending):
        flush(key)
    return Detections.concat(parts)


def suppress_duplicates(found: Detections, width: int, height: int, iou: float) -> Detections:
    """Drop boxes wholly outside the image and merge duplicates from overlapping tiles and
    scales: each kept box encloses the duplicates it removed (:func:`nms.nms_union`).

    Boxes reaching past the frame are kept whole, not clipped: a face cut by the frame is
    padded from its full predicted size and centre, which covers at least what padding its
    visible part would (padding only grows a box that encloses another), and up to a few
    pixels more of the visible hairline and ears. Covering clips to the image later."""
    if not len(found):
        return found
    boxes = found.boxes
    inside = (boxes[:, 0] < width) & (boxes[:, 2] > 0) & (boxes[:, 1] < height) & (boxes[:, 3] > 0)
    inside &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[inside], found.scores[inside]
    keep, grown = nms_union(boxes, scores, iou)
    return Detections(grown, scores[keep])
