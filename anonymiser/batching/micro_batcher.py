"""Many threads, one engine: the micro-batcher a GPU worker's tasks share, and the locator on top.

A Celery worker with a thread pool runs one task per photo; each task's LSC-CNN call goes
through :class:`MicroBatcher`, whose device thread turns the calls that arrive together into
batches (README, "The GPU path"). Each caller prepares and decodes its own photo, so that CPU
work runs in the callers' threads while the device runs batches.
"""

from __future__ import annotations

import functools
import os
import queue as queue_module
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import DeviceFailure
from ..locators.base import BoxKind, Detections
from .agreement import PrecisionCheck
from .engine import DeviceBatch, LSCCNNEngine, Piece, without_traceback
from .options import EngineOptions, checkpoint_expectations

#: how often a waiting caller checks that the device thread still runs
_LIVENESS_CHECK_S = 1.0


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
                outcomes = [(members, without_traceback(exc))]  # type: ignore[list-item]
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
    from ..locators.lsccnn_checkpoint import OFFICIAL_FILENAME, load_model

    env = os.environ if environ is None else environ
    md5, size = checkpoint_expectations(env)
    model = load_model(Path(weights_dir) / OFFICIAL_FILENAME, expected_size=size, expected_md5=md5)
    engine = LSCCNNEngine(model, options or EngineOptions.from_env(env))
    engine.on_check = on_check
    return BatchedLSCCNNLocator(MicroBatcher(engine, on_batch=on_batch))

