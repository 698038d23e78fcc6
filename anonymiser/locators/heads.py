"""Head detector: YOLOv9-N "Wholebody25", class 7 ("Head", every yaw direction).

It finds heads seen from behind and from above, which no face detector does. The model file is
GPL-3.0 data that operators download into ``weights/`` (see ``weights/README.md``); the project
never ships it. The graph takes a BGR float image and resizes internally to a fixed 480x640, so
every input is prepared as exactly 640x480 (letterboxed with grey 114) to make that resize an
identity, and large photos are tiled: at native size, at 2x for small far heads, and once as a
whole (shrunk) so that heads larger than a tile are seen too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import WeightsError
from .base import Detections
from .onnx_models import session
from .tiling import clip_and_suppress, run_tiled

FILE_NAME = "yolov9_n_wholebody25_post_0100_1x3x480x640.onnx"
SHA256 = "f0592465de0c42a3a2ca6a423c6ae042e889c36bb1b4df28e18c5d4a5a9943af"
SIZE = 2_686_399
HEAD_CLASS = 7
NET_W, NET_H = 640, 480
PAD_VALUE = 114
#: overlap between tiles in network pixels: a head up to this size is whole in some tile
OVERLAP = 160
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
    return model


def letterbox(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Pad to 4:3 with grey at right/bottom, then resize (area) to 640x480.

    Returns the network input as BGR float32 ``[1, 3, 480, 640]`` and the factor that maps
    network pixels back to ``rgb`` pixels.
    """
    h, w = rgb.shape[:2]
    factor = max(w / NET_W, h / NET_H)
    canvas_w, canvas_h = max(w, round(NET_W * factor)), max(h, round(NET_H * factor))
    canvas = np.full((canvas_h, canvas_w, 3), PAD_VALUE, np.uint8)
    canvas[:h, :w] = rgb
    if (canvas_w, canvas_h) != (NET_W, NET_H):
        shrinking = canvas_w > NET_W
        canvas = cv2.resize(
            canvas, (NET_W, NET_H), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )
    bgr = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
    return np.ascontiguousarray(bgr), canvas_w / NET_W


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
    ) -> None:
        if verify:
            verify_file(path)
        self.scales = scales
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.whole_image_pass = whole_image_pass
        self._session = session(_load_model(path, threshold))
        self._input = self._session.get_inputs()[0].name

    def _run(self, rgb: np.ndarray) -> Detections:
        """Heads in one image region (any size, letterboxed to the network)."""
        blob, factor = letterbox(rgb)
        (out,) = self._session.run(None, {self._input: blob})
        out = out[(out[:, 1] == HEAD_CLASS) & (out[:, 2] >= self.threshold)]
        return Detections(out[:, 3:7] * factor, out[:, 2])

    def locate(self, rgb: np.ndarray) -> Detections:
        """Head boxes in pixels of ``rgb``."""
        h, w = rgb.shape[:2]
        parts = [run_tiled(rgb, f, NET_W, NET_H, OVERLAP, self._run) for f in self.scales]
        if self.whole_image_pass and (w > NET_W or h > NET_H):
            parts.append(self._run(rgb))
        return clip_and_suppress(Detections.concat(parts), w, h, self.nms_iou)
