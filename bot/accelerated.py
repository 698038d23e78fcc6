"""The anonymiser of a GPU worker (``BOT_WORKER_ROLE=gpu``).

Same locators as any worker (``ANON_LOCATORS``, else every one whose weights are present), but
LSC-CNN runs through :class:`anonymiser.batching.micro_batcher.MicroBatcher`: the worker runs with ``--pool
threads`` so that its tasks share one process, one model and one device; each task still handles
its own job end to end (fetch, decode, cover, encode, reply, idempotency, retries, dead
letters) and only its LSC-CNN call meets the other tasks' calls in a batch.

Why not ``celery-batches``: its latest release (0.11) requires ``celery<5.7`` and this project
runs Celery 5.7; and it hands a task a *list* of requests, which would make every job's reply,
retry and dead letter depend on its batch-mates. A micro-batcher inside the worker keeps the
task model unchanged and batches only the one call that benefits from it.

The ONNX locators (CenterFace, the head model) run on the GPU through ONNX Runtime's CUDA
provider when the image has ``onnxruntime-gpu`` (``anonymiser.locators.onnx_models``). There an
ONNX Runtime failure is the GPU's (a CUDA error, its memory exhausted), so it is raised as a
:class:`~anonymiser.errors.DeviceFailure`, like LSC-CNN's: the job goes to another worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from anonymiser.batching.agreement import PrecisionCheck
from anonymiser.batching.micro_batcher import load_batched_locator
from anonymiser.batching.options import CUDA_TIMEOUT_S, EngineOptions
from anonymiser.errors import DeviceFailure
from anonymiser.locators.base import BoxKind, Detections, HeadLocator
from anonymiser.locators.registry import REGISTRY, default_weights_dir, resolve_names
from anonymiser.pipeline import Anonymiser, Settings


def build_anonymiser(
    settings: Settings,
    weights_dir: Path | None = None,
    on_batch: Callable[[int, float], None] | None = None,
    on_success: Callable[[], None] | None = None,
    on_check: Callable[[PrecisionCheck], None] | None = None,
) -> Anonymiser:
    """An ``Anonymiser`` whose LSC-CNN locator (when its checkpoint is present) is batched.

    ``on_batch`` is called after each LSC-CNN batch, ``on_check`` after each check of its
    reduced precision against float32; ``on_success`` after each run of an ONNX
    locator on the GPU, but only when LSC-CNN is not among the locators: both tell the worker
    its device works (its failures in a row end). With LSC-CNN, its batches alone do: the ONNX
    models run first in every job, and their successes would hide an LSC-CNN that fails on every
    job, keeping a broken worker in rotation for good."""
    weights = weights_dir or default_weights_dir()
    names = resolve_names(settings.locators, weights)
    options = EngineOptions.from_env()  # ValueError names every bad ANON_LSCCNN_* variable
    on_success = None if "lsccnn" in names else on_success
    # The GPU's answer is awaited as long for an ONNX call as for an LSC-CNN batch.
    timeout_s = CUDA_TIMEOUT_S if options.timeout_s is None else options.timeout_s

    def load(name: str, folder: Path) -> HeadLocator:
        if name == "lsccnn":
            return load_batched_locator(folder, options, on_batch=on_batch, on_check=on_check)
        return on_device(REGISTRY[name].load(folder), on_success, timeout_s)

    # The residual pass's CenterFace comes from ``load`` too, so it is guarded like the others.
    return Anonymiser(settings, weights_dir=weights, load=load)


#: what ONNX Runtime raises when a run fails inside the session: a CUDA or cuDNN error
#: ("[ONNXRuntimeError] : 1 : FAIL : ... CUDA failure 2: out of memory"), its GPU memory arena
#: exhausted ("6 : RUNTIME_EXCEPTION : ... BFCArena::AllocateRawInternal Failed to allocate"),
#: the provider failing. All derive from Exception, not RuntimeError. InvalidArgument and the
#: model-loading errors are left alone: those are a bug or a bad file, not the device.
ONNX_RUN_ERRORS: tuple[type[Exception], ...] = (ort_errors.Fail, ort_errors.RuntimeException, ort_errors.EPFail)


class OnDeviceLocator:
    """An ONNX locator whose session runs on the GPU: its run failures are the device's.

    In a GPU worker CenterFace runs before LSC-CNN, so a GPU that fails (falls off the bus, runs
    out of memory) fails ONNX Runtime first. Raised as it is, that error is "a bug or an
    unexpected input" to the task: the job is dead-lettered and the requester told, and, no
    device failure being counted, the worker stays in rotation and does the same to every job.
    """

    def __init__(self, inner: Any, on_success: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.on_success = on_success
        self.name: str = inner.name
        self.kind: BoxKind = inner.kind

    def locate(self, rgb: np.ndarray) -> Detections:
        try:
            found = self.inner.locate(rgb)
        except ONNX_RUN_ERRORS as exc:
            raise DeviceFailure(f"{self.name} on CUDA failed: {type(exc).__name__}: {exc}") from exc
        if self.on_success is not None:
            self.on_success()
        return found


def on_device(locator: Any, on_success: Callable[[], None] | None = None, timeout_s: float = 0.0) -> Any:
    """``locator`` as :class:`OnDeviceLocator` when it holds an ONNX Runtime session on the
    CUDA provider, its calls waiting at most ``timeout_s`` for the GPU (0: no limit); unchanged
    otherwise (LSC-CNN's batcher raises DeviceFailure itself, and on the CPU an ONNX Runtime
    error is not a device failure)."""
    session = getattr(locator, "_session", None)
    if session is not None and "CUDAExecutionProvider" in session.get_providers():
        if hasattr(session, "timeout_s"):  # an onnx_models.Session
            session.timeout_s = timeout_s
        return OnDeviceLocator(locator, on_success)
    return locator
