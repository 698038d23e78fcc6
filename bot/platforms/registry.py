"""Every platform the bot can serve, one registration line each."""

from __future__ import annotations

from typing import Callable

from ..config import BotConfig
from .base import Platform


def _mastodon(config: BotConfig) -> Platform:
    from .mastodon import MastodonPlatform

    return MastodonPlatform(config.mastodon_base_url, config.mastodon_access_token)


PLATFORMS: dict[str, Callable[[BotConfig], Platform]] = {
    "mastodon": _mastodon,
}


def make(name: str, config: BotConfig) -> Platform:
    """The platform client called ``name``."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; known: {', '.join(PLATFORMS)}")
    return PLATFORMS[name](config)
