"""Every platform the bot can serve, one registration line each."""

from __future__ import annotations

from typing import Callable

from ..config import BotConfig
from .base import Platform


def _mastodon(config: BotConfig) -> Platform:
    from .mastodon import MastodonPlatform

    return MastodonPlatform(config.mastodon_base_url, config.mastodon_access_token)


def _x(config: BotConfig) -> Platform:
    from .x import XPlatform

    if "x" not in config.platforms:
        raise ValueError("X is not configured: set X_BEARER_TOKEN, X_API_KEY, X_API_SECRET, X_ACCESS_TOKEN, X_ACCESS_TOKEN_SECRET")
    return XPlatform(config.x_bearer_token, config.x_api_key, config.x_api_secret, config.x_access_token, config.x_access_token_secret)


PLATFORMS: dict[str, Callable[[BotConfig], Platform]] = {
    "mastodon": _mastodon,
    "x": _x,
}


def make(name: str, config: BotConfig) -> Platform:
    """The platform client called ``name``."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; known: {', '.join(PLATFORMS)}")
    return PLATFORMS[name](config)
