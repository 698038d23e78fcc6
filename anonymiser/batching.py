"""Batched, size-bucketed LSC-CNN inference: the GPU path (and its CPU twin, which the tests run).

The reference path (:func:`anonymiser.locators.lsccnn.reference_detect`) runs one photo at a
time in float32, which leaves a GPU mostly idle. This engine keeps the network busy and gives the
same detections:

* **Same pixels.** Every photo is floor-resized to multiples of 16 exactly like the reference
  (OpenCV ``INTER_LINEAR``); a photo above ``max_tile_pixels`` is cut into tiles exactly like
  :meth:`LSCCNNLocator.locate` (so GPU memory is bounded whatever the photo's size). Each network
  input (a whole photo or a tile) is a *piece*.
* **Buckets and batches.** Pieces are grouped by size: sides rounded up to ``bucket_multiple``
  (a multiple of 16) form the bucket key, and a batch is padded to the largest member (or to the
  bucket size itself when shapes must repeat, for ``torch.compile`` / CUDA graphs). A batch holds
  at most ``max_batch`` pieces and ``max_batch_pixels`` padded pixels.
* **Exact padding.** Padding is masked out of *every* layer: a pre-hook zeroes the first
  convolution's input (the mean-subtracted photo) outside each piece, and a forward hook zeroes
  every (transposed) convolution's output there. Every convolution then sees zeros beyond the
  piece's edge, which is what its own zero padding gives the unpadded reference, and max-pooling
  never mixes the two because piece sides are multiples of 16. So a padded piece's logits equal
  its unpadded logits up to floating-point summation order. Decoding reads only each piece's own
  region of the output maps, so nothing is ever detected in the padding.
* **Arithmetic.** fp16 (default on CUDA; an overflow reruns that piece in float32) or bf16
  autocast, TF32 (float32 tensors, tensor-core convolutions) or IEEE float32 (``fp32``, with TF32
  switched off, since cuDNN would otherwise use it), channels-last activations, cuDNN autotuning on CUDA, optional ``torch.compile``
  (``mode="reduce-overhead"`` adds CUDA graphs). On CUDA batches are padded to their bucket's size
  and batch counts rounded up (1, 2, 3, 4, 6, 8, 12, ...) so that shapes repeat.
* **Checked arithmetic.** Below float32, one photo in ``check_every`` (the first one included)
  also runs in IEEE float32 and is answered with those boxes; when the reduced precision leaves a
  float32 head uncovered, or its identical boxes fall under 99 %, the engine runs in float32 from
  then on (:meth:`LSCCNNEngine.finish`). How well fp16 agrees depends on the checkpoint: the
  checks find out on the photos the worker really gets.
* **Copies.** Pieces travel as uint8 (4x less than float) from pinned host memory with
  ``non_blocking`` copies; logits come back into pinned buffers, followed by a CUDA event, so the
  device thread queues the next batch while CPU threads decode the previous one.
* **CPU threads.** Resizing/tiling and decoding (softmax, cross-scale merge, NMS, in float32
  numpy, the reference's own code) run in a thread pool (:meth:`LSCCNNEngine.detect`) or in the
  callers' threads (:class:`MicroBatcher`), overlapping with the forward pass of other batches.

:class:`MicroBatcher` lets many threads (a Celery worker's thread pool, one task per photo) share
one engine: each thread prepares its photo, submits its pieces, and decodes its own logits; one
device thread turns whatever has arrived within ``max_wait_s`` into batches.

The engine registers hooks on the model it is given: give it a model of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue as queue_module
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import DeviceFailure
from .locators.base import BoxKind, Detections
from .locators.lsccnn import (
    DEFAULT_MAX_TILE_PIXELS,
    DEFAULT_TILE_MARGIN,
    MIN_TILE_MARGIN,
    Tile,
    _check_rgb,
    float32_math,
    plan_tiles,
    prepare_input,
    to_original,
)
from .locators.lsccnn_decode import DEFAULT_NMS_THRESHOLD, OUTPUT_STRIDES, decode
from .locators.lsccnn_net import INPUT_MULTIPLE

log = logging.getLogger(__name__)

#: autocast dtype of each precision name (``None``: float32 storage). "fp32" is IEEE float32, the
#: reference's arithmetic; "tf32" keeps float32 tensors but lets CUDA convolutions round their
#: inputs to TF32's 10 mantissa bits (tensor cores, about half the bf16 rate on an H200).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}

#: defaults on CPU: (max_tile_pixels, max_batch_pixels)
_CPU_LIMITS = (DEFAULT_MAX_TILE_PIXELS, 4_000_000)

#: default ``timeout_s`` on CUDA: far above a batch's fraction of a second, and above a first
#: ``torch.compile`` of a new shape, which runs on the device thread
CUDA_TIMEOUT_S = 300.0

#: how often a waiting caller checks that the device thread still runs
_LIVENESS_CHECK_S = 1.0


def _without_traceback(exc: BaseException) -> BaseException:
    """``exc`` without the frames it holds (also those of its cause and context).

    A failed forward pass's traceback keeps every frame's tensors alive, the activations that ran
    out of memory included (about 100 MB for a batch of four 256x256 inputs), until the exception
    is dropped: recovering from an out-of-memory error, or keeping the error for a caller, must
    not keep them. The type and message, all a caller needs, stay.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
    return exc
#: Activation memory per input pixel at the peak of a forward pass, in bytes: about 2 GB per
#: megapixel in float32 (spec §1.3's measured RSS), half that in fp16/bf16. An estimate: the
#: GPU benchmark prints the real peak for each batch size.
_BYTES_PER_PIXEL = {"fp32": 2000, "tf32": 2000, "bf16": 1000, "fp16": 1000}


