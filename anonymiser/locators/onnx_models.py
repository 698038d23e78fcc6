"""Loading ONNX models for ONNX Runtime, on the GPU when its provider is present."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

#: tiles per ONNX Runtime call on the GPU, where one call per tile would leave it mostly idle
CUDA_TILE_BATCH = 8
MAX_TILE_BATCH = 64
#: Tile shapes vary (small photos, a last partial batch): ONNX Runtime's default exhaustive cuDNN
#: search would run again for each new shape. And its default arena grows in powers of two,
#: taking GPU memory the LSC-CNN batch budget counts on.
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}


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


def _range_problems(threads: int, tile_batch: int | None) -> list[str]:
    """Each value out of range, named by its variable."""
    problems = []
    if threads < 0:
        problems.append(f"ANON_ONNX_THREADS must be at least 0, got {threads}")
    if tile_batch is not None and not 1 <= tile_batch <= MAX_TILE_BATCH:
        problems.append(f"ANON_ONNX_TILE_BATCH must be between 1 and {MAX_TILE_BATCH}, got {tile_batch}")
    return problems


@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX locators run.

    ``threads``: ONNX Runtime's intra-op threads (0: one per core). ``tile_batch``: tiles per
    call (None: 8 when the CUDA provider is active, 1 on CPU, where ONNX Runtime already spreads
    one tile over every core and a batch would only multiply activation memory).
    """

    threads: int = 0
    tile_batch: int | None = None

    def __post_init__(self) -> None:
        problems = _range_problems(self.threads, self.tile_batch)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OnnxOptions":
        """``ANON_ONNX_THREADS`` and ``ANON_ONNX_TILE_BATCH``; unset keeps the defaults.
        ``ValueError`` names every bad variable at once."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        problems = []
        for name, key in (("ANON_ONNX_THREADS", "threads"), ("ANON_ONNX_TILE_BATCH", "tile_batch")):
            raw = env.get(name, "").strip()
            if raw:
                try:
                    values[key] = int(raw)
                except ValueError:
                    problems.append(f"{name} must be an integer, got {raw!r}")
        problems += _range_problems(values.get("threads", 0), values.get("tile_batch"))
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**values)

    def batch_for(self, session: ort.InferenceSession) -> int:
        """The tile batch for a session, by the provider it actually got."""
        if self.tile_batch is not None:
            return self.tile_batch
        return CUDA_TILE_BATCH if "CUDAExecutionProvider" in session.get_providers() else 1


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


def session(model: onnx.ModelProto, options: OnnxOptions | None = None) -> ort.InferenceSession:
    """An inference session for an in-memory model (weights never leave the process)."""
    options = options or OnnxOptions.from_env()
    chosen = providers()
    if "CUDAExecutionProvider" in chosen:
        _share_cuda_libraries()
    created = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(options, "CUDAExecutionProvider" in chosen),
                                   providers=[(p, CUDA_PROVIDER_OPTIONS) if p == "CUDAExecutionProvider" else p for p in chosen])
    if "CUDAExecutionProvider" in chosen and "CUDAExecutionProvider" not in created.get_providers():
        # ONNX Runtime falls back to the CPU on its own when its CUDA libraries are missing or do
        # not match (e.g. a CUDA 12 torch next to a CUDA 13 onnxruntime-gpu): say so loudly.
        log.warning("onnx_cuda_unavailable", extra={"model": model.graph.name, "providers": ",".join(created.get_providers())})
    return created
