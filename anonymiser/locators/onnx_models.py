"""Loading ONNX models for ONNX Runtime, on the GPU when its provider is present."""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.version_converter
import onnxruntime as ort

from ..errors import DeviceFailure
from ..int_settings import IntSetting, range_problems, read_ints
from .tiling import NetInput

log = logging.getLogger(__name__)

#: tiles per ONNX Runtime call on the GPU, where one call per tile would leave it mostly idle
CUDA_TILE_BATCH = 8
MAX_TILE_BATCH = 64
#: Tile shapes vary (small photos, a last partial batch): ONNX Runtime's default exhaustive cuDNN
#: search would run again for each new shape. And its default arena grows in powers of two,
#: taking GPU memory the LSC-CNN batch budget counts on.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
#: Calls one CUDA session runs at once. A GPU worker has tens of task threads, and each call
#: holds its activations in the session's arena (about 285 MB per 1 MP CenterFace tile, 8 tiles
#: a call): unbounded, 32 threads could take ~70 GB beside LSC-CNN's 60 %. Four calls keep the
#: GPU fed while others copy their tiles in and out, and hold about 9 GB (an estimate; the arena
#: keeps blocks of every tile shape it has seen, so it can end somewhat above that).
DEFAULT_GPU_RUNS = 4
MAX_GPU_RUNS = 64
#: Below this not even one 1 MP CenterFace tile (~285 MB of activations, besides the weights and
#: cuDNN's workspace) would run: a smaller value is a mistake, such as a size given in GB.
MIN_GPU_MEMORY_MB = 512