def _cuda_limits(device: torch.device, precision: str) -> tuple[int, int]:
    """(max_tile_pixels, max_batch_pixels) so that a batch stays within 60 % of the GPU's memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    batch = int(0.6 * total / _BYTES_PER_PIXEL[precision])
    return min(8_388_608, batch), batch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_precision(device: torch.device) -> str:
    """fp16 on a CUDA GPU, fp32 on CPU.

    fp16 and bf16 run at the same tensor-core rate on current GPUs; fp16 keeps 3 more mantissa
    bits, so its detections are closer to the float32 reference (with random weights on CPU:
    98.5-99.4 % identical boxes against 94-95 % for bf16). Its narrow range is guarded: a piece
    whose logits overflow is run again in float32 (see :meth:`DeviceBatch.logits`); and checks
    against float32 switch the engine to float32 when fp16 would miss heads
    (:meth:`LSCCNNEngine.finish`).
    """
    return "fp16" if device.type == "cuda" else "fp32"


#: photos per float32 check when the precision is below float32 and ``check_every`` is not set:
#: each check costs one float32 pass of one photo (``bench/gpu.py`` prints the share it takes)
DEFAULT_CHECK_EVERY = 500

#: the issue's bar for a reduced precision against the float32 reference: identical boxes (over
#: all checks so far, once they hold this many reference boxes) and no reference head uncovered
CHECK_MIN_IDENTICAL = 0.99
CHECK_MIN_BOXES = 200

#: what a failed check does: run in float32 from then on, or only report it
CHECK_ACTIONS = ("fallback", "count")


@dataclass(frozen=True)
class EngineOptions:
    """How :class:`LSCCNNEngine` runs (``None`` / ``"auto"``: chosen for the device)."""

    device: str = "auto"
    precision: str = "auto"  # "fp32", "tf32", "bf16", "fp16"
    channels_last: bool | None = None  # default: on CUDA only
    compile: bool = False
    compile_mode: str | None = None  # e.g. "max-autotune", "reduce-overhead" (CUDA graphs)
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = True
    max_batch: int = 16
    max_batch_pixels: int | None = None
    bucket_multiple: int = 64
    max_tile_pixels: int | None = None
    tile_margin: int = DEFAULT_TILE_MARGIN
    nms_threshold: float = DEFAULT_NMS_THRESHOLD
    cpu_threads: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    #: pad every batch to its bucket's size and a count from 1, 2, 3, 4, 6, 8, 12, 16, 24, 32...
    #: so that shapes repeat (default: on CUDA, where cuDNN autotunes per shape, and when compiling)
    shape_stable: bool | None = None
    #: MicroBatcher: how long the first photo of a batch waits for companions
    max_wait_s: float = 0.005
    #: MicroBatcher: seconds a photo's piece may wait for its logits (queue, forward pass, copy)
    #: before its caller gets a DeviceFailure; 0: no limit. Default: 300 s on CUDA (a hung GPU
    #: must not hold a worker's task threads for ever: Celery's thread pool enforces no time
    #: limits), no limit on CPU, where a batch of large photos legitimately takes minutes.
    timeout_s: float | None = None
    #: below float32, run one photo in this many (the first one included) also in IEEE float32
    #: and compare (None: DEFAULT_CHECK_EVERY; 0: never; always 0 for fp32)
    check_every: int | None = None
    #: a failed check: "fallback" (float32 from then on) or "count" (reported only)
    check_action: str = "fallback"

    def problems(self) -> list[tuple[str, str]]:
        """Each inconsistent option as ``(field, message)``."""
        problems: list[tuple[str, str]] = []
        if self.precision not in ("auto", *PRECISIONS):
            problems.append(("precision", f"precision must be auto, fp32, tf32, bf16 or fp16, got {self.precision!r}"))
        if self.max_batch < 1:
            problems.append(("max_batch", f"max_batch must be at least 1, got {self.max_batch}"))
        if self.bucket_multiple < INPUT_MULTIPLE or self.bucket_multiple % INPUT_MULTIPLE:
            problems.append(("bucket_multiple", f"bucket_multiple must be a positive multiple of 16, got {self.bucket_multiple}"))
        if self.tile_margin < MIN_TILE_MARGIN or self.tile_margin % INPUT_MULTIPLE:
            problems.append(("tile_margin", f"tile_margin must be a multiple of 16 and >= {MIN_TILE_MARGIN}, got {self.tile_margin}"))
        smallest = (2 * self.tile_margin + INPUT_MULTIPLE) ** 2
        if self.max_tile_pixels is not None and self.max_tile_pixels < smallest:
            problems.append(("max_tile_pixels", f"max_tile_pixels must be >= {smallest} for tile_margin {self.tile_margin}"))
        if (self.max_tile_pixels is not None and self.max_batch_pixels is not None
                and self.max_batch_pixels < self.max_tile_pixels):
            problems.append(("max_batch_pixels", "max_batch_pixels must be at least max_tile_pixels (one tile must fit a batch)"))
        if not 0.0 <= self.nms_threshold <= 1.0:
            problems.append(("nms_threshold", f"nms_threshold must be in [0, 1], got {self.nms_threshold}"))
        if self.cpu_threads < 1:
            problems.append(("cpu_threads", f"cpu_threads must be at least 1, got {self.cpu_threads}"))
        if not 0.0 <= self.max_wait_s <= 10.0:
            problems.append(("max_wait_s", f"max_wait_s must be between 0 and 10 s, got {self.max_wait_s}"))
        # Python's waits refuse anything past threading.TIMEOUT_MAX (OverflowError), "inf" included.
        if self.timeout_s is not None and not 0.0 <= self.timeout_s <= threading.TIMEOUT_MAX:
            problems.append(("timeout_s", "timeout_s must be 0 (no limit) or a positive number of seconds up to "
                                          f"{threading.TIMEOUT_MAX:.0f}, got {self.timeout_s}"))
        if self.check_every is not None and self.check_every < 0:
            problems.append(("check_every", f"check_every must be 0 (never) or a number of photos, got {self.check_every}"))
        if self.check_action not in CHECK_ACTIONS:
            problems.append(("check_action", f"check_action must be fallback or count, got {self.check_action!r}"))
        return problems

    def validate(self) -> None:
        """``ValueError`` listing every inconsistent option."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid LSC-CNN engine options: " + "; ".join(message for _, message in problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "EngineOptions":
        """Options from ``ANON_LSCCNN_*`` variables; ``ValueError`` names every bad one at once.

        ``ANON_LSCCNN_DEVICE`` (auto, cpu, cuda, cuda:N), ``ANON_LSCCNN_PRECISION`` (auto, fp32,
        tf32, bf16, fp16), ``ANON_LSCCNN_CHANNELS_LAST`` (0/1), ``ANON_LSCCNN_COMPILE`` (0/1),
        ``ANON_LSCCNN_COMPILE_MODE``, ``ANON_LSCCNN_MAX_BATCH``, ``ANON_LSCCNN_BATCH_MEGAPIXELS``,
        ``ANON_LSCCNN_TILE_MEGAPIXELS``, ``ANON_LSCCNN_BUCKET``, ``ANON_LSCCNN_CPU_THREADS``,
        ``ANON_LSCCNN_BATCH_WAIT_MS``, ``ANON_LSCCNN_TIMEOUT_S``, ``ANON_LSCCNN_CHECK_EVERY``,
        ``ANON_LSCCNN_CHECK_ACTION``.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []

        variables: dict[str, str] = {}

        def read(name: str, key: str, convert: Callable[[str], Any]) -> None:
            variables[key] = name
            raw = env.get(name, "").strip()
            if not raw:
                return
            try:
                values[key] = convert(raw)
            except ValueError as exc:
                problems.append(f"{name}={raw!r}: {exc}")

        def flag(raw: str) -> bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")

        def device(raw: str) -> str:
            if raw != "auto":
                torch.device(raw)  # raises RuntimeError for nonsense
            return raw

        def megapixels(raw: str) -> int:
            value = float(raw)
            if not value > 0:
                raise ValueError("must be positive")
            return int(value * 1_000_000)

        def wrap(convert: Callable[[str], Any]) -> Callable[[str], Any]:
            def inner(raw: str) -> Any:
                try:
                    return convert(raw)
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(str(exc)) from None
            return inner

        read("ANON_LSCCNN_DEVICE", "device", wrap(device))
        read("ANON_LSCCNN_PRECISION", "precision", str.lower)
        read("ANON_LSCCNN_CHANNELS_LAST", "channels_last", flag)
        read("ANON_LSCCNN_COMPILE", "compile", flag)
        read("ANON_LSCCNN_COMPILE_MODE", "compile_mode", str)
        read("ANON_LSCCNN_MAX_BATCH", "max_batch", int)
        read("ANON_LSCCNN_BATCH_MEGAPIXELS", "max_batch_pixels", megapixels)
        read("ANON_LSCCNN_TILE_MEGAPIXELS", "max_tile_pixels", megapixels)
        read("ANON_LSCCNN_BUCKET", "bucket_multiple", int)
        read("ANON_LSCCNN_CPU_THREADS", "cpu_threads", int)
        read("ANON_LSCCNN_BATCH_WAIT_MS", "max_wait_s", lambda raw: float(raw) / 1000.0)
        read("ANON_LSCCNN_TIMEOUT_S", "timeout_s", float)
        read("ANON_LSCCNN_CHECK_EVERY", "check_every", int)
        read("ANON_LSCCNN_CHECK_ACTION", "check_action", str.lower)
        values.update(overrides)
        options = cls(**values)
        for key, message in options.problems():
            problems.append(f"{variables[key]}: {message}" if key in variables and key not in overrides else message)
        if options.compile and (missing := missing_compiler(options.device, env)):
            problems.append(f"ANON_LSCCNN_COMPILE: torch.compile needs {missing} on PATH and none was found; install "
                            "one (the GPU image has gcc) or leave compiling off")
        if problems:
            raise ValueError("invalid LSC-CNN settings: " + "; ".join(problems))
        return options


def missing_compiler(device: str, environ: Mapping[str, str]) -> str | None:
    """What ``torch.compile`` would fail to find for ``device``, or None when it is there.

    On CUDA, Triton builds a small C launcher with ``$CC``, ``cc``, ``gcc`` or ``clang``; on the
    CPU, Inductor writes C++ and builds it with ``$CXX``, ``g++`` or ``clang++``. A slim image
    has neither, and the worker found out only at its warm-up, minutes into loading the model.
    """
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    names = (environ.get("CC", ""), "cc", "gcc", "clang") if cuda else (environ.get("CXX", ""), "g++", "clang++")
    if any(name and shutil.which(name, path=environ.get("PATH")) for name in names):
        return None
    return "a C compiler (cc, gcc or clang)" if cuda else "a C++ compiler (g++ or clang++)"


# --------------------------------------------------------------------------------------------
# photos and pieces
# --------------------------------------------------------------------------------------------


class Piece:
    """One network input: a whole prepared photo or one tile of it."""

    __slots__ = ("owner", "index", "tile", "h", "w")

    def __init__(self, owner: "Prepared", index: int, tile: Tile) -> None:
        self.owner = owner
        self.index = index
        self.tile = tile
        self.h = tile.y1 - tile.y0
        self.w = tile.x1 - tile.x0

    def pixels(self) -> np.ndarray:
        t = self.tile
        return self.owner.net_rgb[t.y0 : t.y1, t.x0 : t.x1]


class Prepared:
    """A photo resized for the network and cut into pieces; collects their logits."""

    def __init__(self, rgb: np.ndarray, max_tile_pixels: int, tile_margin: int) -> None:
        self.orig_hw = rgb.shape[:2]
        self.net_rgb = prepare_input(rgb)
        self.net_hw = self.net_rgb.shape[:2]
        tiles = plan_tiles(self.net_hw[0], self.net_hw[1], max_tile_pixels, tile_margin)
        self.pieces = [Piece(self, k, t) for k, t in enumerate(tiles)]
        self._lock = threading.Lock()
        self.restart()

    def restart(self) -> None:
        """Forget every piece's logits (before the photo runs again, in float32)."""
        self._logits: list[list[np.ndarray] | None] = [None] * len(self.pieces)
        self._remaining = len(self.pieces)
        #: whether some piece ran below float32
        self.reduced = False

    def accept(self, piece: Piece, logits: list[np.ndarray], reduced: bool = False) -> bool:
        """Store one piece's logits (``4 x h/d x w/d`` each), computed below float32 when
        ``reduced``; True once every piece is in."""
        with self._lock:
            self._logits[piece.index] = logits
            self._remaining -= 1
            self.reduced = self.reduced or reduced
            return self._remaining == 0

    def logits(self) -> list[np.ndarray]:
        """Whole-photo logits; tiles contribute their cores, as in ``LSCCNNLocator``."""
        if len(self.pieces) == 1:
            return self._logits[0]  # type: ignore[return-value]
        h, w = self.net_hw
        full = [np.empty((4, h // d, w // d), np.float32) for d in OUTPUT_STRIDES]
        for piece, outputs in zip(self.pieces, self._logits):
            t = piece.tile
            for out, dst, d in zip(outputs, full, OUTPUT_STRIDES):  # type: ignore[arg-type]
                core = out[:, (t.cy0 - t.y0) // d : (t.cy1 - t.y0) // d, (t.cx0 - t.x0) // d : (t.cx1 - t.x0) // d]
                dst[:, t.cy0 // d : t.cy1 // d, t.cx0 // d : t.cx1 // d] = core
        return full

    def detections(self, nms_threshold: float) -> Detections:
        """Decode (float32 numpy, the reference's code) and map back to the photo's pixels."""
        result = to_original(decode(self.logits(), nms_threshold), self.net_hw, self.orig_hw)
        self._logits = [None] * len(self.pieces)  # free the maps early
        return result


class DeviceBatch:
    """Logits of one batch, on their way back from the device."""

    def __init__(self, engine: "LSCCNNEngine", pieces: list[Piece], outputs: list[torch.Tensor], event: Any,
                 seconds: float, precision: str) -> None:
        self.engine = engine
        self.pieces = pieces
        self._outputs = outputs
        self._event = event
        self._arrays: list[np.ndarray] | None = None
        self._lock = threading.Lock()
        self._half = PRECISIONS[precision] is not None
        #: whether the batch ran below IEEE float32 (fp16, bf16, tf32)
        self.reduced = precision != "fp32"
        self._started = time.perf_counter() - seconds
        #: wall time the device thread spent issuing this batch (CPU: the whole forward pass)
        self.seconds = seconds
        #: called once, from the first caller that finds the logits on the host: the moment the
        #: device has really run the batch (on CUDA a kernel fault surfaces only at that wait)
        self.on_ready: Callable[[float], None] | None = None

    def _wait(self, deadline: float | None) -> None:
        """Block until the logits are on the host; ``TimeoutError`` past ``deadline``."""
        ready = False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=-1 if remaining is None else remaining):
            raise TimeoutError("the device did not return the batch's logits in time")
        try:
            if self._arrays is not None:
                return
            ready = True
            if self._event is not None:
                if deadline is None:
                    self._event.synchronize()
                else:
                    # A CUDA event's synchronize() cannot time out: poll it instead (sleeping
                    # releases the GIL; the pause grows to 5 ms, small next to a batch).
                    pause = 0.0002
                    while not self._event.query():
                        if time.monotonic() >= deadline:
                            raise TimeoutError("the device did not finish the batch in time")
                        time.sleep(pause)
                        pause = min(2 * pause, 0.005)
            self._arrays = [o.numpy() for o in self._outputs]
            self._outputs = []
        finally:
            self._lock.release()
        if ready and self.on_ready is not None:
            try:
                self.on_ready(time.perf_counter() - self._started)
            except Exception:  # metrics must never break inference
                log.warning("on_ready_failed", exc_info=True)

    def logits(self, k: int, deadline: float | None = None) -> list[np.ndarray]:
        """The ``k``-th piece's own region of the four output maps (waits for the copy, until
        ``deadline`` on ``time.monotonic()``'s clock when one is given).

        A half-precision overflow (fp16 tops out at 65504) shows as non-finite logits: that
        piece alone is then run again in float32, so an overflow costs time, never detections.
        """
        self._wait(deadline)
        assert self._arrays is not None
        piece = self.pieces[k]
        out = [a[k, :, : piece.h // d, : piece.w // d] for a, d in zip(self._arrays, OUTPUT_STRIDES)]
        if self._half and not all(np.isfinite(o).all() for o in out):
            self.engine.overflows += 1
            return self.engine.run_float32(piece, deadline)
        return out


#: graphs one compiled engine may keep (buckets x slot counts, with room to spare)
_COMPILED_SHAPES = 256


#: how GPU memory exhaustion shows when it is not a ``torch.OutOfMemoryError``: cuDNN finding no
#: algorithm whose workspace fits, or its allocation failing; ``torch.compile`` wraps an
#: out-of-memory during compilation in a plain RuntimeError subclass
_OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "unable to find an engine to execute")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the device ran out of memory (so smaller batches would fit)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)


def _slot_count(n: int) -> int:
    """Batch sizes used when shapes must repeat: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, ...
    (powers of two and 1.5 times them: at most a third of a batch is padding)."""
    size = 1
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return candidate
        size *= 2


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


#: good batches in a row before a limit shrunk by out-of-memory doubles again; doubled by each
#: shrinking, up to the maximum (a few hours of batches on a busy GPU)
REGROW_AFTER_BATCHES = 100
MAX_REGROW_AFTER_BATCHES = 100 * 2**6


class LSCCNNEngine:
    """Batched LSC-CNN on one device; :meth:`detect` is the whole pipeline for a list of photos."""

    name: str = "lsccnn"
    kind: BoxKind = "head"

    def __init__(self, model: nn.Module, options: EngineOptions = EngineOptions()) -> None:
        options.validate()
        self.device = resolve_device(options.device)
        cuda = self.device.type == "cuda"
        precision = default_precision(self.device) if options.precision == "auto" else options.precision
        tile_default, batch_default = _CPU_LIMITS
        if cuda:
            tile_default, batch_default = _cuda_limits(self.device, precision)
        max_tile = options.max_tile_pixels or tile_default
        max_batch_pixels = options.max_batch_pixels or max(batch_default, max_tile)
        options = replace(
            options,
            precision=precision,
            channels_last=cuda if options.channels_last is None else options.channels_last,
            max_tile_pixels=max_tile,
            max_batch_pixels=max_batch_pixels,
            # Repeating shapes let cuDNN autotune each once and torch.compile trace each once.
            shape_stable=(options.compile or cuda) if options.shape_stable is None else options.shape_stable,
            timeout_s=(CUDA_TIMEOUT_S if cuda else 0.0) if options.timeout_s is None else options.timeout_s,
            check_every=0 if precision == "fp32" else (
                DEFAULT_CHECK_EVERY if options.check_every is None else options.check_every),
        )
        options.validate()
        self.options = options
        # Out-of-memory shrinks the batch limit; it grows back towards the configured one after
        # a streak of good batches (the memory another process held may be free again), and each
        # shrinking doubles the streak needed, so a GPU that really is too small settles.
        self._batch_pixels_cap: int = max_batch_pixels
        self._regrow_after = REGROW_AFTER_BATCHES
        self._good_batches = 0
        self._halved = False
        self.autocast_dtype = PRECISIONS[precision]
        self.precision = precision
        if cuda and options.cudnn_benchmark:
            # Bucketed shapes repeat, so autotuning each convolution once per shape pays off.
            torch.backends.cudnn.benchmark = True
        model = model.eval().requires_grad_(False).to(self.device)
        if options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._pinned = cuda

        # Masking state of the batch being run (only the device thread touches it).
        self._valid: tuple[torch.Tensor, torch.Tensor] | None = None
        self._padded_hw: tuple[int, int] = (0, 0)
        self._masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        if not convs:
            raise ValueError("the model has no convolution to mask")
        self._hooks = [convs[0].register_forward_pre_hook(self._mask_input)]
        self._hooks += [m.register_forward_hook(self._mask_output) for m in convs]

        self._forward: Callable[[torch.Tensor], Any] = model
        if options.compile:
            # Every (bucket, batch slots) shape is its own graph, and Dynamo stops compiling a
            # function after 8 of them (counted per code object, across engines), silently
            # running the rest eager: leave room for every bucket at every slot count.
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), _COMPILED_SHAPES))
            self._forward = torch.compile(model, mode=options.compile_mode, backend=options.compile_backend, dynamic=False)
        self._device_lock = threading.Lock()
        #: pieces that overflowed in half precision and were run again in float32
        self.overflows = 0
        # Checks of the reduced precision against float32 (see finish()).
        self._check_lock = threading.Lock()
        self._reduced_photos = 0
        #: every check's agreement so far (reference: float32's boxes)
        self.check_totals = Agreement(0, 0, 0, 0)
        #: whether a failed check switched the engine to float32
        self.fell_back = False
        #: called with each :class:`PrecisionCheck` (metrics); its errors are logged, not raised
        self.on_check: Callable[["PrecisionCheck"], None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- masking ----------------------------------------------------------------------------

    def _mask_for(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        key = (h, w, t.dtype)
        mask = self._masks.get(key)
        if mask is None:
            full_h, full_w = self._padded_hw
            if full_h % h or full_w % w or full_h // h != full_w // w:
                raise RuntimeError(f"unexpected activation size {h}x{w} for input {full_h}x{full_w}")
            d = full_h // h
            valid_h, valid_w = self._valid  # type: ignore[misc]
            rows = torch.arange(h, device=t.device)[None, :] < (valid_h // d)[:, None]
            cols = torch.arange(w, device=t.device)[None, :] < (valid_w // d)[:, None]
            mask = (rows[:, None, :, None] & cols[:, None, None, :]).to(t.dtype)
            self._masks[key] = mask
        return mask

    def _mask_input(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
        if self._valid is None:
            return None
        return (inputs[0] * self._mask_for(inputs[0]),) + tuple(inputs[1:])

    def _mask_output(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> Any:
        if self._valid is None:
            return None
        return output.mul_(self._mask_for(output))

    # -- stages -------------------------------------------------------------------------------

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """CPU stage 1: resize like the reference and cut into pieces (any thread)."""
        _check_rgb(rgb)
        return Prepared(rgb, self.options.max_tile_pixels, self.options.tile_margin)  # type: ignore[arg-type]

    def bucket_of(self, h: int, w: int) -> tuple[int, int]:
        m = self.options.bucket_multiple
        return (-(-h // m) * m, -(-w // m) * m)

    def plan_batches(self, pieces: Sequence[Piece]) -> list[tuple[list[Piece], int, int]]:
        """Group pieces into ``(pieces, padded_h, padded_w)`` batches (arrival order kept per bucket)."""
        opts = self.options
        groups: dict[tuple[int, int], list[Piece]] = {}
        for p in pieces:
            groups.setdefault(self.bucket_of(p.h, p.w), []).append(p)
        batches: list[tuple[list[Piece], int, int]] = []
        for (bh, bw), members in groups.items():
            batch: list[Piece] = []
            hb = wb = 0
            for p in members:
                nh, nw = (bh, bw) if opts.shape_stable else (max(hb, p.h), max(wb, p.w))
                count = len(batch) + 1
                if opts.shape_stable:
                    count = _slot_count(count)
                if batch and (len(batch) == opts.max_batch or count * nh * nw > opts.max_batch_pixels):  # type: ignore[operator]
                    batches.append((batch, hb, wb))
                    batch, hb, wb = [], 0, 0
                    nh, nw = (bh, bw) if opts.shape_stable else (p.h, p.w)
                batch.append(p)
                hb, wb = nh, nw
            if batch:
                batches.append((batch, hb, wb))
        return batches

    def _full(self, members: Sequence[Piece], hb: int, wb: int) -> bool:
        """Whether no further piece of the same size could join this batch."""
        count = len(members) + 1
        if self.options.shape_stable:
            count = _slot_count(count)
        return len(members) >= self.options.max_batch or count * hb * wb > self.options.max_batch_pixels  # type: ignore[operator]

    def run_batch(self, pieces: Sequence[Piece], hb: int, wb: int, precision: str | None = None,
                  deadline: float | None = None) -> DeviceBatch:
        """Device stage: one padded batch through the network (one thread at a time).

        ``precision`` overrides the engine's (the float32 rerun after a half-precision overflow);
        ``deadline`` (``time.monotonic()``) bounds the wait for the device, for callers outside
        the device thread (that rerun runs in a task's thread).
        """
        if self.device.type != "cuda":
            return self._run_batch(pieces, hb, wb, precision, deadline)
        # On "cuda:N" the calling thread's current device must be N from the start: the pinned
        # host buffers would otherwise open a context on GPU 0 (another worker's memory), and
        # the event and the copies follow the current device's stream.
        with torch.cuda.device(self.device):
            return self._run_batch(pieces, hb, wb, precision, deadline)

    def _run_batch(self, pieces: Sequence[Piece], hb: int, wb: int, precision: str | None,
                   deadline: float | None) -> DeviceBatch:
        started = time.perf_counter()
        ran = precision or self.precision  # read once: a check may switch the engine meanwhile
        dtype = PRECISIONS[ran]
        tf32 = ran == "tf32"
        n = len(pieces)
        slots = min(_slot_count(n), self.options.max_batch) if self.options.shape_stable else n
        slots = max(slots, n)
        cuda = self.device.type == "cuda"
        # Not zeroed: whatever lies outside a piece is masked to zero before the first convolution.
        host_t = torch.empty((slots, hb, wb, 3), dtype=torch.uint8, pin_memory=self._pinned)
        host = host_t.numpy()
        for k, p in enumerate(pieces):
            host[k, : p.h, : p.w] = p.pixels()
        # Pinned too: a copy from pageable memory would wait for the previous batch's kernels.
        valid_h = torch.tensor([p.h for p in pieces] + [0] * (slots - n), dtype=torch.int64, pin_memory=self._pinned)
        valid_w = torch.tensor([p.w for p in pieces] + [0] * (slots - n), dtype=torch.int64, pin_memory=self._pinned)
        padded = slots != n or any(p.h != hb or p.w != wb for p in pieces)
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._device_lock.acquire(timeout=wait):
            raise TimeoutError("the device stayed busy past the deadline")
        with contextlib.ExitStack() as held:
            held.callback(self._device_lock.release)
            x = host_t.to(self.device, non_blocking=cuda).permute(0, 3, 1, 2).to(torch.float32)
            x = x.contiguous(memory_format=torch.channels_last if self.options.channels_last else torch.contiguous_format)
            if padded:
                self._valid = (valid_h.to(self.device, non_blocking=cuda), valid_w.to(self.device, non_blocking=cuda))
                self._padded_hw = (hb, wb)
                self._masks = {}
            try:
                with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ), float32_math(tf32):
                    # The compiled graph was traced for the engine's precision; reruns go eager.
                    outputs = (self._forward if precision is None else self.model)(x)
                # Half-precision logits are widened so decoding is the reference's float32 code.
                outputs = [o[:n].float() for o in outputs]
            finally:
                self._valid = None
                self._masks = {}
            event = None
            if cuda:
                host_out = []
                for o in outputs:
                    dst = torch.empty(o.shape, dtype=torch.float32, pin_memory=True)
                    dst.copy_(o, non_blocking=True)
                    host_out.append(dst)
                # blocking: a synchronize() on it sleeps instead of spinning a CPU core
                event = torch.cuda.Event(blocking=True)
                event.record()
                outputs = host_out
        return DeviceBatch(self, list(pieces), outputs, event, time.perf_counter() - started, ran)

    def run_isolating(self, pieces: Sequence[Piece], hb: int, wb: int) -> list[tuple[list[Piece], DeviceBatch | Exception]]:
        """:meth:`run_batch`, but a failing batch never fails the pieces that would run alone.

        Pieces of a batch belong to unrelated jobs: when a batch fails, each piece is run again on
        its own, so only a piece that also fails alone carries the error (a job is never lost to
        its batch-mates). A GPU out-of-memory error also halves ``max_batch_pixels`` (from the
        failed batch's padded size), so the next batches fit; a streak of good batches doubles it
        back (:meth:`_note_good_batch`).
        Errors come without their tracebacks (:func:`_without_traceback`).
        """
        try:
            batch = self.run_batch(pieces, hb, wb)
        except Exception as exc:
            error = _without_traceback(exc)
            if len(pieces) == 1:
                return [(list(pieces), error)]
        else:
            self._note_good_batch()
            return [(list(pieces), batch)]
        oom = is_out_of_memory(error)
        if oom:
            slots = _slot_count(len(pieces)) if self.options.shape_stable else len(pieces)
            size = slots * hb * wb
            # Only a batch that fit the current limit says the limit is too high: batches planned
            # before an earlier halving (the same round's) must not halve it again. A lone piece
            # runs whatever the limit, so halving never starves anyone; the floor of one piece of
            # this size keeps the limit meaningful after repeated failures.
            if size <= self.options.max_batch_pixels:  # type: ignore[operator]
                self.options = replace(self.options, max_batch_pixels=max(hb * wb, size // 2))
                self._good_batches = 0
                if self._halved:  # the first halving needs the base streak; each later one twice the last
                    self._regrow_after = min(2 * self._regrow_after, MAX_REGROW_AFTER_BATCHES)
                self._halved = True
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log.warning("lsccnn_batch_failed", extra={
            "pieces": len(pieces), "error": type(error).__name__, "oom": oom,
            "max_batch_megapixels": round(self.options.max_batch_pixels / 1e6, 2),  # type: ignore[operator]
        })
        outcomes: list[tuple[list[Piece], DeviceBatch | Exception]] = []
        for piece in pieces:
            # Same padded shape when shapes must repeat (a compiled graph exists for it).
            h, w = (hb, wb) if self.options.shape_stable else (piece.h, piece.w)
            try:
                outcomes.append(([piece], self.run_batch([piece], h, w)))
            except Exception as exc:
                outcomes.append(([piece], _without_traceback(exc)))
        return outcomes

    def _note_good_batch(self) -> None:
        """Count a batch that ran; after enough in a row, double a shrunk batch limit (never
        past the configured one)."""
        current = self.options.max_batch_pixels
        assert current is not None
        if current >= self._batch_pixels_cap:
            return
        self._good_batches += 1
        if self._good_batches < self._regrow_after:
            return
        self._good_batches = 0
        self.options = replace(self.options, max_batch_pixels=min(self._batch_pixels_cap, 2 * current))
        log.info("lsccnn_batch_limit_raised", extra={"max_batch_megapixels": round(self.options.max_batch_pixels / 1e6, 2)})  # type: ignore[operator]

    def run_float32(self, piece: Piece, deadline: float | None = None) -> list[np.ndarray]:
        """One piece alone in IEEE float32, in the calling thread: the rerun after a half-precision
        overflow, and the checks. Padded to its bucket when shapes must repeat (CUDA), like any
        batch: at its exact size every new photo size would cost a cuDNN autotuning of each
        layer, in float32, under the device lock that every other batch waits for."""
        hb, wb = self.bucket_of(piece.h, piece.w) if self.options.shape_stable else (piece.h, piece.w)
        return self.run_batch([piece], hb, wb, precision="fp32", deadline=deadline).logits(0, deadline)

    def finish(self, prepared: Prepared, deadline: float | None = None) -> Detections:
        """CPU stage 2: decode a photo whose pieces all have logits (any thread).

        A photo computed below float32 is run again in IEEE float32, and answered with those
        boxes, when a check is due (one photo in ``check_every``, the first one included:
        :meth:`_check`), and always once a check has switched the engine to float32 (its logits
        are from before the switch, which must not cost a head). A float32 pass that fails or
        outlasts ``deadline`` raises :class:`~anonymiser.errors.DeviceFailure`.
        """
        if not prepared.reduced:
            return prepared.detections(self.options.nms_threshold)
        if self.fell_back:
            return self._float32_detections(prepared, deadline)
        detections = prepared.detections(self.options.nms_threshold)
        if self._check_due():
            return self._check(prepared, detections, deadline)
        return detections

    def _check_due(self) -> bool:
        if not self.options.check_every:
            return False
        with self._check_lock:
            due = self._reduced_photos % self.options.check_every == 0
            self._reduced_photos += 1
        return due

    def _float32_detections(self, prepared: Prepared, deadline: float | None) -> Detections:
        prepared.restart()
        try:
            for piece in prepared.pieces:
                prepared.accept(piece, self.run_float32(piece, deadline))
        except Exception as exc:
            raise DeviceFailure(f"LSC-CNN's float32 pass on {self.device} failed: {type(exc).__name__}: {exc}") from exc
        return prepared.detections(self.options.nms_threshold)

    def _check(self, prepared: Prepared, candidate: Detections, deadline: float | None) -> Detections:
        """Run ``prepared`` in float32, compare, maybe fall back; returns float32's boxes."""
        started = time.perf_counter()
        checked = self.precision
        reference = self._float32_detections(prepared, deadline)
        found = agreement(reference, candidate, prepared.orig_hw)
        with self._check_lock:
            self.check_totals = totals = self.check_totals + found
            failed = found.uncovered > 0 or (
                totals.reference >= CHECK_MIN_BOXES and totals.identical_fraction < CHECK_MIN_IDENTICAL)
            fell_back = failed and self.options.check_action == "fallback" and not self.fell_back
            if fell_back:
                self._fall_back()
        check = PrecisionCheck(checked, found, time.perf_counter() - started, failed, fell_back)
        fields = {
            "precision": checked, "boxes": found.reference, "identical": found.identical,
            "uncovered": found.uncovered, "seconds": round(check.seconds, 3),
            "checked_boxes": totals.reference, "identical_share": round(totals.identical_fraction, 4),
        }
        if fell_back:
            log.warning("lsccnn_precision_fallback", extra=fields)
        else:
            log.log(logging.WARNING if failed else logging.INFO, "lsccnn_precision_check", extra={**fields, "failed": failed})
        if self.on_check is not None:
            try:
                self.on_check(check)
            except Exception:  # metrics must never break inference
                log.warning("on_check_failed", exc_info=True)
        return reference

    def _fall_back(self) -> None:
        """Run in IEEE float32 from now on (called under the check lock).

        The compiled graph was traced for the reduced precision, so the eager model runs. Float32
        activations take twice the memory of half ones: the batch limits are halved to match
        (never below one tile)."""
        share = _BYTES_PER_PIXEL[self.precision] / _BYTES_PER_PIXEL["fp32"]
        self._forward = self.model  # before the precision: a batch that reads fp32 runs eager
        self.autocast_dtype = None
        self.precision = "fp32"
        self.fell_back = True
        if share < 1:
            tile = self.options.max_tile_pixels
            assert tile is not None and self.options.max_batch_pixels is not None
            self._batch_pixels_cap = max(tile, int(self._batch_pixels_cap * share))
            self.options = replace(self.options, max_batch_pixels=max(tile, int(self.options.max_batch_pixels * share)))

    # -- whole pipeline -----------------------------------------------------------------------

    def _cpu_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.options.cpu_threads, thread_name_prefix="lsccnn-cpu")
            return self._pool

    def detect(self, images: Sequence[np.ndarray], trace: list[tuple[str, float, float]] | None = None) -> list[Detections]:
        """Detections for every photo, batched and bucketed; CPU work overlaps the forward passes.

        Photos are prepared in the thread pool while earlier batches run; a bucket runs as soon as
        it holds a full batch; each finished batch is decoded in the pool while the next runs.
        ``trace`` (tests, benchmarks) receives ``(stage, start, end)`` perf-counter spans.
        """
        if not len(images):
            return []
        pool = self._cpu_pool()

        def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if trace is not None:
                    trace.append((stage, start, time.perf_counter()))

        prepared_futures = [pool.submit(timed, "prepare", self.prepare, rgb) for rgb in images]
        results: list[Future[Detections]] = [Future() for _ in images]
        owner_index: dict[int, int] = {}
        pending: dict[tuple[int, int], list[Piece]] = {}
        decodes: list[Future[None]] = []

        def finish_batch(batch: DeviceBatch) -> None:
            for k, piece in enumerate(batch.pieces):
                if piece.owner.accept(piece, batch.logits(k), batch.reduced):
                    results[owner_index[id(piece.owner)]].set_result(self.finish(piece.owner))

        def run(members: list[Piece], hb: int, wb: int) -> None:
            batch = timed("forward", self.run_batch, members, hb, wb)
            decodes.append(pool.submit(timed, "decode", finish_batch, batch))

        for index, future in enumerate(prepared_futures):
            prepared = future.result()
            owner_index[id(prepared)] = index
            for piece in prepared.pieces:
                key = self.bucket_of(piece.h, piece.w)
                group = pending.setdefault(key, [])
                group.append(piece)
                batches = self.plan_batches(group)
                *ready, last = batches
                if self._full(*last):
                    ready.append(last)
                    pending[key] = []
                else:
                    pending[key] = last[0]
                for members, hb, wb in ready:
                    run(members, hb, wb)
        for group in pending.values():
            for members, hb, wb in self.plan_batches(group):
                run(members, hb, wb)
        for d in decodes:
            d.result()  # re-raises a decoding error
        return [r.result() for r in results]

    def close(self) -> None:
        """Remove the hooks and stop the thread pool."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# --------------------------------------------------------------------------------------------
# many callers, one device thread
# --------------------------------------------------------------------------------------------


class MicroBatcher:
    """Lets many threads share one engine: their photos' pieces meet in batches.

    A caller (e.g. one Celery task thread per photo) prepares its own photo, submits its pieces
    and decodes its own logits, so CPU work happens in the callers' threads while the device
    thread runs batches. The device thread waits at most ``max_wait_s`` after the first piece
    arrives for companions, and never waits once ``max_batch`` pieces are queued. When a batch
    fails, its pieces are run again one by one (:meth:`LSCCNNEngine.run_isolating`): only the
    caller whose piece also fails alone gets the error (its task then applies its own failure
    rules), so one bad photo or an out-of-memory batch never fails its batch-mates' jobs.
    (On CUDA an error that surfaces only when the logits are copied back, such as a kernel
    fault, reaches every caller of its batch: it usually breaks the whole CUDA context anyway.)

    A caller waits at most the engine's ``timeout_s`` for its logits, and never for a device
    thread that has ended. ``on_batch(size, seconds)`` is called once per batch, when the device
    has really run it (its logits reached the host): ``seconds`` from issuing it until then.
    """

    def __init__(self, engine: LSCCNNEngine, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.engine = engine
        self.on_batch = on_batch
        self._queue: "queue_module.SimpleQueue[tuple[Piece, Future[tuple[DeviceBatch, int]]] | None]" = queue_module.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lsccnn-device", daemon=True)
        self._thread.start()

    def detect(self, rgb: np.ndarray) -> Detections:
        """Head boxes for one photo (blocks the calling thread until its batch has run).

        :class:`~anonymiser.errors.DeviceFailure` when the device fails on it, or does not
        answer within the engine's ``timeout_s`` (the job should go to another worker);
        ``ValueError`` when ``rgb`` is not an RGB array.
        """
        if self._stop.is_set():
            raise DeviceFailure("the LSC-CNN batcher is closed")
        prepared = self.engine.prepare(rgb)  # a bad array raises ValueError: the input's fault
        timeout = self.engine.options.timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        futures = []
        for piece in prepared.pieces:
            future: Future[tuple[DeviceBatch, int]] = Future()
            self._queue.put((piece, future))
            futures.append((piece, future))
        try:
            for piece, future in futures:
                batch, k = self._result(future, deadline)
                prepared.accept(piece, batch.logits(k, deadline), batch.reduced)
        except Exception as exc:
            # The piece failed even alone (run_isolating), or the device stalled: the device's
            # fault, not the photo's.
            raise DeviceFailure(f"LSC-CNN on {self.engine.device} failed: {type(exc).__name__}: {exc}") from exc
        return self.engine.finish(prepared, deadline)

    def _result(self, future: "Future[tuple[DeviceBatch, int]]", deadline: float | None) -> tuple[DeviceBatch, int]:
        """The future's result; ``TimeoutError`` past ``deadline``, ``RuntimeError`` when the
        device thread has ended (closed while this caller was queueing) and nobody will answer."""
        while True:
            wait = _LIVENESS_CHECK_S if deadline is None else min(_LIVENESS_CHECK_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"no logits within {self.engine.options.timeout_s:g} s")
            try:
                return future.result(timeout=wait)
            except TimeoutError:
                if future.done():
                    # Answered as the wait ran out (or the piece's own error is a TimeoutError):
                    # the answer, not this wait's timeout.
                    return future.result()
                if not self._thread.is_alive() and not future.done():
                    raise RuntimeError("the batcher is closed") from None

    def _collect(self) -> list[tuple[Piece, Future[tuple[DeviceBatch, int]]]]:
        first = self._queue.get()
        if first is None:
            return []
        items = [first]
        deadline = time.monotonic() + self.engine.options.max_wait_s
        while len(items) < self.engine.options.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue_module.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue_module.Empty:
                    break
            if item is None:
                self._stop.set()
                break
            items.append(item)
        return items

    def _loop(self) -> None:
        while not self._stop.is_set():
            items = self._collect()
            if not items:
                break
            self._run_round(items)
            # The round's batches and errors stay referenced only by their callers, so nothing
            # of them lives on here while the thread waits or runs the next round.
            del items
        # Whatever is still queued will never run: fail it instead of hanging its caller.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue_module.Empty:
                break
            if item is not None:
                item[1].set_exception(RuntimeError("the batcher is closed"))

    def _run_round(self, items: list[tuple[Piece, "Future[tuple[DeviceBatch, int]]"]]) -> None:
        """Run what one collection gathered, as batches, and answer every piece's future."""
        futures = {id(piece): future for piece, future in items}
        for members, hb, wb in self.engine.plan_batches([piece for piece, _ in items]):
            try:
                outcomes = self.engine.run_isolating(members, hb, wb)
            except BaseException as exc:  # e.g. KeyboardInterrupt: nobody may hang waiting
                outcomes = [(members, _without_traceback(exc))]  # type: ignore[list-item]
            for ran, outcome in outcomes:
                if isinstance(outcome, BaseException):
                    for piece in ran:
                        futures[id(piece)].set_exception(outcome)
                    continue
                if self.on_batch is not None:
                    outcome.on_ready = functools.partial(self.on_batch, len(ran))
                for k, piece in enumerate(ran):
                    futures[id(piece)].set_result((outcome, k))

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)


class BatchedLSCCNNLocator:
    """A ``HeadLocator`` whose ``locate`` goes through a shared :class:`MicroBatcher`."""

    name: str = "lsccnn"
    kind: BoxKind = "head"

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher

    def locate(self, rgb: np.ndarray) -> Detections:
        return self.batcher.detect(rgb)


def checkpoint_expectations(environ: Mapping[str, str]) -> tuple[str, int | None]:
    """The MD5 and size (None: any) the batched locator's checkpoint must have: the official
    file's, or ``ANON_LSCCNN_MD5`` / ``ANON_LSCCNN_SIZE``. ``ValueError`` names both when bad,
    so the start-up check reports them instead of the warm-up."""
    from .locators.lsccnn_checkpoint import OFFICIAL_MD5, OFFICIAL_SIZE

    md5 = environ.get("ANON_LSCCNN_MD5", "").strip().lower() or OFFICIAL_MD5
    size_raw = environ.get("ANON_LSCCNN_SIZE", "").strip()
    problems = []
    if md5 != OFFICIAL_MD5 and (len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5)):
        problems.append(f"ANON_LSCCNN_MD5 must be 32 hex digits, got {md5!r}")
    size: int | None = OFFICIAL_SIZE if md5 == OFFICIAL_MD5 else None
    if size_raw:
        try:
            size = int(size_raw)
            if size < 1:
                raise ValueError
        except ValueError:
            problems.append(f"ANON_LSCCNN_SIZE must be a positive number of bytes, got {size_raw!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return md5, size


def load_batched_locator(
    weights_dir: str | Path,
    options: EngineOptions | None = None,
    on_batch: Callable[[int, float], None] | None = None,
    environ: Mapping[str, str] | None = None,
    on_check: Callable[[PrecisionCheck], None] | None = None,
) -> BatchedLSCCNNLocator:
    """The batched LSC-CNN locator with the checkpoint in ``weights_dir``; ``on_batch`` and
    ``on_check`` receive each batch and each precision check (metrics).

    The official checkpoint is verified by size and MD5 as usual. ``ANON_LSCCNN_MD5`` (with
    ``ANON_LSCCNN_SIZE``, optional) names the checksum of another file the operator vouches for
    (e.g. a bare state-dict some forks publish, or a generated checkpoint in tests).
    """
    from .locators.lsccnn_checkpoint import OFFICIAL_FILENAME, load_model

    env = os.environ if environ is None else environ
    md5, size = checkpoint_expectations(env)
    model = load_model(Path(weights_dir) / OFFICIAL_FILENAME, expected_size=size, expected_md5=md5)
    engine = LSCCNNEngine(model, options or EngineOptions.from_env(env))
    engine.on_check = on_check
    return BatchedLSCCNNLocator(MicroBatcher(engine, on_batch=on_batch))


# --------------------------------------------------------------------------------------------
# comparing two sets of detections (tests, benchmarks)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How far ``candidate`` detections reproduce ``reference`` ones on one photo."""

    reference: int
    candidate: int
    identical: int  # boxes present in both, coordinates equal
    uncovered: int  # reference heads not fully painted over by the candidate's covers

    @property
    def identical_fraction(self) -> float:
        most = max(self.reference, self.candidate)
        return 1.0 if most == 0 else self.identical / most

    def __add__(self, other: "Agreement") -> "Agreement":
        return Agreement(self.reference + other.reference, self.candidate + other.candidate,
                         self.identical + other.identical, self.uncovered + other.uncovered)


@dataclass(frozen=True)
class PrecisionCheck:
    """One photo run in the engine's reduced precision and again in IEEE float32."""

    precision: str  # the precision checked (fp16, bf16, tf32)
    agreement: Agreement  # reference: float32's boxes; candidate: the reduced precision's
    seconds: float  # the float32 pass, its decoding and the comparison
    failed: bool  # below the bar: a head uncovered here, or the checks' identical share < 99 %
    fell_back: bool  # this check switched the engine to float32


def agreement(reference: Detections, candidate: Detections, image_hw: tuple[int, int]) -> Agreement:
    """Identical boxes (multiset of exact coordinates) and reference heads left uncovered.

    A reference head counts as covered when every pixel of its box lies under the covers the
    pipeline would paint for the candidate's boxes (padded as head boxes, rounded outwards).
    """
    from collections import Counter

    from .regions import pad_boxes, to_pixels

    ref = Counter(map(tuple, np.asarray(reference.boxes).tolist()))
    cand = Counter(map(tuple, np.asarray(candidate.boxes).tolist()))
    identical = sum((ref & cand).values())
    h, w = image_hw
    painted = np.zeros((h, w), bool)
    boxes, _ = to_pixels(pad_boxes(candidate.boxes, "head"), 1.0, w, h)
    for x1, y1, x2, y2 in boxes:
        painted[y1:y2, x1:x2] = True
    uncovered = 0
    for x1, y1, x2, y2 in np.asarray(reference.boxes, np.float64):
        a, b = int(math.floor(x1)), int(math.ceil(x2))
        c, d = int(math.floor(y1)), int(math.ceil(y2))
        region = painted[max(c, 0) : min(d, h), max(a, 0) : min(b, w)]
        if region.size and not region.all():
            uncovered += 1
    return Agreement(len(reference), len(candidate), identical, uncovered)


# --------------------------------------------------------------------------------------------
# arithmetic per photo (benchmarks: achieved TFLOP/s)
# --------------------------------------------------------------------------------------------

#: Input stride of every layer, from the data flow of spec §1.3 (the channel counts and kinds come
#: from the layer table of spec §1.2, transcribed in ``lsccnn_net._LAYERS``). A 3x3 convolution
#: keeps its input's resolution; a transposed one enlarges it by 2 (``t2``) or 4 (``t4``).
LAYER_INPUT_STRIDES: dict[str, int] = {
    **{f"conv1_{k}": 1 for k in (1, 2)},
    **{f"conv2_{k}": 2 for k in (1, 2)},
    **{f"conv3_{k}": 4 for k in (1, 2, 3)},
    **{f"conv4_{k}": 8 for k in (1, 2, 3)},
    **{f"conv5_{k}": 16 for k in (1, 2, 3)},
    "conv_before_transpose_1": 16,
    **{f"convA_{k}": 16 for k in range(1, 6)},
    **{f"convB_{k}": 8 for k in range(1, 6)},
    **{f"convC_{k}": 4 for k in range(1, 6)},
    **{f"convD_{k}": 2 for k in range(1, 6)},
    "transpose_1": 16, "conv_after_transpose_1_1": 8,
    "transpose_2": 8, "conv_after_transpose_2_1": 4,
    "transpose_3": 16, "conv_after_transpose_3_1": 4,
    "transpose_4_1_a": 16, "transpose_4_1_b": 4, "conv_after_transpose_4_1": 2,
    "transpose_4_2": 8, "conv_after_transpose_4_2": 2,
    "transpose_4_3": 4, "conv_after_transpose_4_3": 2,
    **{f"conv_middle_{k}": 8 for k in (1, 2, 3)}, "conv_mid_4": 8,
    **{f"conv_lowest_{k}": 4 for k in (1, 2, 3, 4)},
    **{f"conv_scale1_{k}": 2 for k in (1, 2, 3)},
}


def lsccnn_flops(height: int, width: int) -> int:
    """Floating-point operations (2 per multiply-accumulate) of one forward pass at ``height x width``.

    A 3x3 convolution costs ``9 * in * out`` MACs per output pixel; a transposed one ``9 * in *
    out`` per *input* pixel (each input pixel scatters one 3x3 kernel per output channel).
    Biases, ReLUs, poolings and the mean subtraction are left out (well under 0.1 %). About 359
    GMAC at 640x480, 4.9 TFLOP at 1920x1088.
    """
    from .locators.lsccnn_net import _LAYERS

    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
        raise ValueError("LSC-CNN input sides are multiples of 16")
    macs = 0
    for name, c_in, c_out, _kind in _LAYERS:
        d = LAYER_INPUT_STRIDES[name]
        macs += 9 * c_in * c_out * (height // d) * (width // d)
    return 2 * macs
