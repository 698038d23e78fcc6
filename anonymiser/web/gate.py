"""How many image requests the local server holds and runs at once (memory stays bounded)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

#: image requests that may wait for a turn beside those running
DEFAULT_QUEUE = 8


class Busy(Exception):
    """No room in the queue."""


class Gate:
    """Admission and concurrency bound for image requests.

    ``admit()`` is entered before a body is read: at most ``max_concurrent + queue`` requests
    hold a body in memory at any time; one more is refused at once (``Busy``) rather than queued
    without bound. ``slot()`` is entered around the anonymisation itself: at most
    ``max_concurrent`` run at once, the others wait their turn (at most ``wait_s``).
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
