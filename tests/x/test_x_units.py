"""X configuration, references and text fitting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot import messages
from bot.config import BotConfig, ConfigError
from bot.platforms.registry import make
from bot.platforms.x import TWEET_LIMIT, XPlatform, _Includes
from bot.platforms.x_text import fit, marker, weighted_length
from bot.takedown import references

REPO = Path(__file__).resolve().parents[2]
X_ENV = {"X_BEARER_TOKEN": "b", "X_API_KEY": "k", "X_API_SECRET": "s", "X_ACCESS_TOKEN": "t", "X_ACCESS_TOKEN_SECRET": "ts"}
MASTODON_ENV = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "token"}


def problems(error: ConfigError) -> list[str]:
    return [line[4:] for line in str(error).splitlines() if line.startswith("  - ")]


def test_only_x_configured_needs_no_mastodon_variables() -> None:
    config = BotConfig.from_env(X_ENV)
    assert config.platforms == ("x",)
    assert (config.x_bearer_token, config.x_api_key, config.x_access_token_secret) == ("b", "k", "ts")
    assert isinstance(make("x", config), XPlatform)
    with pytest.raises(ValueError):
        make("x", BotConfig.from_env(MASTODON_ENV))


def test_a_partial_x_set_lists_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env({"X_API_KEY": "k", "X_ACCESS_TOKEN": " "})
    assert [p.split(" ", 1)[0] for p in problems(caught.value)] == [
        "X_BEARER_TOKEN", "X_API_SECRET", "X_ACCESS_TOKEN", "X_ACCESS_TOKEN_SECRET"]


def test_bot_platform_x_requires_the_x_variables() -> None:
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env({"BOT_PLATFORM": "x"})
    assert len(problems(caught.value)) == 5 and all(p.startswith("X_") for p in problems(caught.value))


def test_side_by_side_deployment_validates_both() -> None:
    config = BotConfig.from_env(MASTODON_ENV | X_ENV | {"BOT_PLATFORMS": "mastodon, x", "BOT_PLATFORM": "x"})
    assert config.platforms == ("mastodon", "x")
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env(X_ENV | {"BOT_PLATFORMS": "mastodon,x,myspace"})
    found = problems(caught.value)
    assert found[0].startswith("BOT_PLATFORMS: unknown platform 'myspace'")
    assert [p.split(" ", 1)[0] for p in found[1:]] == ["MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN"]


def test_mastodon_only_behaviour_is_unchanged() -> None:
    assert BotConfig.from_env(MASTODON_ENV).platforms == ("mastodon",)
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env({})
    assert [p.split(" ", 1)[0] for p in problems(caught.value)] == ["MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN"]


def test_x_listener_refuses_to_start_and_lists_the_problems() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTODON_", "BOT_", "REDIS_", "X_"))}
    done = subprocess.run([sys.executable, "-m", "bot", "listen"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env | {"BOT_PLATFORM": "x", "X_API_KEY": "k", "BOT_ENV_FILE": ""})
    assert done.returncode == 2
    assert "X_BEARER_TOKEN is not set" in done.stderr and "X_ACCESS_TOKEN_SECRET is not set" in done.stderr
    assert "MASTODON" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("reference, expected", [
    ("https://x.com/dave/status/1890000000000000123", "1890000000000000123"),
    ("https://twitter.com/dave/status/1890000000000000123?s=20&t=abc", "1890000000000000123"),
    ("https://mobile.twitter.com/dave/status/1890000000000000123/photo/1", "1890000000000000123"),
    ("https://www.x.com/i/web/status/1890000000000000123", "1890000000000000123"),
    ("http://twitter.com/dave/statuses/1890000000000000123).", "1890000000000000123"),
    ("1890000000000000123", "1890000000000000123"),
    # X's ids have at most 19 digits: a longer number (a bank account, a phone number with its
    # country code) names no tweet, and X answers it with a 400 rather than "not found"
    ("18900000000000001234", None),
    ("https://x.com/dave/status/18900000000000001234", None),
    ("https://x.com/dave", None),
    ("https://mastodon.social/@dave/1890000000000000123", None),
    ("https://evil.example/x.com/dave/status/1", None),
    ("https://x.com.evil.example/dave/status/1", None),
    ("\u0661\u0662\u0663", None),  # digits to str.isdigit, not a post id
    ("\u00b2", None),
])
def test_post_id_from_reference(reference: str, expected: str | None) -> None:
    assert XPlatform("b", "k", "s", "t", "ts").post_id_from_reference(reference) == expected


SHARED = "1578900353814519810"
BOTS_COPY = "1890000000000012345"


@pytest.mark.parametrize("event", [
    # X's documented DmEvent (docs.x.com/x-api/direct-messages/get-dm-events-by-id): the
    # entities at the event's top level
    {"text": "please delete https://t.co/AbCdEf123", "urls": [
        {"start": 14, "end": 37, "url": "https://t.co/AbCdEf123", "display_url": "x.com/protestbot/sta…",
         "expanded_url": f"https://x.com/protestbot/status/{BOTS_COPY}"}]},
    # a post shared into the DM, as in the TwitterDev sample response of GET /2/dm_events: its
    # t.co link in the text, the post in referenced_tweets
    {"text": "Simple Tweet link: https://t.co/IYFbRIdXHg", "referenced_tweets": [{"id": SHARED}]},
    {"text": "", "referenced_tweets": [{"id": SHARED}]},
    # the links nested as in a tweet, should X send them so
    {"text": "please delete https://t.co/AbCdEf123", "entities": {"urls": [
        {"start": 14, "end": 37, "url": "https://t.co/AbCdEf123", "expanded_url": f"https://x.com/protestbot/status/{BOTS_COPY}"}]}},
    # both: the post is named once
    {"text": "this one https://t.co/IYFbRIdXHg", "referenced_tweets": [{"id": SHARED}], "urls": [
        {"start": 9, "end": 32, "url": "https://t.co/IYFbRIdXHg", "expanded_url": f"https://x.com/dave/status/{SHARED}"}]},
])
def test_a_dm_names_the_posts_it_links_to_or_shares(event: dict) -> None:
    dm = XPlatform.parse_dm(dict(event, id="1890000000000099999", event_type="MessageCreate", sender_id="42"), _Includes())
    found = [XPlatform("b", "k", "s", "t", "ts").post_id_from_reference(r) for r in references(dm.text)]
    assert found == [SHARED if event.get("referenced_tweets") else BOTS_COPY]
    assert "t.co/" not in dm.text, "no link left that the bot cannot follow"


def test_replies_fit_in_a_tweet_and_keep_their_marker() -> None:
    code = marker("ppb-reply-x:1:2")
    assert len(code) == 10 and code != marker("ppb-reply-x:1:3")
    short = fit("@alice " + messages.NO_IMAGE, code, TWEET_LIMIT)
    assert short == "@alice " + messages.NO_IMAGE + f"\n\nref {code}"
    long_text = "@averylongname15 " + messages.reply_text(12, 4, ["image 3: the image file is damaged or empty"])
    fitted = fit(long_text, code, TWEET_LIMIT)
    assert weighted_length(fitted) <= TWEET_LIMIT and fitted.endswith(f"ref {code}")
    assert fitted.startswith("@averylongname15 Here is an anonymised copy (4 images, 12 heads covered).")
    assert "To have my copy deleted" in fitted, "the takedown hint survives; the caveat is in every alt text"
    cut = fit("word " * 100, code, TWEET_LIMIT)
    assert weighted_length(cut) <= TWEET_LIMIT and "…\n\nref" in cut
    assert weighted_length("日本語") == 6 and weighted_length("see https://example.org/a/very/long/path/indeed") == 27


def test_a_tweet_whose_author_is_missing_counts_as_protected() -> None:
    """``includes.users`` may leave an author out (suspended meanwhile, a partial answer): the
    tweet is then treated as a protected account's, answered by DM, never copied in public."""
    tweet = {"id": "5", "text": "crowd", "author_id": "7"}
    post = XPlatform.parse_tweet(tweet, _Includes())
    assert post.account.locked and post.visibility == "private"
    shown = _Includes().add({"users": [{"id": "7", "username": "dave", "protected": False}]})
    assert XPlatform.parse_tweet(tweet, shown).visibility == "public"


