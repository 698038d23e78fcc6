"""The anonymiser of a GPU worker (``BOT_WORKER_ROLE=gpu``).

Same locators as any worker (``ANON_LOCATORS``, else every one whose weights are present), but
LSC-CNN runs through :class:`anonymiser.batching.MicroBatcher`: the worker runs with ``--pool
threads`` so that its tasks share one process, one model and one device; each task still handles
its own job end to end (fetch, decode, cover, encode, reply, idempotency, retries, dead
letters) and only its LSC-CNN call meets the other tasks' calls in a batch.

Why not ``celery-batches``: its latest release (0.11) requires ``celery<5.7`` and this project
runs Celery 5.7; and it hands a task a *list* of requests, which would make every job's reply,
retry and dead letter depend on its batch-mates. A micro-batcher inside the worker keeps the
task model unchanged and batches only the one call that benefits from it.

The ONNX locators (CenterFace, the head model) run on the GPU through ONNX Runtime's CUDA
provider when the image has ``onnxruntime-gpu`` (``anonymiser.locators.onnx_models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from anonymiser.batching import EngineOptions, load_batched_locator
from anonymiser.locators.base import HeadLocator
from anonymiser.locators.registry import REGISTRY, default_weights_dir, resolve_names
from anonymiser.pipeline import Anonymiser, Settings


def build_anonymiser(
    settings: Settings,
    weights_dir: Path | None = None,
    on_batch: Callable[[int, float], None] | None = None,
) -> Anonymiser:
    """An ``Anonymiser`` whose LSC-CNN locator (when its checkpoint is present) is batched."""
    weights = weights_dir or default_weights_dir()
    names = resolve_names(settings.locators, weights)
    options = EngineOptions.from_env()  # ValueError names every bad ANON_LSCCNN_* variable
    locators: list[HeadLocator] = []
    for name in names:
        if name == "lsccnn":
            locators.append(load_batched_locator(weights, options, on_batch=on_batch))
        else:
            locators.append(REGISTRY[name].load(weights))
    return Anonymiser(settings, weights_dir=weights, locators=locators)
