"""Fixtures of the fleet tests: queues, routing, draining, metrics and the batching GPU worker.

They reuse the bot suite's machinery (``tests/bot``: throw-away redis-server, fake Mastodon,
worker environment) by importing it, and run several real Celery worker processes at once, each
with its own role, queues and pool. The listener's side (routing, draining, publishing) runs in
the test process with a Celery app of its own, so it never disturbs the bot suite's app.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bot"))

from bot_harness import REDIS_SERVER, VISIBILITY_TIMEOUT_S, RedisServer  # noqa: E402
from fake_mastodon import FakeMastodon  # noqa: E402
from fleet_harness import Fleet  # noqa: E402
from lsccnn_generated import generated_lsccnn_checkpoint  # noqa: E402

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(f"redis-server not found (looked for {REDIS_SERVER}); install it with apt-get install redis-server",
                    pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeMastodon]:
    server = FakeMastodon().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_app(redis_server: RedisServer) -> Iterator[Any]:
    """The listener's side: a Celery app of its own publishing to this module's Redis."""
    from celery import Celery

    app = Celery("fleet-tests", broker=redis_server.url, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    yield app
    app.pool.force_close_all()


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, fake: FakeMastodon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pool = Fleet(redis_server, fake, tmp_path_factory.mktemp("fleet"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def lsccnn_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A weights folder holding a generated LSC-CNN checkpoint (seeded random weights of the
    official shapes) under the official name, and its MD5 (for ``ANON_LSCCNN_MD5``)."""
    folder = tmp_path_factory.mktemp("lsccnn-weights")
    return folder, generated_lsccnn_checkpoint(folder)
