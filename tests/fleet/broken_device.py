"""Imported before Celery starts a test worker (``Fleet.launch(preload=...)``): once the warm-up's
batch has run, every LSC-CNN batch fails as it does when a GPU falls off the bus."""

from __future__ import annotations

from anonymiser.batching.engine import LSCCNNEngine

_real = LSCCNNEngine.run_batch
_batches = 0


def _failing_run_batch(self, pieces, hb, wb, precision=None):  # type: ignore[no-untyped-def]
    global _batches
    _batches += 1
    if _batches > 1:
        raise RuntimeError("CUDA error: unspecified launch failure (simulated)")
    return _real(self, pieces, hb, wb, precision)


LSCCNNEngine.run_batch = _failing_run_batch  # type: ignore[method-assign]
