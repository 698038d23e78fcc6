"""How many image requests the local server holds and runs at once (memory stays bounded)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

#: image requests that may wait for a turn beside those running
DEFAULT_QUEUE = 8


class Busy(Exception):
    """No room in the queue."""


class Gate:
    """Admission and concurrency bound for image requests.

    ``admit()`` is entered once a body is in: at most ``max_concurrent + queue`` requests wait
    for a turn or run; one more is refused at once (``Busy``) rather than queued without bound.
    ``slot()`` is entered around the anonymisation itself: at most ``max_concurrent`` run at
    once, the others wait their turn (at most ``wait_s``). Bodies still arriving are bounded by
    a :class:`BodyBudget`, not by a place here: ten clients trickling uploads held every place
    for two minutes each, and every other upload was refused.
    """

    def __init__(self, max_concurrent: int, queue: int = DEFAULT_QUEUE, wait_s: float = 300.0) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if queue < 0:
            raise ValueError("queue must not be negative")
        self.max_concurrent = max_concurrent
        self.capacity = max_concurrent + queue
        self.wait_s = wait_s
        self._slots = threading.Semaphore(max_concurrent)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests currently admitted (running or waiting)."""
        with self._lock:
            return self._admitted

    @property
    def full(self) -> bool:
        """Whether ``admit()`` would refuse now (checked before a body is read, so that a busy
        server refuses an upload without receiving it first)."""
        with self._lock:
            return self._admitted >= self.capacity

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self._admitted >= self.capacity:
                raise Busy()
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise Busy()
        try:
            yield
        finally:
            self._slots.release()


class BodyBudget:
    """Bytes of request bodies held in memory, counted as they arrive rather than as declared:
    a client trickling a large upload holds only what it has sent, and a body that would take
    the total past ``total`` is refused (``Busy``) wherever it has got to."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("the body budget must be at least 1 byte")
        self.total = total
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        """Bytes held now by all requests."""
        with self._lock:
            return self._held

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """``take(n)`` counts ``n`` more bytes of one request's body (``Busy`` past the total);
        all of them are given back when the block ends."""
        mine = 0

        def take(count: int) -> None:
            nonlocal mine
            with self._lock:
                if self._held + count > self.total:
                    raise Busy()
                self._held += count
            mine += count

        try:
            yield take
        finally:
            with self._lock:
                self._held -= mine
