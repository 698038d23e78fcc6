"""Fixtures of the bot's end-to-end tests: a real ``redis-server``, the fake Mastodon server, a
real Celery worker process (shared by the tests of the session) and listener threads.

Between tests the fake server is reset and Redis is emptied (except Kombu's exchange bindings,
which the long-lived worker and producer need to route messages), after waiting until the
worker has nothing queued or unacknowledged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from bot_harness import REDIS_SERVER, E2E, RedisServer, Workers, warm_up
from fake_mastodon import FakeMastodon


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(
            f"redis-server not found (looked for {REDIS_SERVER}). The bot tests run a real Redis: "
            "install it with `apt-get install redis-server` (scripts/redis does this; scripts/test runs it).",
            pytrace=False,
        )
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeMastodon]:
    fake = FakeMastodon().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def celery_app(redis_server: RedisServer) -> Any:
    """``bot.tasks.app`` in this process, publishing to the test Redis (the listener's side)."""
    from bot import tasks

    tasks.app.conf.broker_url = redis_server.url
    yield tasks.app
    tasks.app.pool.force_close_all()


@pytest.fixture(scope="session")
def workers(redis_server: RedisServer, fake_server: FakeMastodon, celery_app: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    pool = Workers(redis_server, fake_server, tmp_path_factory.mktemp("workers"))
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def listener_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Everything the ``bot`` loggers of this process (the listener) write, as JSON lines."""
    from bot.logs import JsonFormatter

    path = tmp_path_factory.mktemp("listener") / "listener.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bot")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    handler.close()


@pytest.fixture
def e2e(fake_server: FakeMastodon, redis_server: RedisServer, workers: Workers, celery_app: Any,
        listener_log: Path) -> Iterator[E2E]:
    harness = E2E(fake_server, redis_server, workers, celery_app)
    if not workers.alive():
        workers.start()
    harness.reset()
    if not workers.warm:
        warm_up(harness)
    yield harness
    harness.close()
