"""LSC-CNN crowd head locator (spec /work/shared/lsccnn-spec.md, whole-image path of §2.3 + §3).

Pre-processing follows the blm/vlad3996 reference: RGB floats 0-255, each side floor-resized to a
multiple of 16 with OpenCV ``INTER_LINEAR``; boxes are mapped back to the original image.

Memory: activations grow with the pixel count (about 2 GB per megapixel in fp32 on CPU), so a
network input larger than ``max_tile_pixels`` is cut into tiles whose sides are multiples of 16.
Tile *cores* partition the image; each tile extends its core by ``tile_margin`` pixels of context
on every side. The logits of each tile's core are pasted into full-image maps and decoding (and
NMS) runs once on the stitched maps, so a head on a seam is neither lost nor found twice; only the
logits near seams can differ slightly from a whole-image pass, because the network sees less
context there.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .base import BoxKind, Detections
from .lsccnn_checkpoint import OFFICIAL_FILENAME, OFFICIAL_MD5, OFFICIAL_SIZE, load_model
from .lsccnn_decode import DEFAULT_NMS_THRESHOLD, MAX_BOX_PIXELS, OUTPUT_STRIDES, GridDetections, decode
from .lsccnn_net import INPUT_MULTIPLE

#: Default bound on the pixels fed to the network at once (~2 GB of fp32 activations on CPU).
DEFAULT_MAX_TILE_PIXELS = 1_000_000

#: Context added around each tile core. At least 96 px (and at least the largest head box, 48 px)
#: so that every core pixel sees a good part of its receptive field.
DEFAULT_TILE_MARGIN = 128
MIN_TILE_MARGIN = max(96, MAX_BOX_PIXELS)

Logits = list[np.ndarray]  # four float32 maps, 4 x h_s x w_s, O0..O3


def available(weights_dir: str | Path) -> bool:
    """Whether the official checkpoint file is present in ``weights_dir`` (not yet verified)."""
    return (Path(weights_dir) / OFFICIAL_FILENAME).is_file()


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 RGB array, got {getattr(rgb, 'shape', type(rgb))}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("empty image")


def network_size(height: int, width: int) -> tuple[int, int]:
    """Sides floored to multiples of 16 (spec §2.3 step 4); sides under 16 become 16."""
    return (max(INPUT_MULTIPLE, height // INPUT_MULTIPLE * INPUT_MULTIPLE),
            max(INPUT_MULTIPLE, width // INPUT_MULTIPLE * INPUT_MULTIPLE))


def prepare_input(rgb: np.ndarray) -> np.ndarray:
    """The network-input image: ``rgb`` resized (only if needed) to :func:`network_size`."""
    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    nh, nw = network_size(h, w)
    if (nh, nw) == (h, w):
        return rgb
    # OpenCV rejects views with negative strides (e.g. a BGR->RGB flip done with [..., ::-1]).
    return cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_LINEAR)


def to_original(grid: GridDetections, net_hw: tuple[int, int], orig_hw: tuple[int, int]) -> Detections:
    """Detections in pixels of the original image, clipped to it (spec §3.7)."""
    boxes = grid.pixel_boxes().astype(np.float64)
    sy, sx = orig_hw[0] / net_hw[0], orig_hw[1] / net_hw[1]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * sx, 0, orig_hw[1])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * sy, 0, orig_hw[0])
    return Detections(boxes.astype(np.float32), grid.score)


def _to_tensor(images: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x 3 x H x W`` float32 0-255 (no scaling) on ``device``.

    The bytes travel as uint8 (4x less to copy to a GPU) and are widened there.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).to(torch.float32)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@contextmanager
def float32_math(tf32: bool = False) -> Iterator[None]:
    """Within the block, float32 convolutions and matrix products on CUDA use TF32 or not.

    cuDNN's default lets float32 convolutions run on TF32 tensor cores (Ampere and later), which
    read only 10 mantissa bits, as fp16 does: left alone, "float32" on an H200 would neither be
    the spec's float32 reference nor agree with it as float32 does on a CPU. So every LSC-CNN
    forward pass states its choice, and the previous settings come back afterwards (the reference
    and a TF32 engine can share a process). No effect on CPUs, which have no TF32.

    The flags are process-wide: callers run their forward passes one at a time (the engine holds
    its device lock). The legacy ``allow_tf32`` switches are used because mixing them with the
    newer ``fp32_precision`` ones makes PyTorch refuse to read either.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def reference_logits(model: nn.Module, rgb: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The network part of :func:`reference_detect`: the resized photo and its four logit maps
    on the host (benchmarks time it apart from the CPU decoding)."""
    net_rgb = prepare_input(rgb)
    x = _to_tensor(net_rgb[None], _model_device(model))
    with torch.inference_mode(), torch.autocast(x.device.type, enabled=False), float32_math(tf32=False):
        outputs = model(x)
    return net_rgb, [o[0].float().cpu().numpy() for o in outputs]


def reference_detect(
    model: nn.Module,
    rgb: np.ndarray,
    nms_threshold: float = DEFAULT_NMS_THRESHOLD,
    *,
    original_coordinates: bool = True,
) -> Detections:
    """The spec's reference whole-image path: one fp32 pass, batch 1, no tiling (for comparisons).

    Floor-resize to multiples of 16 (INTER_LINEAR), RGB 0-255 float32, forward on the model's
    device with autocast and TF32 off (:func:`float32_math`), softmax, decoding and NMS. Boxes are
    in original-image pixels (clipped), or in network-input pixels, unclipped, with
    ``original_coordinates=False`` (what blm returns). The model must hold float32 weights.
    """
    net_rgb, logits = reference_logits(model, rgb)
    grid = decode(logits, nms_threshold)
    if not original_coordinates:
        return Detections(grid.pixel_boxes(), grid.score)
    return to_original(grid, net_rgb.shape[:2], rgb.shape[:2])


@dataclass(frozen=True)
class Tile:
    """A window ``[y0:y1, x0:x1]`` fed to the network; its core ``[cy0:cy1, cx0:cx1]`` is kept."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def _axis_split(length: int, count: int, margin: int) -> list[tuple[int, int, int, int]]:
    """``count`` cores of near-equal size partitioning ``[0, length)`` on the 16 px lattice,
    each as ``(lo, hi, core_lo, core_hi)`` with ``margin`` px of context, clamped to the image."""
    units = length // INPUT_MULTIPLE
    cuts = [k * units // count * INPUT_MULTIPLE for k in range(count + 1)]
    return [(max(0, a - margin), min(length, b + margin), a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def _max_extent(length: int, count: int, margin: int) -> int:
    return max(hi - lo for lo, hi, _, _ in _axis_split(length, count, margin))


def plan_tiles(height: int, width: int, max_tile_pixels: int, margin: int) -> list[Tile]:
    """Fewest tiles (then least total area) covering a ``height x width`` input within the bound.

    Both sides must be multiples of 16 and ``margin`` a multiple of 16, so every tile and core edge
    falls on a cell boundary of all four outputs. Raises ValueError if no plan fits.
    """
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or margin % INPUT_MULTIPLE:
        raise ValueError("tile planning needs sides and margin that are multiples of 16")
    if height * width <= max_tile_pixels:
        return [Tile(0, height, 0, width, 0, height, 0, width)]
    ext_y = np.array([_max_extent(height, n, margin) for n in range(1, height // INPUT_MULTIPLE + 1)])
    ext_x = np.array([_max_extent(width, n, margin) for n in range(1, width // INPUT_MULTIPLE + 1)])
    best: tuple[int, int, int, int] | None = None  # (tiles, area, ny, nx)
    for ny, ey in enumerate(ext_y, start=1):
        fits = np.nonzero(ey * ext_x <= max_tile_pixels)[0]
        if len(fits) == 0:
            continue
        nx = int(fits[0]) + 1
        candidate = (ny * nx, int(ey * ext_x[nx - 1]), ny, nx)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise ValueError(f"no tiling of {width}x{height} fits {max_tile_pixels} pixels with margin {margin}")
    _, _, ny, nx = best
    return [
        Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
        for y0, y1, cy0, cy1 in _axis_split(height, ny, margin)
        for x0, x1, cx0, cx1 in _axis_split(width, nx, margin)
    ]


class LSCCNNLocator:
    """Head boxes from LSC-CNN (``scale_4``, UCF-QNRF weights), implementing ``HeadLocator``.

    ``device="auto"`` picks CUDA when available. ``half=True`` runs the network under float16
    autocast on CUDA (ignored on CPU, where fp16 convolutions are slow); ``autocast_dtype``
    overrides that choice explicitly (e.g. ``torch.bfloat16`` on a CPU with native bf16).
    Decoding always happens in float32 numpy.
    """

    name: str = "lsccnn"
    kind: BoxKind = "head"

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        weights_dir: str | Path | None = None,
        device: str = "auto",
        half: bool = False,
        autocast_dtype: torch.dtype | None = None,
        nms_threshold: float = DEFAULT_NMS_THRESHOLD,
        max_tile_pixels: int = DEFAULT_MAX_TILE_PIXELS,
        tile_margin: int = DEFAULT_TILE_MARGIN,
        expected_size: int | None = OFFICIAL_SIZE,
        expected_md5: str | None = OFFICIAL_MD5,
        trust_unverified: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        """Load and verify the weights (see ``lsccnn_checkpoint``), or wrap an existing ``model``.

        ``weights_path`` defaults to ``<weights_dir>/scale_4_epoch_46.pth``; ``weights_dir``
        defaults to the project's ``weights/`` folder (``ANON_WEIGHTS_DIR`` if set).
        """
        if not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
        if tile_margin < MIN_TILE_MARGIN or tile_margin % INPUT_MULTIPLE:
            raise ValueError(f"tile_margin must be a multiple of 16 and >= {MIN_TILE_MARGIN}, got {tile_margin}")
        smallest = (2 * tile_margin + INPUT_MULTIPLE) ** 2
        if max_tile_pixels < smallest:
            raise ValueError(f"max_tile_pixels must be >= {smallest} for tile_margin {tile_margin}")
        self.nms_threshold = nms_threshold
        self.max_tile_pixels = max_tile_pixels
        self.tile_margin = tile_margin
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if autocast_dtype is None and half and self.device.type == "cuda":
            autocast_dtype = torch.float16
        self.autocast_dtype = autocast_dtype
        # NHWC lets cuDNN use tensor-core kernels; on CPU the default layout keeps results
        # bit-identical to reference_detect.
        self._channels_last = self.device.type == "cuda"

        if model is None:
            if weights_path is None:
                if weights_dir is None:
                    from .registry import default_weights_dir

                    weights_dir = default_weights_dir()
                weights_path = Path(weights_dir) / OFFICIAL_FILENAME
            model = load_model(
                weights_path, expected_size=expected_size, expected_md5=expected_md5, trust_unverified=trust_unverified
            )
        model = model.eval().requires_grad_(False).to(self.device)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    @classmethod
    def from_weights_dir(cls, weights_dir: str | Path, **kwargs: object) -> "LSCCNNLocator":
        """The locator with the official checkpoint from ``weights_dir``."""
        return cls(Path(weights_dir) / OFFICIAL_FILENAME, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: object) -> "LSCCNNLocator":
        """Wrap an already-built network (tests, benchmarks); no file is read."""
        return cls(model=model, **kwargs)  # type: ignore[arg-type]

    def _forward(self, images: np.ndarray) -> list[np.ndarray]:
        """Logits of an ``N x H x W x 3`` uint8 batch, as four float32 ``N x 4 x h x w`` arrays."""
        x = _to_tensor(images, self.device, self._channels_last)
        use_amp = self.autocast_dtype is not None
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=use_amp
        ), float32_math(tf32=False):
            outputs = self.model(x)
        if use_amp and not all(bool(torch.isfinite(o).all()) for o in outputs):
            # A half-precision overflow (fp16 tops out at 65504): the batch again in float32, as
            # the batched engine does, rather than decoding it as "no heads".
            with torch.inference_mode(), float32_math(tf32=False):
                outputs = self.model(x)
        # Half-precision logits are widened before the softmax so decoding is the same code path.
        return [o.float().cpu().numpy() for o in outputs]

    def _stitched_logits(self, net_rgb: np.ndarray) -> Logits:
        """Whole-image logits, computed tile by tile when the image exceeds ``max_tile_pixels``."""
        h, w = net_rgb.shape[:2]
        tiles = plan_tiles(h, w, self.max_tile_pixels, self.tile_margin)
        if len(tiles) == 1:
            return [o[0] for o in self._forward(net_rgb[None])]
        full = [np.empty((4, h // d, w // d), np.float32) for d in OUTPUT_STRIDES]
        for t in tiles:
            outputs = self._forward(net_rgb[None, t.y0 : t.y1, t.x0 : t.x1])
            for out, dst, d in zip(outputs, full, OUTPUT_STRIDES):
                core = out[0, :, (t.cy0 - t.y0) // d : (t.cy1 - t.y0) // d, (t.cx0 - t.x0) // d : (t.cx1 - t.x0) // d]
                dst[:, t.cy0 // d : t.cy1 // d, t.cx0 // d : t.cx1 // d] = core
        return full

    def _detections(self, logits: Logits, net_hw: tuple[int, int], orig_hw: tuple[int, int]) -> Detections:
        return to_original(decode(logits, self.nms_threshold), net_hw, orig_hw)

    def locate(self, rgb: np.ndarray) -> Detections:
        """Head boxes (squares, clipped to the image) in pixels of ``rgb`` (uint8 H x W x 3)."""
        net_rgb = prepare_input(rgb)
        logits = self._stitched_logits(net_rgb)
        return self._detections(logits, net_rgb.shape[:2], rgb.shape[:2])

    def locate_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """``locate`` for several images, batching those with the same network-input size.

        Images are resized exactly as in :meth:`locate` (no padding, which would change the
        logits near the border), grouped by resulting size and run in batches of at most
        ``max_tile_pixels`` pixels; images above that bound go through the tiled path alone.
        """
        prepared = [prepare_input(rgb) for rgb in images]
        results: list[Detections | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, net_rgb in enumerate(prepared):
            h, w = net_rgb.shape[:2]
            if h * w > self.max_tile_pixels:
                results[k] = self.locate(images[k])
            else:
                groups.setdefault((h, w), []).append(k)
        for (h, w), members in groups.items():
            per_batch = max(1, self.max_tile_pixels // (h * w))
            for start in range(0, len(members), per_batch):
                chunk = members[start : start + per_batch]
                outputs = self._forward(np.stack([prepared[k] for k in chunk]))
                for row, k in enumerate(chunk):
                    logits = [o[row] for o in outputs]
                    results[k] = self._detections(logits, (h, w), images[k].shape[:2])
        return [r if r is not None else Detections() for r in results]