def test_withdrawal_checks_come_soon_then_weekly() -> None:
    from bot.withdrawal import STEPS_S, WEEK_S, next_check

    since = 1_000_000.0
    assert next_check(since, since) == since + 3600
    assert [next_check(since, since + step) for step in STEPS_S[:-1]] == [since + s for s in STEPS_S[1:]]
    assert next_check(since, since + STEPS_S[-1]) == since + 2 * WEEK_S
    assert next_check(since, since + 5 * WEEK_S + 1) == since + 6 * WEEK_S


def test_a_due_check_goes_to_one_listener_and_a_watch_ends(store: Any) -> None:
    """Two listeners of one platform sweep at once: each due original is checked by one of
    them; 90 days after its newest copy an original is no longer checked."""
    from bot.store import FIRST_CHECK_S, WATCH_FOR_S

    store.watch("x", "42", 0.0)
    store.watch("x", "42", 500.0)  # a second copy: the watch runs from it, the first check stays
    assert store.due_originals("x", FIRST_CHECK_S - 1, 10, 60) == []
    assert store.due_originals("x", FIRST_CHECK_S, 10, 60) == [("42", 500.0)]
    assert store.due_originals("x", FIRST_CHECK_S, 10, 60) == [], "claimed by the first caller"
    assert store.due_originals("x", FIRST_CHECK_S + 61, 10, 60) == [("42", 500.0)], "a claim not finished comes back"
    store.r.delete("ppb:watch_since:x:42")  # what expiry does WATCH_FOR_S after the newest copy
    assert WATCH_FOR_S == 90 * 24 * 3600
    assert store.due_originals("x", 10**9, 10, 60) == []
    assert store.r.zcard("ppb:watch:x") == 0


