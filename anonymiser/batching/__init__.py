"""Batched, size-bucketed LSC-CNN inference: the GPU path (and its CPU twin, which the tests run).

- :mod:`.options`: how the engine runs (``ANON_LSCCNN_*``), validated before any model loads;
- :mod:`.engine`: pieces, buckets, masked padding, precision and its float32 checks, the device;
- :mod:`.micro_batcher`: many task threads sharing one engine, and the locator a GPU worker uses;
- :mod:`.agreement`: how far two sets of detections agree (the checks, tests and benchmarks).

LSC-CNN's arithmetic per photo is counted in :mod:`anonymiser.locators.lsccnn_flops`.
"""
