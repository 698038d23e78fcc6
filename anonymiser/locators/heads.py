"""Head detector: YOLOv9-N "Wholebody25", class 7 ("Head", every yaw direction).

It finds heads seen from behind and from above, which no face detector does. The model file is
GPL-3.0 data that operators download into ``weights/`` (see ``weights/README.md``); the project
never ships it. The graph takes a BGR float image and resizes internally to a fixed 480x640, so
every input is prepared as exactly 640x480 (letterboxed with grey 114) to make that resize an
identity, and large photos are tiled: at native size, at 2x for small far heads, and once as a
whole (shrunk) so that heads larger than a tile are seen too. Every input is the same 640x480,
so all of a photo's tiles batch together (``ANON_ONNX_TILE_BATCH``, 8 on the GPU by default).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import WeightsError
from .base import Detections, is_greyscale
from .onnx_models import OnnxOptions, session
from .tiling import Job, NetInput, Tile, suppress_duplicates, network_input, run_batched, tiles

FILE_NAME = "yolov9_n_wholebody25_post_0100_1x3x480x640.onnx"
SHA256 = "f0592465de0c42a3a2ca6a423c6ae042e889c36bb1b4df28e18c5d4a5a9943af"
SIZE = 2_686_399
HEAD_CLASS = 7
NET_W, NET_H = 640, 480
PAD_VALUE = 114
#: overlap between tiles in network pixels: a head up to this size is whole in some tile
OVERLAP = 160
#: score threshold in black-and-white photos, where the model scores heads lower: on the dev
#: photos turned grey, recall went from 0.953 (at 0.25, with CenterFace at 0.2) to 0.977 (both
#: at 0.15), colour's own level, with colour's false-positive rate
GREY_THRESHOLD = 0.15
#: the graph stores its NMS box limit as an initializer; 20 is far too few for a crowd
MAX_BOXES = 1000


def verify_file(path: Path) -> None:
    """Refuse a file of the wrong size or checksum before ONNX parses it."""
    if not path.is_file():
        raise WeightsError(f"Head model not found at {path}; see weights/README.md.")
    size = path.stat().st_size
    if size != SIZE:
        raise WeightsError(f"{path} is {size:,} bytes, expected {SIZE:,}: wrong or damaged file.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise WeightsError(f"{path} has sha256 {digest}, expected {SHA256}: wrong or tampered file.")


def _load_model(path: Path, score_threshold: float) -> onnx.ModelProto:
    model = onnx.load(str(path))
    replaced = 0
    for init in model.graph.initializer:
        if init.name == "main01_max_output_boxes_per_class":
            init.CopyFrom(numpy_helper.from_array(np.array([MAX_BOXES], np.int64), init.name))
            replaced += 1
        elif init.name == "main01_score_threshold":
            # Our own threshold is applied afterwards; the graph's must not be stricter.
            init.CopyFrom(numpy_helper.from_array(np.array([score_threshold], np.float32), init.name))
            replaced += 1
    if replaced != 2:
        raise WeightsError(f"{path} does not have the expected NMS settings: not the supported model.")
    _free_batch_axis(model, path)
    return model


#: the graph's own resize node (an identity for our exact 640x480 inputs) and the reshapes that
#: spell the batch size as a literal 1
_PREP_RESIZE = "prep/Resize"
_BATCH_RESHAPES = ("/model.22/Reshape", "/model.22/Reshape_1", "/model.22/Reshape_2",
                   "/model.22/dfl/Reshape", "/model.22/dfl/Reshape_1")


def _free_batch_axis(model: onnx.ModelProto, path: Path) -> None:
    """Let the exported batch-1 graph take ``[N, 3, 480, 640]``.

    The export fixes the batch at 1 in two places: the input resize's target size and five
    reshapes of the detection head. The resize is dropped (inputs are always exactly 640x480, so
    it was an identity) and the reshapes copy the batch axis from their input (ONNX's 0) instead
    of the literal 1. The graph's NMS already works per batch item and reports each box's batch
    index, so each tile gets exactly the boxes it would get alone (checked by a test).
    """
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    inits = {init.name: init for init in graph.initializer}
    if _PREP_RESIZE not in nodes or any(name not in nodes for name in _BATCH_RESHAPES):
        raise WeightsError(f"{path} does not have the expected graph: not the supported model.")
    resize = nodes[_PREP_RESIZE]
    resized, source = resize.output[0], resize.input[0]
    graph.node.remove(resize)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == resized:
                node.input[index] = source
    for name in _BATCH_RESHAPES:
        node = nodes[name]
        shape = numpy_helper.to_array(inits[node.input[1]]).copy()
        if shape[0] != 1:
            raise WeightsError(f"{path} does not have the expected graph: not the supported model.")
        shape[0] = 0
        node.input[1] = f"{node.input[1]}_any_batch"
        if node.input[1] not in inits:
            inits[node.input[1]] = numpy_helper.from_array(shape, node.input[1])
            graph.initializer.append(inits[node.input[1]])
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "N"
    dims[2].dim_value, dims[3].dim_value = NET_H, NET_W
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def letterbox(rgb: np.ndarray, uint8: bool = False) -> tuple[NetInput, float]:
    """Resize to fit 640x480 (area when shrinking), keeping the aspect, and pad the right and
    bottom with grey.

    Returns the network input as BGR float32 ``[3, 480, 640]`` (with ``uint8``: the RGB bytes,
    ``[480, 640, 3]``, for the graph to convert) and the factor that maps network pixels back
    to ``rgb`` pixels. The photo is resized before it is padded, so the work
    and memory are those of the photo: padding a 1x100,000 strip to 4:3 first took 37 GB.
    """
    h, w = rgb.shape[:2]
    factor = max(w / NET_W, h / NET_H)
    fit_w, fit_h = min(NET_W, max(1, round(w / factor))), min(NET_H, max(1, round(h / factor)))
    if (fit_w, fit_h) != (w, h):
        rgb = cv2.resize(rgb, (fit_w, fit_h), interpolation=cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR)
    return network_input(rgb, NET_H, NET_W, uint8, fill=PAD_VALUE, bgr=True), factor


class HeadsLocator:
    """Head boxes from the YOLOv9-N head class over tiles at several scales."""

    name = "heads"
    kind = "head"

    def __init__(
        self,
        path: Path,
        scales: tuple[float, ...] = (1.0, 2.0),
        threshold: float = 0.25,
        nms_iou: float = 0.45,
        whole_image_pass: bool = True,
        verify: bool = True,
        onnx_options: OnnxOptions | None = None,
        grey_threshold: float = GREY_THRESHOLD,
    ) -> None:
        if verify:
            verify_file(path)
        self.scales = scales
        self.threshold = threshold
        self.grey_threshold = grey_threshold
        self.nms_iou = nms_iou
        self.whole_image_pass = whole_image_pass
        options = onnx_options or OnnxOptions.from_env()
        # The graph's own score floor is the lower threshold; each photo's is applied afterwards.
        self._session = session(_load_model(path, min(threshold, grey_threshold)), options, bgr=True, fill=PAD_VALUE)
        self.tile_batch = options.batch_for(self._session)
        self._uint8_input = self._session.uint8_input

    def _job(self, tile: Tile, threshold: float) -> Job:
        h, w = tile.shape
        if tile.upscale > 1 and max(w / NET_W, h / NET_H) == 1:
            # Upscaled, it fits without letterboxing's resize (a 2x tile always does): the graph
            # upscales and pads it.
            blob, factor = network_input(tile.image, NET_H, NET_W, True, PAD_VALUE, bgr=True, upscale=tile.upscale), 1.0
        else:
            blob, factor = letterbox(tile.scaled(), self._uint8_input)

        def finish(out: np.ndarray) -> Detections:
            out = out[(out[:, 1] == HEAD_CLASS) & (out[:, 2] >= threshold)]
            return tile.to_source(Detections(out[:, 3:7] * factor, out[:, 2]))

        return blob, finish

    def _infer(self, batch: NetInput) -> list[np.ndarray]:
        (out,) = self._session.run(None, self._session.feeds(batch))
        return [out[out[:, 0] == index] for index in range(len(batch.pixels))]

    def locate(self, rgb: np.ndarray) -> Detections:
        """Head boxes in pixels of ``rgb``."""
        h, w = rgb.shape[:2]
        # Lazily: a 50 MP photo has over a thousand 2x tiles.
        regions: Iterable[Tile] = (t for f in self.scales for t in tiles(rgb, f, NET_W, NET_H, OVERLAP, self._uint8_input))
        if self.whole_image_pass and (w > NET_W or h > NET_H):
            regions = itertools.chain(regions, [Tile(rgb, 0, 0, 1.0, 1.0)])
        threshold = self.grey_threshold if is_greyscale(rgb) else self.threshold
        found = run_batched((self._job(t, threshold) for t in regions), self._infer, self.tile_batch)
        return suppress_duplicates(found, w, h, self.nms_iou)