def test_copies_recorded_before_withdrawal_checks_are_watched_once_from_their_age(store: Any) -> None:
    """A listener started on an older deployment's Redis watches its recorded copies, once, from
    each newest copy's real age; copies past the 90 days are left alone; an original loses its
    watch only while it has no copy."""
    from bot.store import DONE_TTL_S, FIRST_CHECK_S

    now = 10_000_000.0
    for original, reply, age_days in (("7", "70", 2), ("9", "90", 120)):  # as an older version recorded them
        store.r.sadd(f"ppb:replies:x:{original}", reply)
        store.r.set(f"ppb:original_of:x:{reply}", original, ex=DONE_TTL_S - age_days * 86400)
    store.record_reply("x", "8", "80", "81", [], "public")  # recorded and watched by this version
    assert store.watch_recorded("x", now) == 1
    since = float(store.r.get("ppb:watch_since:x:7"))
    assert abs(since - (now - 2 * 86400)) < 5 and float(store.r.zscore("ppb:watch:x", "7")) == since + FIRST_CHECK_S
    assert store.r.zscore("ppb:watch:x", "9") is None, "older than 90 days"
    store.r.zrem("ppb:watch:x", "7")  # as when its watch ran out
    assert store.watch_recorded("x", now + 1) == 0, "once per platform, not at every start"
    assert store.r.zscore("ppb:watch:x", "7") is None
    assert store.copy_visibility("x", "81") == "public" and store.copy_visibility("x", "70") is None
    assert not store.unwatch_if_no_copies("x", "8")
    store.forget_reply("x", "8", "81")
    assert store.copy_visibility("x", "81") is None
    assert store.unwatch_if_no_copies("x", "8")
    assert store.r.zscore("ppb:watch:x", "8") is None and not store.r.exists("ppb:watch_since:x:8")


def test_a_watch_that_ran_out_is_dropped_but_one_renewed_by_a_new_copy_is_not(store: Any) -> None:
    """Claiming and the end of a watch are one script: a copy recorded just before the claim
    (which renews the watch) keeps its original watched."""
    import time as clock

    store.watch("x", "5", 0.0)
    store.r.delete("ppb:watch_since:x:5")  # ran out
    assert store.due_originals("x", 10**10, 10, 60) == []
    assert store.r.zscore("ppb:watch:x", "5") is None
    store.watch("x", "6", 0.0)
    store.r.delete("ppb:watch_since:x:6")
    store.record_reply("x", "6", "60", "61", [], "public")  # renews it before anyone claims
    [(original, since)] = store.due_originals("x", clock.time() + 4000, 10, 60)
    assert original == "6" and since > 0


def test_with_withdrawal_checks_off_only_ended_watches_are_dropped(store: Any) -> None:
    """``BOT_WITHDRAWAL_CHECKS=0``: workers still record a watch with each copy, so the listener's
    round drops the watches that ran out (reading nothing from the platform) instead of letting
    the list grow by every copied original; live watches keep their schedule, so a temporary
    0, or a second listener that does check, loses no original's checks."""
    import threading
    import time as clock
    from types import SimpleNamespace

    from bot import withdrawal

    store.watch("x", "1", 0.0)  # copied long ago: its since key has expired
    store.r.delete("ppb:watch_since:x:1")
    store.watch("x", "2", clock.time() - 2 * 86400)  # two days old, due, still watched
    store.record_reply("x", "3", "30", "31", [], "public")  # due an hour from now
    due_2 = store.r.zscore("ppb:watch:x", "2")
    stop = threading.Event()
    platform = SimpleNamespace(name="x")  # any platform call would fail: nothing may be read
    thread = threading.Thread(target=withdrawal.run, args=(platform, store, stop),
                              kwargs={"interval_s": 0.05, "per_round": 0})
    thread.start()
    deadline = clock.time() + 10
    while store.r.zscore("ppb:watch:x", "1") is not None and clock.time() < deadline:
        clock.sleep(0.05)
    stop.set()
    thread.join(5)
    assert sorted(store.r.zrange("ppb:watch:x", 0, -1)) == ["2", "3"]
    assert store.r.zscore("ppb:watch:x", "2") == due_2, "a live watch keeps its schedule"
    assert not store.r.exists("ppb:watch_backfilled:x"), "no backfill with the checks off"
    assert store.due_originals("x", clock.time(), 10, 60)[0][0] == "2", "checked once checks are on again"


