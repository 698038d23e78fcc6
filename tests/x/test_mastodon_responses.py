"""The in-process Mastodon fake answers the notifications API like Mastodon does, so that the
shared pipeline tests mean something for the filters the bot relies on."""

from __future__ import annotations

from typing import Any

import requests
import responses

from mastodon_responses import BASE, TOKEN, FakeMastodonHTTP


def listed(**params: Any) -> list[tuple[str, str]]:
    found = requests.get(f"{BASE}/api/v1/notifications", params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert found.status_code == 200
    return [(n["type"], n["account"]["username"]) for n in found.json()]


def test_types_and_exclude_types_choose_the_notifications(http: responses.RequestsMock) -> None:
    fake = FakeMastodonHTTP(http)
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    post = fake.status(fake.bot, "a copy")
    fake.notify("favourite", bob, post)
    fake.status(alice, "@protestbot hello", mentions=[fake.bot])
    fake.notify("follow", bob)
    assert listed() == [("follow", "bob"), ("mention", "alice"), ("favourite", "bob")]  # newest first
    assert listed(**{"types[]": "mention"}) == [("mention", "alice")]
    assert listed(**{"types[]": ["mention", "follow"]}) == [("follow", "bob"), ("mention", "alice")]
    assert listed(**{"exclude_types[]": "mention"}) == [("follow", "bob"), ("favourite", "bob")]


def test_a_strangers_direct_message_is_listed_only_with_include_filtered(http: responses.RequestsMock) -> None:
    # Mastodon 4.3's default policy files a private mention from an account the bot does not
    # follow under "filtered notifications"
    fake = FakeMastodonHTTP(http)
    carol, dave = fake.add_account("carol"), fake.add_account("dave")
    fake.status(carol, "@protestbot delete my photo", visibility="direct", mentions=[fake.bot])
    fake.status(carol, "@protestbot in public", mentions=[fake.bot])
    fake.following.add(dave["id"])
    fake.status(dave, "@protestbot from someone the bot follows", visibility="direct", mentions=[fake.bot])
    everyone = [("mention", "dave"), ("mention", "carol"), ("mention", "carol")]
    assert listed() == [("mention", "dave"), ("mention", "carol")]
    assert listed(include_filtered="false") == listed()
    assert listed(include_filtered="true") == everyone
    assert listed(**{"types[]": "mention", "include_filtered": "true"}) == everyone


def test_a_rate_limit_from_beyond_any_window_is_bounded(http: responses.RequestsMock) -> None:
    """A Retry-After of 400 digits reads as infinity, and an X-RateLimit-Reset in the year 9999
    as centuries: a job parked or a budget refused for ever. Both are bounded by the longest
    window either platform documents (X's 24 hours, plus an hour)."""
    import pytest

    from bot.platforms.base import MAX_RATE_LIMIT_WAIT_S, NotFound, RateLimited
    from bot.platforms.mastodon import MastodonPlatform

    mastodon = MastodonPlatform(BASE, TOKEN)
    http.get(f"{BASE}/api/v1/statuses/1", status=429, json={"error": "Too many requests"}, headers={"Retry-After": "9" * 400})
    with pytest.raises(RateLimited) as caught:
        mastodon.get_post("1")
    assert caught.value.retry_after_s == MAX_RATE_LIMIT_WAIT_S
    http.get(f"{BASE}/api/v1/statuses/2", status=404, json={"error": "Record not found"},
             headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "9999-12-31T23:59:59.000Z"})
    with pytest.raises(NotFound):
        mastodon.get_post("2")
    with pytest.raises(RateLimited) as refused:  # the budget is spent: refused locally, within the bound
        mastodon.get_post("3")
    assert 24 * 3600 < refused.value.retry_after_s <= MAX_RATE_LIMIT_WAIT_S