def providers() -> list[str]:
    """CUDA first when ONNX Runtime was built with it, CPU always as the fallback."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


@lru_cache(maxsize=1)
def _share_cuda_libraries() -> None:
    """Let onnxruntime-gpu use the CUDA and cuDNN libraries that the CUDA build of torch ships,
    so the GPU image needs no second copy of them (ONNX Runtime >= 1.21's ``preload_dlls``)."""
    import torch  # noqa: F401  (loading torch first maps its CUDA libraries into the process)

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except OSError:  # nothing to preload: the session's own fallback check reports it
            pass


_SETTINGS = {
    "threads": IntSetting("ANON_ONNX_THREADS", 0),
    "uint8_input": IntSetting("ANON_ONNX_UINT8_INPUT", 0, 1),
    "tile_batch": IntSetting("ANON_ONNX_TILE_BATCH", 1, MAX_TILE_BATCH),
    "gpu_runs": IntSetting("ANON_ONNX_GPU_RUNS", 1, MAX_GPU_RUNS),
    "gpu_memory_mb": IntSetting("ANON_ONNX_GPU_MEMORY_MB", MIN_GPU_MEMORY_MB),
}


@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX locators run.

    ``threads``: ONNX Runtime's intra-op threads (0: one per core). ``tile_batch``: tiles per
    call (None: 8 when the CUDA provider is active, 1 on CPU, where ONNX Runtime already spreads
    one tile over every core and a batch would only multiply activation memory).
    ``gpu_runs``: on the CUDA provider, how many calls one session runs at once; each holds its
    activations in ONNX Runtime's arena, which keeps what it once took, so this (with the tile
    batch and tile size) is what bounds the arena, whatever the worker's thread count.
    ``gpu_memory_mb``: a hard cap on each CUDA session's arena (None: no cap); a call that would
    pass it fails, and on the GPU that is a device failure, so it is a backstop, not the bound.
    ``uint8_input``: 1 feeds the network the tiles' own bytes and lets the graph turn them into
    floats, upscale and pad them (see :func:`take_uint8_hwc`), 0 upscales and builds float
    planes on the host (None: 1 when the CUDA provider is available, where that work is GPU
    work, 0 on the CPU).
    """

    threads: int = 0
    tile_batch: int | None = None
    gpu_runs: int = DEFAULT_GPU_RUNS
    gpu_memory_mb: int | None = None
    uint8_input: int | None = None

    def __post_init__(self) -> None:
        problems = range_problems(_SETTINGS, {key: getattr(self, key) for key in _SETTINGS})
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OnnxOptions":
        """``ANON_ONNX_THREADS``, ``ANON_ONNX_TILE_BATCH``, ``ANON_ONNX_GPU_RUNS``,
        ``ANON_ONNX_GPU_MEMORY_MB`` and ``ANON_ONNX_UINT8_INPUT``; unset keeps the defaults.
        ``ValueError`` names every bad variable at once."""
        return cls(**read_ints(_SETTINGS, os.environ if environ is None else environ))

    def cuda_provider_options(self) -> dict[str, str]:
        """The CUDA provider's options for a session: :data:`CUDA_PROVIDER_OPTIONS`, plus the
        arena cap when one is set (ONNX Runtime takes it in bytes)."""
        chosen = dict(CUDA_PROVIDER_OPTIONS)
        if self.gpu_memory_mb is not None:
            chosen["gpu_mem_limit"] = str(self.gpu_memory_mb * 1024 * 1024)
        return chosen

    def batch_for(self, session: "Session | ort.InferenceSession") -> int:
        """The tile batch for a session, by the provider it actually got."""
        if self.tile_batch is not None:
            return self.tile_batch
        return CUDA_TILE_BATCH if "CUDAExecutionProvider" in session.get_providers() else 1


#: the graph inputs :func:`take_uint8_hwc` adds beside the bytes: the integer upscale factor
#: (float32 ``[1]``) and the rows and columns of fill added after it (int64 ``[2]``)
UPSCALE_INPUT, PAD_INPUT = "tile_upscale", "tile_pad"
#: the opset the added nodes are written for (Resize and Pad take their sizes as inputs from
#: opset 11 on); an older model is converted first (CenterFace ships at opset 9)
PREPARE_OPSET = 13


def take_uint8_hwc(model: onnx.ModelProto, bgr: bool, fill: float = 0.0) -> onnx.ModelProto:
    """``model`` (float ``[N, 3, H, W]`` planes in) made to take the tiles' own bytes,
    ``[N, h, w, 3]`` uint8 in RGB order, and to make its input itself: Cast and Transpose to
    planes, an upscale by the integer in :data:`UPSCALE_INPUT` (bilinear, half-pixel, rounded
    half up), the padding in :data:`PAD_INPUT` with ``fill`` at the bottom and right, and for a
    BGR network a Gather that reverses the channels.

    On a GPU this moves the last per-pixel host work of the ONNX locators to the device: the
    host neither upscales tiles (most of their host time) nor writes 12 bytes of float per
    pixel, and the copy to the device is 4x smaller (16x for a tile upscaled 2x). The values
    are the same: every uint8 is exactly a float32, and at the factors in
    :data:`~anonymiser.locators.tiling.GRAPH_UPSCALES` the rounded upscale is bit for bit the
    host's (:data:`~anonymiser.locators.tiling.UPSCALE_INTERPOLATION`; both tested).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < PREPARE_OPSET:
        # CenterFace's operators (convolutions, batch norm, ReLU, Add, Sigmoid) mean the same at
        # opset 13: its outputs stay bit for bit the same (tested through the locator).
        model = onnx.version_converter.convert_version(model, PREPARE_OPSET)
        model.ir_version = max(model.ir_version, 7)
    graph = model.graph
    planes = graph.input[0]
    name = planes.name
    taken = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    if taken & {UPSCALE_INPUT, PAD_INPUT}:
        raise ValueError(f"the model already has an input named {UPSCALE_INPUT} or {PAD_INPUT}")

    def tensor(value: np.ndarray, label: str) -> str:
        graph.initializer.append(onnx.numpy_helper.from_array(value, f"{name}_{label}"))
        return f"{name}_{label}"

    def step(op: str, inputs: list[str], label: str, **attrs: Any) -> str:
        out = f"{name}_{label}"
        nodes.append(onnx.helper.make_node(op, inputs, [out], name=f"uint8_hwc/{op}_{label}", **attrs))
        return out

    nodes: list[onnx.NodeProto] = []
    raw = f"{name}_uint8_hwc"
    x = step("Cast", [raw], "float_hwc", to=onnx.TensorProto.FLOAT)
    x = step("Transpose", [x], "planes", perm=[0, 3, 1, 2])
    scales = step("Concat", [tensor(np.ones(2, np.float32), "unit_scales"), UPSCALE_INPUT, UPSCALE_INPUT], "scales", axis=0)
    x = step("Resize", [x, "", scales], "upscaled", mode="linear", coordinate_transformation_mode="half_pixel")
    x = step("Floor", [step("Add", [x, tensor(np.array(0.5, np.float32), "half")], "plus_half")], "rounded")
    pads = step("Concat", [tensor(np.zeros(6, np.int64), "no_pads"), PAD_INPUT], "pads", axis=0)
    x = step("Pad", [x, pads, tensor(np.array(fill, np.float32), "fill")], "padded", mode="constant")
    if bgr:
        x = step("Gather", [x, tensor(np.array([2, 1, 0], np.int64), "bgr_order")], "bgr", axis=1)
    nodes[-1].output[0] = name  # the last step feeds the network's own input
    graph.input.remove(planes)
    graph.input.insert(0, onnx.helper.make_tensor_value_info(raw, onnx.TensorProto.UINT8, ["N", "h", "w", 3]))
    graph.input.insert(1, onnx.helper.make_tensor_value_info(UPSCALE_INPUT, onnx.TensorProto.FLOAT, [1]))
    graph.input.insert(2, onnx.helper.make_tensor_value_info(PAD_INPUT, onnx.TensorProto.INT64, [2]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return model


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old exporters list weights as graph inputs, which blocks constant folding."""
    names = {init.name for init in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def session_options(options: OnnxOptions, cuda: bool) -> ort.SessionOptions:
    """Settings of a session. On a GPU the CPU thread pool only runs the odd node the CUDA
    provider lacks; left spinning between runs (ONNX Runtime's default), its threads would
    burn the cores a GPU worker's decoding and encoding threads need."""
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    if options.threads:
        settings.intra_op_num_threads = options.threads
    if cuda:
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return settings


class Session:
    """An ONNX Runtime session whose calls on the CUDA provider are made by ``gpu_runs`` threads
    of its own, so its memory arena is bounded by that, not by how many threads call it; a caller
    waits at most ``timeout_s`` for its answer (0: no limit), then gets a
    :class:`~anonymiser.errors.DeviceFailure`. On the CPU the caller runs it: memory there is the
    host's, each call already spreads over ONNX Runtime's own threads, and a CPU does not hang.

    Why threads of its own: a call on a hung GPU never returns (its copy back waits for ever on
    the device), and in a GPU worker CenterFace runs before LSC-CNN, so the task threads would
    all hang here, before LSC-CNN's own timeout could fail them over, while the worker's
    heartbeat kept it in rotation. A caller that stops waiting leaves the hung call to its
    daemon thread, whatever the call is doing.
    """

    def __init__(self, inner: ort.InferenceSession, gpu_runs: int, uint8_input: bool = False,
                 timeout_s: float = 0.0) -> None:
        self.inner = inner
        #: whether the model takes ``[N, h, w, 3]`` uint8 and upscales and pads it itself
        #: (:func:`take_uint8_hwc`)
        self.uint8_input = uint8_input
        #: seconds a call on the GPU waits for its answer (0: no limit); a GPU worker sets it
        self.timeout_s = timeout_s
        self._runs = gpu_runs if "CUDAExecutionProvider" in inner.get_providers() else 0
        self._calls: "queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]" = queue.SimpleQueue()
        self._runners_lock = threading.Lock()
        self._runners: list[threading.Thread] = []

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``InferenceSession.run``; on the GPU made by the session's threads, in turn (ONNX
        Runtime frees the GIL while it runs, so the waiting callers cost nothing)."""
        if not self._runs:
            return self.inner.run(output_names, feeds)
        self._start_runners()
        future: Future[list[np.ndarray]] = Future()
        self._calls.put((lambda: self.inner.run(output_names, feeds), future))
        try:
            return future.result(timeout=self.timeout_s or None)
        except TimeoutError:
            if future.done():
                # Answered as the wait ran out (or the call's own error is a TimeoutError): the
                # answer, not this wait's timeout, as in the LSC-CNN batcher.
                return future.result()
            future.cancel()  # still queued: never run it; running: left to its thread
            raise DeviceFailure(f"ONNX Runtime on CUDA gave no answer within {self.timeout_s:g} s") from None

    def _start_runners(self) -> None:
        with self._runners_lock:
            while len(self._runners) < self._runs:
                runner = threading.Thread(target=self._serve, name=f"onnx-gpu-run-{len(self._runners)}", daemon=True)
                runner.start()
                self._runners.append(runner)

    def _serve(self) -> None:
        while True:
            call, future = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited
            try:
                future.set_result(call())
            except BaseException as exc:  # the caller re-raises it
                future.set_exception(exc)
            del call, future  # nothing of a finished call (its tiles) stays with an idle thread

    def feeds(self, batch: NetInput) -> dict[str, np.ndarray]:
        """A batch of network inputs as this session's graph takes them."""
        feeds = {self.inner.get_inputs()[0].name: batch.pixels}
        if self.uint8_input:
            feeds[UPSCALE_INPUT] = np.array([batch.upscale], np.float32)
            feeds[PAD_INPUT] = np.array(batch.pad, np.int64)
        elif (batch.upscale, batch.pad) != (1, (0, 0)):
            raise ValueError("only a graph that takes the bytes upscales or pads them")
        return feeds

    def get_inputs(self) -> list[ort.NodeArg]:
        """The model's inputs."""
        return self.inner.get_inputs()

    def get_providers(self) -> list[str]:
        """The providers the session actually got (it falls back to the CPU on its own)."""
        return self.inner.get_providers()


def session(model: onnx.ModelProto, options: OnnxOptions | None = None, bgr: bool = False, fill: float = 0.0) -> Session:
    """An inference session for an in-memory model (weights never leave the process) that
    takes float ``[N, 3, H, W]`` planes, in BGR order when ``bgr``; or, with
    ``options.uint8_input``, the tiles' bytes, which it upscales and pads with ``fill`` itself
    (:func:`take_uint8_hwc`)."""
    options = options or OnnxOptions.from_env()
    chosen = providers()
    cuda = "CUDAExecutionProvider" in chosen
    if cuda:
        _share_cuda_libraries()
    uint8_input = cuda if options.uint8_input is None else bool(options.uint8_input)
    if uint8_input:
        model = take_uint8_hwc(model, bgr, fill)
    created = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(options, cuda),
                                   providers=[(p, options.cuda_provider_options()) if p == "CUDAExecutionProvider" else p for p in chosen])
    if cuda and "CUDAExecutionProvider" not in created.get_providers():
        # ONNX Runtime falls back to the CPU on its own when its CUDA libraries are missing or do
        # not match (e.g. a CUDA 12 torch next to a CUDA 13 onnxruntime-gpu): say so loudly.
        log.warning("onnx_cuda_unavailable", extra={"model": model.graph.name, "providers": ",".join(created.get_providers())})
    return Session(created, options.gpu_runs, uint8_input)