def test_ended_watches_behind_live_ones_are_dropped_page_by_page(store: Any) -> None:
    """A watch checked before the checks were switched off can be due after younger live ones;
    the pages go on across calls, so it is dropped all the same."""
    store.watch("x", "old", 0.0)
    store.r.zadd("ppb:watch:x", {"old": 5000.0})  # its last check scheduled it late
    store.r.delete("ppb:watch_since:x:old")  # and its 90 days ran out
    for k in range(5):
        store.watch("x", f"young{k}", 100.0 + k)  # live, and due before "old"
        store.r.zadd("ppb:watch:x", {f"young{k}": 1000.0 + k})
    assert store.drop_ended_watches("x", 10_000.0, 0, limit=3) == (0, 3)
    assert store.drop_ended_watches("x", 10_000.0, 3, limit=3) == (1, 5)
    assert store.drop_ended_watches("x", 10_000.0, 5, limit=3) == (0, 0), "past the end: from the first again"
    assert sorted(store.r.zrange("ppb:watch:x", 0, -1)) == [f"young{k}" for k in range(5)]


def test_a_replayed_run_start_is_not_a_second_run(store: Any) -> None:
    """redis-py retries a command whose answer timed out: a run's start, replayed, must not count
    as another run (an INCR did, and two phantom losses dead-letter a healthy job); a count an
    older version kept as a number carries over."""
    assert store.run_started("t1", 60, run="a") == 1
    assert store.run_started("t1", 60, run="a") == 1, "the same start, replayed"
    assert store.run_started("t1", 60, run="b") == 2, "a second run: the first one was lost"
    assert 0 < store.r.ttl("ppb:running:t1") <= 60
    store.run_finished("t1")
    assert store.run_started("t1", 60) == 1
    store.r.set("ppb:running:t2", 2, ex=60)  # as an older version counted two starts
    assert store.run_started("t2", 60) == 3


def test_a_backlog_longer_than_the_pages_read_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """X lists DM events newest first, so after a long outage the oldest of more than
    MAX_PAGES x PAGE events are never listed, and the cursor moves past them: the log says so."""
    from bot.platforms.base import Account
    from bot.platforms.x import MAX_PAGES, PAGE

    cursor, count = 1000, MAX_PAGES * PAGE + 300
    events = [{"id": str(cursor + i), "event_type": "MessageCreate", "text": f"msg {i}", "sender_id": "2",
               "dm_conversation_id": "1-2"} for i in range(count, 0, -1)]

    def call(route: str, method: Any, *args: Any, pagination_token: str | None = None, **params: Any) -> dict:
        start = int(pagination_token or 0)
        page = events[start:start + params["max_results"]]
        more = start + len(page) < len(events)
        return {"data": page, "meta": {"next_token": str(start + len(page))} if more else {}}

    platform = XPlatform("b", "k", "s", "t", "ts")
    platform._me = Account(id="1", acct="ppbot")  # type: ignore[attr-defined]
    platform._call = call  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="bot.platforms.x"):
        listed = platform.dms_since(str(cursor))
    assert len(listed) == MAX_PAGES * PAGE
    [record] = [r for r in caplog.records if r.getMessage() == "backlog_truncated"]
    assert record.listed == MAX_PAGES * PAGE  # type: ignore[attr-defined]
    # a backlog that fits is read to its end without a word
    del events[MAX_PAGES * PAGE - 50:]
    caplog.clear()
    with caplog.at_level("WARNING", logger="bot.platforms.x"):
        assert len(platform.dms_since(str(cursor))) == len(events)
    assert not [r for r in caplog.records if r.getMessage() == "backlog_truncated"]


def test_a_dead_letters_reason_keeps_no_url_path(store: Any) -> None:
    """The dead-letter list outlives the logs, whose lines are cut back to hosts: its reasons
    are too, so no capability link to someone's original could be kept there."""
    store.dead_letter({"post_id": "1"}, "FetchError: https://files.example/media/secret-original.jpg?token=abc failed")
    [entry] = [e for e in store.dead_letters() if e["job"] == {"post_id": "1"}]
    assert "secret" not in entry["reason"] and "token" not in entry["reason"]
    assert entry["reason"].startswith("FetchError: https://files.example/")
