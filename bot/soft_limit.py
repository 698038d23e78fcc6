"""Holding Celery's soft time limit off the few steps that must not be cut in two.

A prefork worker's child gets SIGUSR1 at the soft time limit, and billiard's handler raises
``SoftTimeLimitExceeded`` wherever the run happens to be. Between posting a reply and recording
it, that meant a copy the takedown flow could not find (it was never recorded) and an apology,
by direct message, for a request that had just been answered. Within :func:`held` the signal is
only noted; the run finishes the step and goes on (what is left of a job after its reply is a
look or two). A run that hangs inside the step is still ended by the hard limit, and a retry
finds its reply by the idempotency key.

Signal handlers belong to the main thread: elsewhere (the thread pool, which enforces no time
limit anyway) this does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: the soft time limit's signal in billiard's prefork children (POSIX)
SOFT_LIMIT_SIGNAL = signal.SIGUSR1


@contextmanager
def held(step: str) -> Iterator[None]:
    """Run the block without the soft time limit raising inside it; ``step`` names it in the
    log line written when the limit passed meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(SOFT_LIMIT_SIGNAL)
    if not callable(previous):  # no handler installed: the signal would not raise anyway
        yield
        return
    passed: list[int] = []

    def note(signum: int, frame: Any) -> None:
        passed.append(signum)

    signal.signal(SOFT_LIMIT_SIGNAL, note)
    try:
        yield
    finally:
        signal.signal(SOFT_LIMIT_SIGNAL, previous)
        if passed:
            log.warning("soft_time_limit_held", extra={"step": step})
