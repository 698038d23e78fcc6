"""bot/soft_limit.py: the soft time limit's signal is noted, not raised, inside a held step."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Iterator

import pytest

from bot import soft_limit


class Limit(Exception):
    """Stands in for billiard's SoftTimeLimitExceeded."""


@pytest.fixture
def billiard_handler() -> Iterator[Any]:
    """A SIGUSR1 handler that raises, as a prefork child's does."""
    def raising(signum: int, frame: Any) -> None:
        raise Limit()

    previous = signal.signal(signal.SIGUSR1, raising)
    yield raising
    signal.signal(signal.SIGUSR1, previous)


def _limit_passes() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)
    for _ in range(1000):  # Python runs handlers between bytecodes: give it some
        pass


def test_the_limit_raises_outside_a_held_step(billiard_handler: Any) -> None:
    with pytest.raises(Limit):
        _limit_passes()


def test_a_held_step_finishes_and_the_handler_comes_back(billiard_handler: Any, caplog: pytest.LogCaptureFixture) -> None:
    steps = []
    with caplog.at_level(logging.WARNING, logger="bot.soft_limit"):
        with soft_limit.held("reply"):
            steps.append("posted")
            _limit_passes()
            steps.append("recorded")
    assert steps == ["posted", "recorded"]
    assert [(r.getMessage(), r.step) for r in caplog.records] == [("soft_time_limit_held", "reply")]
    assert signal.getsignal(signal.SIGUSR1) is billiard_handler
    with pytest.raises(Limit):
        _limit_passes()


def test_an_error_inside_a_held_step_still_restores_the_handler(billiard_handler: Any) -> None:
    with pytest.raises(KeyError):
        with soft_limit.held("reply"):
            raise KeyError("the platform failed")
    assert signal.getsignal(signal.SIGUSR1) is billiard_handler


def test_off_the_main_thread_nothing_is_touched(billiard_handler: Any) -> None:
    """signal.signal works only in the main thread; the thread pool enforces no limit anyway."""
    seen = []

    def step() -> None:
        with soft_limit.held("reply"):
            seen.append(signal.getsignal(signal.SIGUSR1))

    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
    assert seen == [billiard_handler]
