"""The batched, size-bucketed LSC-CNN engine: the GPU path (and its CPU twin, which the tests run).

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
  callers' threads (:class:`~anonymiser.batching.micro_batcher.MicroBatcher`), overlapping with
  the forward pass of other batches.

The engine registers hooks on the model it is given: give it a model of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DeviceFailure
from ..locators.base import BoxKind, Detections
from ..locators.lsccnn import Tile, _check_rgb, float32_math, plan_tiles, prepare_input, to_original
from ..locators.lsccnn_decode import OUTPUT_STRIDES, decode
from .agreement import Agreement, PrecisionCheck, agreement
from .options import (
    BYTES_PER_PIXEL,
    CHECK_MIN_BOXES,
    CHECK_MIN_IDENTICAL,
    CPU_LIMITS,
    CUDA_TIMEOUT_S,
    DEFAULT_CHECK_EVERY,
    PRECISIONS,
    EngineOptions,
    cuda_limits,
    default_precision,
    resolve_device,
)

log = logging.getLogger(__name__)


def without_traceback(exc: BaseException) -> BaseException:
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
        return out  # non-finite float32 logits are refused by decode() (NonFiniteLogits)


#: graphs one compiled engine may keep (buckets x slot counts, with room to spare)
_COMPILED_SHAPES = 256


#: how GPU memory exhaustion shows when it is not a ``torch.OutOfMemoryError``: cuDNN finding no
#: algorithm whose workspace fits, or its allocation failing (cuDNN 8 names it ``ALLOC_FAILED``,
#: cuDNN 9, which CUDA 13's torch ships, ``INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED``), cuBLAS's
#: allocation failing; ``torch.compile`` wraps an out-of-memory during compilation in a plain
#: RuntimeError subclass
_OOM_MESSAGES = (
    "out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED", "unable to find an engine to execute",
)


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
        tile_default, batch_default = CPU_LIMITS
        if cuda:
            tile_default, batch_default = cuda_limits(self.device, precision)
        max_tile = options.max_tile_pixels or tile_default
        if options.max_tile_pixels is None and options.max_batch_pixels is not None:
            # A batch limit set alone, below the device's default tile: the tiles shrink to fit
            # it (the start-up check passed it and the engine then refused to start).
            max_tile = min(max_tile, options.max_batch_pixels)
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
            # running the rest eager: leave room for every bucket at every slot count. Its
            # second, accumulated limit (256 by default) counts the same graphs again, with the
            # float32 reruns' shapes and any other compiled function of the process: twice that.
            config = torch._dynamo.config
            for name, old_name, room in (("recompile_limit", "cache_size_limit", _COMPILED_SHAPES),
                                         ("accumulated_recompile_limit", "accumulated_cache_size_limit", 2 * _COMPILED_SHAPES)):
                name = name if hasattr(config, name) else old_name
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), room))
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
        Errors come without their tracebacks (:func:`without_traceback`).
        """
        try:
            batch = self.run_batch(pieces, hb, wb)
        except Exception as exc:
            error = without_traceback(exc)
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
                outcomes.append(([piece], without_traceback(exc)))
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
        share = BYTES_PER_PIXEL[self.precision] / BYTES_PER_PIXEL["fp32"]
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
