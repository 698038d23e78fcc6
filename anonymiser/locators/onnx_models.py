"""Loading ONNX models for ONNX Runtime, on the GPU when its provider is present."""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort


def providers() -> list[str]:
    """CUDA first when ONNX Runtime was built with it, CPU always as the fallback."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old exporters list weights as graph inputs, which blocks constant folding."""
    names = {init.name for init in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """An inference session for an in-memory model (weights never leave the process)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or int(os.environ.get("ANON_ONNX_THREADS", "0") or 0)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers())
