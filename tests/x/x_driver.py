"""Drives the real listener and handlers in-process: poll every channel, run every job."""

from __future__ import annotations

import socket
from typing import Any

from bot.config import BotConfig
from bot.handler import Job, MentionHandler
from bot.listener import Listener
from bot.takedown import TakedownHandler

#: what the fake media hosts resolve to: public addresses, so the real address check passes
ADDRESSES = {"pbs.twimg.com": "151.101.36.159", "files.mastodon.example": "151.101.64.10"}


class PublicDNS:
    """Stands in for the ``socket`` module inside ``bot.fetch`` only."""

    gaierror = socket.gaierror
    IPPROTO_TCP = socket.IPPROTO_TCP

    def getaddrinfo(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in ADDRESSES:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ADDRESSES[host], 0))]


def make_config(**overrides: Any) -> BotConfig:
    settings: dict[str, Any] = dict(max_media_bytes=4 * 1024 * 1024, media_timeout_s=5.0, max_attempts=3)
    settings.update(overrides)
    return BotConfig(**settings)


class Pipeline:
    """The listener (real cursors and first-sighting keys in Redis) feeding the real handlers."""

    def __init__(self, platform: Any, store: Any, anonymiser: Any, config: BotConfig, hashtags: tuple[str, ...] = ()) -> None:
        self.platform = platform
        self.store = store
        self.anonymiser = anonymiser
        self.config = config
        self.jobs: list[Job] = []
        self.listener = Listener(platform, store, self.jobs.append, hashtags, stream=False, poll_interval_s=0.05)

    def start(self) -> None:
        """The listener's first start: every channel's cursor begins at "now"."""
        for channel in self.listener.channels:
            self.listener.catch_up(channel)

    def poll(self) -> list[Job]:
        for channel in self.listener.channels:
            self.listener.catch_up(channel)
        jobs, self.jobs[:] = list(self.jobs), []
        return jobs

    def run(self, job: Job) -> str:
        """What ``bot.tasks.run_job`` does, with this test's platform, store and anonymiser."""
        if job.kind == "takedown":
            return TakedownHandler(self.platform, self.store, self.config.takedowns_per_account_per_hour).handle(job)
        return MentionHandler(self.platform, self.store, self.anonymiser, self.config).handle(job)

    def run_all(self) -> list[str]:
        return [self.run(job) for job in self.poll()]
