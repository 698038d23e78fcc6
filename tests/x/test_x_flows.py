"""X end to end, in-process: the fake X API (``responses``) <- the real XPlatform <- the real
listener (cursors in a real Redis) and handlers, with a CenterFace-only anonymiser."""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from bot import messages
from bot.handler import Job
from bot.listener import Listener
from bot.platforms.base import NotFound, PlatformError, RateLimited, RepliesClosed, ReplyDraft, ServerError, StreamUnavailable
from bot.platforms.x import FIRST_PAGE, XPlatform
from bot.store import FIRST_CHECK_S, Store
from bot.withdrawal import sweep
from bot_helpers import assert_anonymised, astronaut, face_box, jpeg, truncated_jpeg

from fake_x import BEARER, KEYS, FakeX, problem
from x_driver import Pipeline, make_config


def heads_in(alt_text: str) -> int:
    found = re.search(r"(\d+) heads? covered", alt_text)
    assert found, alt_text
    return int(found.group(1))


@pytest.fixture
def fake(http: Any) -> FakeX:
    return FakeX(http)


@pytest.fixture
def x() -> XPlatform:
    return XPlatform(BEARER, **KEYS)


@pytest.fixture
def bot(x: XPlatform, store: Store, anonymiser: Any) -> Pipeline:
    pipeline = Pipeline(x, store, anonymiser, make_config(platforms=("x",)), hashtags=("protest",))
    pipeline.start()
    return pipeline


def answered(fake: FakeX, bot: Pipeline, side: int = 256) -> tuple[dict, dict, dict, dict]:
    """dave's photo tweet, bob's request under it and the bot's reply; returns (dave, original, request, reply)."""
    dave, bob = fake.add_user("dave"), fake.add_user("bob")
    original = fake.tweet(dave, "Crowd at the square", media=[fake.photo(jpeg(side))])
    request = fake.tweet(bob, "@protestbot cover the faces please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    [reply] = fake.replies_to(request["id"])
    return dave, original, request, reply


# --------------------------------------------------------------------------- replies


def test_mention_with_photo_gets_reply_with_covered_image_and_alt_text(fake: FakeX, bot: Pipeline) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot please cover the faces", media=[fake.photo(jpeg(512))])

    jobs = bot.poll()
    assert [(j.platform, j.kind, j.post_id, j.requester_id) for j in jobs] == [("x", "mention", request["id"], alice["id"])]
    assert bot.run(jobs[0]) == "replied"

    assert fake.bot_tweets() == fake.replies_to(request["id"]), "exactly one tweet by the bot, in the thread"
    [reply] = fake.bot_tweets()
    assert reply["text"].startswith("@alice Here is an anonymised copy (1 image")
    assert re.search(r"\n\nref [0-9a-f]{10}$", reply["text"]), "the idempotency marker ends the text"
    [upload] = fake.media_of(reply)
    assert upload["category"] == "tweet_image"
    assert heads_in(upload["alt_text"]) >= 1 and "raised-fist" in upload["alt_text"]
    assert "sensitive_media_warning" not in upload["metadata"]
    assert_anonymised(upload["data"], astronaut(512), face_box(512))
    assert len(fake.photo_requests) == 1 and fake.photo_requests[0].endswith("?name=large")
    # the job carries ids only; the reply is recorded for takedowns
    assert bot.store.reply_for("x", request["id"], alice["id"]) == reply["id"]


def test_hashtags_are_not_watched_on_x_and_x_refuses_uninvited_replies(
    fake: FakeX, bot: Pipeline, x: XPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    """X forbids automated replies to people who did not ask, and its API refuses them since
    23 Feb 2026: with ``BOT_HASHTAGS`` set, the X listener still answers mentions only."""
    assert bot.listener.channels == ["mentions", "dms"]
    carol = fake.add_user("carol")
    post = fake.tweet(carol, "March for the climate #Protest", media=[fake.photo(jpeg(256))])
    assert bot.poll() == []
    assert not any(p == "/2/tweets/search/recent" for _, p in fake.log), "no hashtag search at all"
    with caplog.at_level("WARNING", logger="bot.listener"):
        Listener(x, bot.store, lambda job: None, hashtags=("protest",))
    assert [r.msg for r in caplog.records] == ["hashtags_not_watched"]
    # The fake is faithful to that refusal: a reply to a tweet that did not mention the bot.
    with pytest.raises(PlatformError) as refused:
        x.reply(ReplyDraft(in_reply_to=x.get_post(post["id"]), text="@carol hello", visibility="public"))
    assert refused.value.status == 403 and fake.bot_tweets() == []
    # A mention is still answered: its author mentioned the bot.
    request = fake.tweet(carol, "@protestbot cover the faces please", in_reply_to=post)
    assert bot.run_all() == ["replied"]
    assert len(fake.replies_to(request["id"])) == 1

def test_mention_replying_to_a_photo_tweet_anonymises_the_parent(fake: FakeX, bot: Pipeline) -> None:
    _, original, request, reply = answered(fake, bot, side=512)
    assert reply["text"].startswith("@bob Here is an anonymised copy")
    assert fake.replies_to(original["id"]) == [], "the answer goes to whoever asked, in their thread"
    assert_anonymised(fake.media_of(reply)[0]["data"], astronaut(512), face_box(512))


def test_quote_tweet_of_a_photo_is_anonymised(fake: FakeX, bot: Pipeline) -> None:
    dave, erin = fake.add_user("dave"), fake.add_user("erin")
    original = fake.tweet(dave, "Crowd at the square", media=[fake.photo(jpeg(256))])
    quote = fake.tweet(erin, "@protestbot can you cover these faces?", quote=original)
    assert bot.run_all() == ["replied"]
    [reply] = fake.replies_to(quote["id"])
    assert reply["text"].startswith("@erin Here is an anonymised copy (1 image")
    assert bot.store.reply_for("x", original["id"], erin["id"]) == reply["id"]


def test_only_photos_are_downloaded(fake: FakeX, bot: Pipeline) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot video and photo", media=[fake.video(), fake.photo(jpeg(256))])
    assert bot.run_all() == ["replied"]
    [reply] = fake.replies_to(request["id"])
    assert "(1 image" in reply["text"] and len(fake.photo_requests) == 1


def test_corrupt_media_gets_a_polite_reply(fake: FakeX, bot: Pipeline) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot broken upload", media=[fake.photo(truncated_jpeg(256))])
    assert bot.run_all() == ["failed"]
    [reply] = fake.replies_to(request["id"])
    assert reply["text"].startswith("@alice " + messages.failed_all(["image 1: the image file is damaged or empty"]))
    assert "attachments" not in reply and fake.uploads == {}


# --------------------------------------------------------------------------- listener


@pytest.mark.parametrize("tier", ["basic", "rules-only"])
def test_listener_polls_when_the_filtered_stream_is_refused_with_403(fake: FakeX, x: XPlatform, store: Store, tier: str) -> None:
    fake.tier = tier
    jobs: list[Job] = []
    listener = Listener(x, store, jobs.append, stream=True, poll_interval_s=0.05)
    assert listener.channels == ["mentions", "dms"]
    listener.catch_up("mentions")  # first start: the cursor begins now
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        alice = fake.add_user("alice")
        request = fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(64))])
        deadline = time.time() + 10
        while not jobs and time.time() < deadline:
            time.sleep(0.02)
    finally:
        listener.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [(j.kind, j.post_id) for j in jobs] == [("mention", request["id"])], "polled once the stream was refused"
    refused = "/2/tweets/search/stream/rules" if tier == "basic" else "/2/tweets/search/stream"
    assert fake.count("GET", refused) >= 1
    assert fake.count("GET", r"/2/users/\d+/mentions") >= 2


def test_listener_streams_on_a_tier_that_allows_it(fake: FakeX, x: XPlatform, store: Store) -> None:
    fake.tier = "pro"
    alice = fake.add_user("alice")
    store.set_cursor("x", "mentions", "0")
    stream_only = fake.tweet(alice, "@protestbot streamed", media=[fake.photo(jpeg(64))])
    other = fake.tweet(alice, "not for the bot #elsewhere")
    fake.stream_lines = [stream_only["id"], other["id"]]
    jobs: list[Job] = []
    listener = Listener(x, store, jobs.append, stream=True, poll_interval_s=0.05)
    events = [e for e in _until_end(x.stream("mentions")) if e is not None]
    assert [e.post.id for e in events] == [stream_only["id"]]
    assert events[0].post.text == "@protestbot streamed", "t.co link to the tweet's own photo removed"
    assert {r["tag"]: r["value"] for r in fake.rules} == {"ppb:mentions": "@protestbot -from:protestbot -is:retweet"}
    listener.handle("mentions", events[0])
    assert [j.post_id for j in jobs] == [stream_only["id"]]
    with pytest.raises(StreamUnavailable):
        list(x.stream("mentions"))  # a second connection reuses the rule; this stream just ends
    assert len(fake.rules) == 1


def test_retweets_of_a_mention_move_the_cursor_and_never_bring_back_history(
        fake: FakeX, x: XPlatform, store: Store, anonymiser: Any) -> None:
    """The mentions timeline lists retweets of a tweet that mentions the bot ("RT @alice: ...
    @protestbot"). They are not requests, but they must move the cursor: at the first start a
    page of nothing but retweets used to leave the cursor at "0" (no history at all), and the
    next poll then answered every old request in the account's history."""
    alice = fake.add_user("alice")
    old = fake.tweet(alice, "@protestbot please cover the faces", media=[fake.photo(jpeg(64))])
    retweets = [fake.retweet(fake.add_user(f"fan{n}"), old) for n in range(FIRST_PAGE)]
    pipeline = Pipeline(x, store, anonymiser, make_config(platforms=("x",)))
    pipeline.start()
    assert pipeline.poll() == [], "history before the first start is not answered"
    assert store.cursor("x", "mentions") == retweets[-1]["id"]
    later = fake.retweet(fake.add_user("latecomer"), old)
    assert pipeline.poll() == []
    assert store.cursor("x", "mentions") == later["id"], "moved past the retweet, so not read again"
    new = fake.tweet(alice, "@protestbot and this one", media=[fake.photo(jpeg(64))])
    assert [(j.kind, j.post_id) for j in pipeline.poll()] == [("mention", new["id"])]


@pytest.mark.parametrize("channel", ["mentions", "dms"])
def test_an_unreadable_item_is_passed_over_and_later_ones_answered(
        fake: FakeX, x: XPlatform, store: Store, anonymiser: Any, caplog: pytest.LogCaptureFixture, channel: str) -> None:
    """An item whose JSON is odd (X never sends such, but a change or a bug on its side can)
    must not stop the channel at it for good: it is logged and passed over, and the requests
    after it are answered."""
    alice = fake.add_user("alice")
    pipeline = Pipeline(x, store, anonymiser, make_config(platforms=("x",)))
    pipeline.start()
    assert pipeline.poll() == []
    if channel == "mentions":
        odd = fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(64))])
        odd["referenced_tweets"] = ["odd"]  # strings where objects belong
        later = fake.tweet(alice, "@protestbot and this one", media=[fake.photo(jpeg(64))])
    else:
        odd = fake.dm(alice, "delete 123")
        odd["attachments"] = ["odd"]
        later = fake.dm(alice, "delete 456")
    with caplog.at_level(logging.WARNING, logger="bot.platforms.x"):
        assert [j.post_id for j in pipeline.poll()] == [later["id"] if channel == "mentions" else f"dm:{later['id']}"]
    assert store.cursor("x", channel) == later["id"]
    assert [(r.item_id, r.error) for r in caplog.records if r.getMessage() == "unreadable_item"] == [(odd["id"], "AttributeError")]


def test_an_unreadable_streamed_tweet_is_passed_over(fake: FakeX, x: XPlatform, store: Store) -> None:
    fake.tier = "pro"
    alice = fake.add_user("alice")
    odd = fake.tweet(alice, "@protestbot streamed", media=[fake.photo(jpeg(64))])
    odd["note_tweet"] = "odd"  # a string where an object belongs
    fine = fake.tweet(alice, "@protestbot fine")
    fake.stream_lines = [odd["id"], fine["id"]]
    events = [e for e in _until_end(x.stream("mentions")) if e is not None]
    assert [(e.id, e.skip) for e in events] == [(odd["id"], True), (fine["id"], False)]
    jobs: list[Job] = []
    listener = Listener(x, store, jobs.append, stream=True)
    for event in events:
        listener.handle("mentions", event)
    assert [j.post_id for j in jobs] == [fine["id"]]


def test_a_protected_accounts_mention_is_not_lost_while_streaming(
        fake: FakeX, x: XPlatform, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """X's filtered stream never carries a protected account's tweets: only the poll lists them.
    A public mention streamed after one from a protected account used to move the cursor past
    it, and every later poll (the catch-up after the stream, the periodic one) started after it."""
    fake.tier = "pro"
    alice, carol = fake.add_user("alice"), fake.add_user("carol", protected=True)
    jobs: list[Job] = []
    listener = Listener(x, store, jobs.append, stream=True, poll_interval_s=0.05)
    listener.catch_up("mentions")  # first start: the cursor begins now
    first = fake.tweet(alice, "@protestbot one", media=[fake.photo(jpeg(64))])
    protected = fake.tweet(carol, "@protestbot mine, for my followers", media=[fake.photo(jpeg(64))])
    second = fake.tweet(alice, "@protestbot two", media=[fake.photo(jpeg(64))])
    fake.unlisted = {protected["id"], second["id"]}  # posted after the first was streamed
    fake.stream_lines = [first["id"], second["id"]]
    stream = x.stream

    def posted_meanwhile(channel: str) -> Any:
        for event in stream(channel):
            yield event
            fake.unlisted.clear()  # the listener has polled and handled the first: now they come

    monkeypatch.setattr(x, "stream", posted_meanwhile)
    thread = threading.Thread(target=listener.run_channel, args=("mentions",), daemon=True)
    thread.start()
    try:
        deadline = time.time() + 5
        while len(jobs) < 3 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        listener.stop.set()
        thread.join(10)
    assert sorted(j.post_id for j in jobs) == sorted([first["id"], protected["id"], second["id"]])


def _until_end(stream: Any) -> list[Any]:
    """Everything a stream yields until it ends (the fake's streams end after their lines)."""
    out: list[Any] = []
    with pytest.raises(StreamUnavailable, match="stream ended"):
        for item in stream:
            out.append(item)
    return out


# --------------------------------------------------------------------------- takedown


@pytest.mark.parametrize("reference", ["reply url", "original url", "mobile original url", "i/web reply url", "reply id"])
def test_takedown_by_dm_deletes_only_the_bots_reply_and_confirms(fake: FakeX, bot: Pipeline, reference: str) -> None:
    dave, original, request, reply = answered(fake, bot)
    named = {
        "reply url": f"https://x.com/protestbot/status/{reply['id']}",
        "original url": f"https://twitter.com/dave/status/{original['id']}?s=20",
        "mobile original url": f"https://mobile.twitter.com/dave/status/{original['id']}/photo/1",
        "i/web reply url": f"https://x.com/i/web/status/{reply['id']}",
        "reply id": reply["id"],
    }[reference]
    carol = fake.add_user("carol")  # someone in the photo, not the requester
    if named.startswith("http"):  # X wraps links in DMs in t.co
        fake.dm(carol, "I am in this photo, please delete https://t.co/AbCd123", links={"https://t.co/AbCd123": named})
    else:
        fake.dm(carol, f"please delete {named}")

    jobs = bot.poll()
    assert [j.kind for j in jobs] == ["takedown"] and jobs[0].post_id.startswith("dm:")
    assert bot.run(jobs[0]) == "deleted"
    assert fake.deleted == [reply["id"]], "only the bot's own reply"
    assert original["id"] in fake.tweets and request["id"] in fake.tweets
    [confirmation] = fake.bot_dms(to=carol)
    assert confirmation["text"].startswith(messages.TAKEDOWN_DONE.format(count=1))
    # the same DM seen again (redelivery) is not handled twice
    assert bot.run(jobs[0]) == "already_done"
    assert len(fake.bot_dms(to=carol)) == 1


def test_a_long_number_in_a_takedown_dm_does_not_sink_it(fake: FakeX, bot: Pipeline) -> None:
    # X answers an id of more than 19 digits with a 400, not "not found": such a number (an IBAN's
    # digits, a phone number) must count as naming nothing, not fail the whole takedown.
    dave, original, request, reply = answered(fake, bot)
    carol = fake.add_user("carol")
    fake.dm(carol, f"please delete {reply['id']}, reach me at 004915112345678901234")
    assert bot.run_all() == ["deleted"]
    assert fake.deleted == [reply["id"]]
    [confirmation] = fake.bot_dms(to=carol)
    assert messages.takedown_unknown(1) in confirmation["text"]


@pytest.mark.parametrize("shared", ["reply", "original"])
def test_takedown_by_sharing_the_copy_or_the_original_into_a_dm(fake: FakeX, bot: Pipeline, shared: str) -> None:
    # X's "Send via Direct Message": the post as a t.co link and the event's referenced_tweets
    dave, original, request, reply = answered(fake, bot)
    carol = fake.add_user("carol")
    fake.dm(carol, "please delete this", shares=[reply if shared == "reply" else original])
    assert bot.run_all() == ["deleted"]
    assert fake.deleted == [reply["id"]] and original["id"] in fake.tweets
    [confirmation] = fake.bot_dms(to=carol)
    assert confirmation["text"].split("\n\nref ")[0] == messages.TAKEDOWN_DONE.format(count=1), "no link it did not know"


def test_the_versions_of_an_edited_tweet_are_one_post_for_copies_and_takedowns(fake: FakeX, bot: Pipeline) -> None:
    """Each edit is a new tweet: a request under the newest version, a takedown naming the
    version X shows now, and a request under a version made after the takedown all meet in the
    record of the first version; none of them used to."""
    dave, original, request, reply = answered(fake, bot)
    second = fake.edit(original, "Crowd at the square (edited)")
    erin = fake.add_user("erin")
    later = fake.tweet(erin, "@protestbot cover please", in_reply_to=second)
    assert bot.run_all() == ["replied"]
    [erins] = fake.replies_to(later["id"])
    assert bot.store.replies_of("x", original["id"]) == {reply["id"], erins["id"]}
    assert bot.run_all() == [], "one record: bob's request is not taken for a new one"

    third = fake.edit(second, "Crowd at the square (edited again)")  # a version no record names
    carol = fake.add_user("carol")
    fake.dm(carol, "I am in this photo, please delete https://t.co/Ed1t",
            links={"https://t.co/Ed1t": f"https://x.com/dave/status/{third['id']}"})
    assert bot.run_all() == ["deleted"]
    assert sorted(fake.deleted) == sorted([reply["id"], erins["id"]])
    [confirmation] = fake.bot_dms(to=carol)
    assert confirmation["text"].startswith(messages.TAKEDOWN_DONE.format(count=2))

    fourth = fake.edit(third, "Crowd at the square (edited after the takedown)")
    for version in (original, second, third, fourth):
        fake.tweet(fake.add_user(f"asker{version['id'][-5:]}"), "@protestbot cover please", in_reply_to=version)
    assert bot.run_all() == ["taken_down"] * 4
    assert not [t for t in fake.bot_tweets() if fake.media_of(t)], "no new copy under any version"


def test_the_fake_edits_only_what_x_lets_authors_edit(fake: FakeX) -> None:
    """X edits a post at most five times and never a reply to someone else (docs.x.com,
    "Edit posts"): the fake refuses both, so no test builds on a world X never shows."""
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    post = fake.tweet(alice, "Crowd at the square")
    with pytest.raises(AssertionError, match="reply to someone else"):
        fake.edit(fake.tweet(bob, "@protestbot cover please", in_reply_to=post), "@protestbot cover this please")
    own_thread = fake.edit(fake.tweet(alice, "more photos below", in_reply_to=post), "more photos below:")
    assert len(own_thread["edit_history_tweet_ids"]) == 2
    for n in range(5):
        post = fake.edit(post, f"Crowd at the square ({n + 1})")
    with pytest.raises(AssertionError, match="5 edits"):
        fake.edit(post, "Crowd at the square (6)")


def test_an_edited_request_is_not_answered_again(fake: FakeX, bot: Pipeline) -> None:
    """The mentions timeline lists each version of an edited mention: a typo fixed is not a
    second request, for a copy or for a note."""
    alice = fake.add_user("alice")
    question = fake.tweet(alice, "@protestbot what do you do?")
    photo = fake.tweet(alice, "@protestbot cover these", media=[fake.photo(jpeg(256))])
    assert sorted(bot.run_all()) == ["no_image", "replied"]
    edited = [fake.edit(question, "@protestbot what do you do exactly?"), fake.edit(photo, "@protestbot cover these please")]
    assert bot.poll() == [], "the listener sights a mention by its first version"
    # and a job for a later version (queued by an older listener) finds the first one's answer
    for version in edited:
        assert bot.run(Job(platform="x", post_id=version["id"], requester_id=alice["id"], kind="mention")) == "already_done"
    assert len(fake.bot_tweets()) == 2


def test_takedown_without_a_reference_gets_help(fake: FakeX, bot: Pipeline) -> None:
    carol = fake.add_user("carol")
    fake.dm(carol, "hello, how does this work?")
    assert bot.run_all() == ["no_reference"]
    [answer] = fake.bot_dms(to=carol)
    assert answer["text"].startswith(messages.TAKEDOWN_HELP) and fake.deleted == []


def test_messages_in_a_group_conversation_are_not_requests(fake: FakeX, bot: Pipeline) -> None:
    """GET /2/dm_events lists the messages of group conversations the bot was added to as well:
    they are the group's talk, and each of them used to get a help DM of its own."""
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    group = fake.group(alice, bob)
    fake.dm(alice, "hello everyone", group=group)
    fake.dm(bob, "how does one delete a photo here?", group=group)
    last = fake.dm(alice, "delete 1234567890", group=group)
    assert bot.poll() == []
    assert bot.store.cursor("x", "dms") == last["id"], "moved past them, so not fetched again"
    carol = fake.add_user("carol")
    fake.dm(carol, "hello, how does this work?")
    assert bot.run_all() == ["no_reference"]
    assert fake.bot_dms() == fake.bot_dms(to=carol) and len(fake.bot_dms()) == 1


def test_how_to_ask_is_said_to_an_account_once_an_hour(fake: FakeX, bot: Pipeline) -> None:
    carol = fake.add_user("carol")
    fake.dm(carol, "can you cover the faces?", media=[fake.photo(jpeg(64))])
    fake.dm(carol, "hello?")
    fake.dm(carol, "anyone there?")
    assert bot.run_all() == ["dm_photo", "helped_recently", "helped_recently"]
    [answer] = fake.bot_dms(to=carol)
    assert answer["text"].startswith(messages.DM_PHOTO)
    fake.dm(carol, "delete 1234567890")
    assert bot.run_all() == ["nothing_deleted"], "a request is still answered"


# --------------------------------------------------------------------------- idempotency


def test_no_double_reply_when_the_job_runs_twice(fake: FakeX, bot: Pipeline) -> None:
    alice = fake.add_user("alice")
    fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(256))])
    [job] = bot.poll()
    assert bot.run(job) == "replied"
    assert bot.run(job) == "already_done"
    assert len(fake.bot_tweets()) == 1


def _fail_once(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    original = getattr(Store, name)
    calls = {"n": 0}

    def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("Redis went away after the post")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, name, flaky)


def test_no_double_reply_when_the_first_run_crashed_between_posting_and_recording(
        fake: FakeX, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(256))])
    [job] = bot.poll()
    _fail_once(monkeypatch, "record_reply")
    with pytest.raises(redis.ConnectionError):
        bot.run(job)
    assert len(fake.bot_tweets()) == 1, "the first run did post"
    assert bot.run(job) == "replied"  # the redelivered job finds the reply by its marker
    [reply] = fake.bot_tweets()
    assert fake.count("POST", "/2/tweets") == 1
    assert bot.store.reply_for("x", request["id"], alice["id"]) == reply["id"]


def test_duplicate_refusal_is_the_backstop_while_the_timeline_lags(fake: FakeX, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = fake.add_user("alice")
    fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(256))])
    [job] = bot.poll()
    _fail_once(monkeypatch, "record_reply")
    with pytest.raises(redis.ConnectionError):
        bot.run(job)
    fake.timeline_lag = 1  # the bot's new tweet is not listed yet
    with pytest.raises(ServerError) as caught:
        bot.run(job)
    assert caught.value.retryable and caught.value.status == 403
    fake.timeline_lag = 0
    assert bot.run(job) == "replied"
    assert len(fake.bot_tweets()) == 1


def test_no_double_note_when_recording_the_answer_failed(fake: FakeX, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot hello")
    [job] = bot.poll()
    _fail_once(monkeypatch, "mark_done")
    with pytest.raises(redis.ConnectionError):
        bot.run(job)
    assert bot.run(job) == "no_image"
    [answer] = fake.replies_to(request["id"])
    assert messages.NO_IMAGE in answer["text"] and len(fake.bot_tweets()) == 1


# --------------------------------------------------------------------------- rate limits


def test_429_on_create_tweet_becomes_rate_limited_with_the_reset_wait(fake: FakeX, bot: Pipeline, x: XPlatform,
                                                                     store: Store, anonymiser: Any) -> None:
    from bot.tasks import backoff_s

    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot please", media=[fake.photo(jpeg(256))])
    reset = int(time.time()) + 120
    fake.fail("POST /2/tweets", 429, {"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429},
              headers={"x-rate-limit-limit": "100", "x-rate-limit-remaining": "0", "x-rate-limit-reset": str(reset)})
    [job] = bot.poll()
    with pytest.raises(RateLimited) as caught:
        bot.run(job)
    assert 115 <= caught.value.retry_after_s <= 121
    assert 115 <= backoff_s(1, caught.value) <= 121, "the task retries after X's reset"
    posts = fake.count("POST", "/2/tweets")
    uploads = fake.count("POST", "/2/media/upload")
    with pytest.raises(RateLimited):
        bot.run(job)  # until the reset this client does not even try (nor upload)
    assert fake.count("POST", "/2/tweets") == posts and fake.count("POST", "/2/media/upload") == uploads
    # after the reset (here: a fresh worker process), the retried job posts once
    later = Pipeline(XPlatform(BEARER, **KEYS), store, anonymiser, bot.config)
    assert later.run(job) == "replied"
    assert len(fake.replies_to(request["id"])) == 1


def test_spent_budget_from_successful_answers_is_respected(fake: FakeX, x: XPlatform) -> None:
    fake.fail("GET /2/users/:id/mentions", 200, {"meta": {"result_count": 0}},
              headers={"x-rate-limit-remaining": "0", "x-rate-limit-reset": str(int(time.time()) + 60)})
    assert x.mentions_since("0") == []
    before = fake.count("GET", r"/2/users/\d+/mentions")
    with pytest.raises(RateLimited) as caught:
        x.mentions_since("0")
    assert 55 <= caught.value.retry_after_s <= 61 and fake.count("GET", r"/2/users/\d+/mentions") == before
    tweet = fake.tweet(fake.bot, "other endpoints keep their own budget")
    assert x.get_post(tweet["id"]).id == tweet["id"]


@pytest.mark.parametrize("status", [200, 429])
def test_a_reset_from_beyond_any_window_is_bounded(fake: FakeX, x: XPlatform, status: int) -> None:
    """A reset header of 400 digits reads as infinity (a year 9999 date as centuries): the
    route was refused locally for ever, and the job parked for ever. The longest documented
    window, X's 24-hour posting limits, bounds it (plus an hour)."""
    from bot.platforms.base import MAX_RATE_LIMIT_WAIT_S

    body = {"meta": {"result_count": 0}} if status == 200 else {"title": "Too Many Requests", "status": 429}
    fake.fail("GET /2/users/:id/mentions", status, body, headers={"x-rate-limit-remaining": "0", "x-rate-limit-reset": "9" * 400})
    if status == 200:
        x.mentions_since("0")
    with pytest.raises(RateLimited) as caught:
        x.mentions_since("0")
    assert MAX_RATE_LIMIT_WAIT_S == 25 * 3600 and 24 * 3600 < caught.value.retry_after_s <= MAX_RATE_LIMIT_WAIT_S
    with pytest.raises(RateLimited) as again:  # refused locally, still within the bound
        x.mentions_since("0")
    assert again.value.retry_after_s <= MAX_RATE_LIMIT_WAIT_S


# --------------------------------------------------------------------------- protected accounts


def test_protected_authors_photo_is_answered_by_dm_never_in_public(fake: FakeX, bot: Pipeline) -> None:
    dave = fake.add_user("dave", protected=True)
    bob = fake.add_user("bob")
    original = fake.tweet(dave, "Only for my followers", media=[fake.photo(jpeg(512)), fake.photo(jpeg(256))])
    request = fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]

    assert fake.bot_tweets() == [] and fake.count("POST", "/2/tweets") == 0, "never a public tweet"
    first, second = fake.bot_dms(to=bob)
    assert first["text"].startswith("Here is an anonymised copy (2 images")
    assert second["text"].startswith("Image 2 of 2.")
    uploads = fake.media_of(first) + fake.media_of(second)
    assert [u["category"] for u in uploads] == ["dm_image", "dm_image"]
    assert_anonymised(uploads[0]["data"], astronaut(512), face_box(512))
    assert all(heads_in(u["alt_text"]) >= 1 for u in uploads)
    reply_id = bot.store.reply_for("x", original["id"], bob["id"])
    assert reply_id == f"dm:{first['id']}+{second['id']}", "the copy is both messages"

    # a takedown of that copy deletes both of the bot's DMs
    carol = fake.add_user("carol")
    fake.dm(carol, "delete https://t.co/q1", links={"https://t.co/q1": f"https://x.com/dave/status/{original['id']}"})
    assert bot.run_all() == ["deleted"]
    assert fake.deleted_dms == [first["id"], second["id"]] and fake.deleted == []
    assert request["id"] in fake.tweets
    # X deletes a DM on the bot's side only: the confirmation says so, without telling carol
    # how many copies went to other people's inboxes
    [confirmation] = fake.bot_dms(to=carol)
    assert confirmation["text"].startswith(messages.TAKEDOWN_DONE_UNCOUNTED + " " + messages.TAKEDOWN_ONE_SIDED_OTHERS)


def test_a_dm_copy_of_several_messages_is_read_and_deleted_as_one(fake: FakeX, bot: Pipeline, x: XPlatform) -> None:
    """Its id names every message; one deleted by hand leaves the others to delete, and the
    copy counts as gone only once none is left."""
    original = fake.tweet(fake.add_user("dave", protected=True), "mine", media=[fake.photo(jpeg(128)), fake.photo(jpeg(96))])
    bob = fake.add_user("bob")
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    first, second = fake.bot_dms(to=bob)
    copy_id = bot.store.reply_for("x", original["id"], bob["id"])
    assert x.get_post(copy_id).id == copy_id
    fake.dms.remove(first)  # gone already
    assert x.get_post(copy_id).id == copy_id and x.get_post(copy_id).account.id == fake.bot["id"]
    assert x.delete_post(copy_id) is False
    assert fake.deleted_dms == [second["id"]]
    with pytest.raises(NotFound):
        x.delete_post(copy_id)


def test_a_dm_copy_is_never_sent_in_part(fake: FakeX, bot: Pipeline) -> None:
    """Every image is uploaded before the first message goes: the second image's upload failing
    after the first message went left a copy partly sent, never recorded, that no takedown
    could find."""
    dave = fake.add_user("dave", protected=True)
    original = fake.tweet(dave, "injured", media=[fake.photo(jpeg(128)), fake.photo(jpeg(96))], sensitive=True)
    bob = fake.add_user("bob")
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    real, calls = fake._metadata, []

    def second_refused(request: Any, query: dict[str, str]) -> Any:
        calls.append(1)
        if len(calls) == 2:
            return fake._answer(400, problem(400, "Invalid Request", "metadata refused"))
        return real(request, query)

    fake._metadata = second_refused  # type: ignore[method-assign]
    with pytest.raises(PlatformError, match="media/metadata"):
        bot.run_all()
    assert fake.bot_dms(to=bob) == []


def test_a_dm_x_says_is_gone_is_not_searched_for_in_the_inbox(fake: FakeX, x: XPlatform) -> None:
    """X's "not found" for a DM event is final: the lookup used to page through the inbox too,
    spending the budget of the DM poll that brings takedown requests."""
    bob = fake.add_user("bob")
    for n in range(250):
        fake.dm(bob, f"hello {n}")
    before = fake.count("GET", "/2/dm_events")
    with pytest.raises(NotFound):
        x.get_post("dm:1234567890123")
    assert fake.count("GET", "/2/dm_events") == before


@pytest.mark.parametrize("withheld", ["tweet", "account"])
def test_a_photo_x_withholds_in_some_countries_is_answered_by_dm_never_in_public(
        fake: FakeX, bot: Pipeline, withheld: str) -> None:
    """X withholds a tweet (or a whole account) in a country on a legal demand and still serves
    it to the API with a ``withheld`` field. A public copy would show the photo exactly where X
    hides it: the copy goes to the requester alone, as for a protected account."""
    dave = fake.add_user("dave", withheld_in=["DE"] if withheld == "account" else [])
    bob = fake.add_user("bob")
    original = fake.tweet(dave, "Crowd at the square", media=[fake.photo(jpeg(256))],
                          withheld_in=["DE"] if withheld == "tweet" else [])
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    assert fake.bot_tweets() == [], "never a public tweet"
    [copy] = fake.bot_dms(to=bob)
    assert copy["text"].startswith("Here is an anonymised copy (1 image")


def test_a_public_copy_goes_when_x_withholds_its_original_later(fake: FakeX, bot: Pipeline) -> None:
    dave, original, request, reply = answered(fake, bot)
    fake.tweets[original["id"]]["withheld"] = {"copyright": False, "country_codes": ["DE"], "scope": "tweet"}
    assert sweep(bot.platform, bot.store, time.time() + FIRST_CHECK_S + 1) == 1
    assert fake.deleted == [reply["id"]]


def test_a_photo_edited_out_of_a_tweet_is_neither_copied_nor_left_up(fake: FakeX, bot: Pipeline, x: XPlatform) -> None:
    """An edit on X is a new tweet, and a lookup of an earlier version answers that version:
    the bot used to copy a photo its author had edited out, and kept every copy of it up."""
    dave, bob, erin = fake.add_user("dave"), fake.add_user("bob"), fake.add_user("erin")
    kept, removed = fake.photo(jpeg(256)), fake.photo(jpeg(256))
    original = fake.tweet(dave, "Two photos from the square", media=[kept, removed])
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    [both] = fake.bot_tweets()
    assert len(fake.media_of(both)) == 2
    start = time.time()

    typo = fake.edit(original, "Two photos from the square, fixed")  # the text only: both photos stay
    assert sweep(x, bot.store, start + FIRST_CHECK_S + 1) == 0
    fake.edit(typo, "Only the one without faces", media=[kept])
    request = fake.tweet(erin, "@protestbot cover please", in_reply_to=original)  # under the first version
    assert bot.run_all() == ["replied"]
    [only_kept] = fake.replies_to(request["id"])
    assert len(fake.media_of(only_kept)) == 1, "a copy of what the author shows now"
    assert sweep(x, bot.store, start + 6 * 3600 + 1) == 1
    assert fake.deleted == [both["id"]]
    assert bot.store.replies_of("x", original["id"]) == {only_kept["id"]}


def test_a_tweet_edited_to_no_photos_gets_no_copy(fake: FakeX, bot: Pipeline) -> None:
    dave, bob = fake.add_user("dave"), fake.add_user("bob")
    original = fake.tweet(dave, "The square", media=[fake.photo(jpeg(256))])
    fake.edit(original, "Photo removed: there were faces in it", media=[])
    request = fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["no_image"]
    [note] = fake.replies_to(request["id"])
    assert not fake.media_of(note)


def test_a_private_answer_to_someone_who_takes_no_dms_ends_quietly(fake: FakeX, bot: Pipeline) -> None:
    """The copy of a protected account's photo may only go by DM; when the requester takes no
    DMs from the bot, the job ends there: not a public tweet instead, not a dead letter with
    retries and an apology that X would refuse the same way."""
    original = protected_photo(fake, "Only for my followers")
    bob = fake.add_user("bob")
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    fake.fail("POST /2/dm_conversations/with/:id/messages", 403,
              problem(403, "Forbidden", "You cannot send messages to this user."))
    assert bot.run_all() == ["dm_refused"]
    assert fake.bot_tweets() == [] and fake.bot_dms(to=bob) == []


def protected_photo(fake: FakeX, text: str, bot_follows: bool = True) -> dict:
    """A photo tweet by dave, whose account is protected."""
    dave = fake.add_user("dave", protected=True, bot_follows=bot_follows)
    return fake.tweet(dave, text, media=[fake.photo(jpeg(64))])


def test_takedown_of_ones_own_dm_copy_asks_to_delete_it_in_the_inbox_too(fake: FakeX, bot: Pipeline) -> None:
    original = protected_photo(fake, "Only for my followers")
    bob = fake.add_user("bob")
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    [copy] = fake.bot_dms(to=bob)

    fake.dm(bob, "please delete https://t.co/q2", links={"https://t.co/q2": f"https://x.com/dave/status/{original['id']}"})
    assert bot.run_all() == ["deleted"]
    assert fake.deleted_dms == [copy["id"]]
    confirmation = fake.bot_dms(to=bob)[-1]
    assert confirmation["text"].startswith(messages.TAKEDOWN_DONE.format(count=1) + " " + messages.takedown_one_sided(1))


def test_a_protected_tweet_the_bot_does_not_follow_gets_a_clear_answer(fake: FakeX, bot: Pipeline) -> None:
    # X answers the lookup with an Authorization Error: hidden from the bot, like a deleted
    # tweet, not a failure to dead-letter with a generic apology.
    original = protected_photo(fake, "for my followers", bot_follows=False)
    bob = fake.add_user("bob")
    fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["gone"]
    [answer] = fake.bot_tweets()
    assert messages.GONE in answer["text"]
    assert fake.photo_requests == []


def test_being_mentioned_in_a_protected_tweet_does_not_earn_a_copy(fake: FakeX, bot: Pipeline) -> None:
    # On X a protected tweet reaches approved followers only: a mention does not show it to
    # alice, so quoting it (which anyone can do with its link) gets her no copy.
    alice = fake.add_user("alice")
    original = protected_photo(fake, "@alice look at this")
    fake.tweet(alice, "@protestbot cover this", quote=original)
    assert bot.run_all() == ["not_visible"]
    assert fake.photo_requests == [] and fake.uploads == {}
    [answer] = fake.bot_dms(to=alice)  # an answer about a protected tweet never goes public
    assert messages.NOT_YOURS in answer["text"] and fake.bot_tweets() == []


def test_a_photo_sent_by_dm_gets_told_how_to_ask(fake: FakeX, bot: Pipeline) -> None:
    # The photo's link in the text is not a post of the bot's: the answer is how to ask for a
    # copy, not "I found no reply of mine for that link".
    carol = fake.add_user("carol")
    fake.dm(carol, "can you cover the faces in this photo? https://t.co/x1", media=[fake.photo(jpeg(64))],
            links={"https://t.co/x1": "https://x.com/messages/media/1234567890"})
    assert bot.run_all() == ["dm_photo"]
    [answer] = fake.bot_dms(to=carol)
    assert answer["text"].startswith(messages.DM_PHOTO)
    assert fake.photo_requests == [] and fake.deleted == [] and fake.deleted_dms == []


def test_quoting_cannot_tell_a_stranger_whether_a_protected_tweet_has_photos(fake: FakeX, bot: Pipeline) -> None:
    dave = fake.add_user("dave", protected=True)
    with_photo = fake.tweet(dave, "for my followers", media=[fake.photo(jpeg(64))])
    text_only = fake.tweet(dave, "for my followers, no photo")
    eve = fake.add_user("eve")
    for quoted in (with_photo, text_only):
        fake.tweet(eve, "@protestbot cover this", quote=quoted)
    assert bot.run_all() == ["not_visible", "not_visible"]
    answers = fake.bot_dms(to=eve)
    assert len(answers) == 2 and all(a["text"].startswith(messages.NOT_YOURS) for a in answers)
    assert fake.bot_tweets() == []


def test_public_answers_to_the_copy_delete_it_only_when_told_to(fake: FakeX, bot: Pipeline) -> None:
    _, _, request, copy = answered(fake, bot, side=128)
    bob = fake.users[request["author_id"]]
    for talk in ("Thanks! I'll delete my original now", "Please don't delete this", "Retired teachers marched too"):
        fake.tweet(bob, "@protestbot " + talk, in_reply_to=copy)
    # talk that speaks of deleting gets the how-to, privately, in case it was meant as a request
    assert bot.run_all() == ["takedown_help", "takedown_help", "ignored_own_copy"] and fake.deleted == []
    assert [dm["text"].split("\n")[0] for dm in fake.bot_dms(to=bob)] == [messages.TAKEDOWN_HELP] * 2
    # a command deletes it; bob takes no DMs from the bot, so the confirmation is refused, and
    # that must not fail the job (the copy is gone, which is what he asked)
    fake.fail("POST /2/dm_conversations/with/:id/messages", 403,
              problem(403, "Forbidden", "You cannot send messages to this user."))
    fake.tweet(bob, "@protestbot delete this", in_reply_to=copy)
    assert bot.run_all() == ["deleted"]
    assert fake.deleted == [copy["id"]]


def test_a_request_deleted_while_its_photo_is_anonymised_ends_quietly(fake: FakeX, bot: Pipeline,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # X refuses a reply to a deleted tweet with 403, not 404: still nobody left to answer.
    dave, bob = fake.add_user("dave"), fake.add_user("bob")
    original = fake.tweet(dave, "Crowd", media=[fake.photo(jpeg(64))])
    request = fake.tweet(bob, "@protestbot cover please", in_reply_to=original)
    real = bot.anonymiser.anonymise

    def deleted_meanwhile(data: bytes, **budgets: Any) -> Any:
        fake.tweets.pop(request["id"], None)
        return real(data, **budgets)

    monkeypatch.setattr(bot.anonymiser, "anonymise", deleted_meanwhile)
    assert bot.run_all() == ["request_gone"]
    assert fake.bot_tweets() == [] and fake.bot_dms() == []


def test_protected_requester_with_own_photo_is_answered_by_dm(fake: FakeX, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    carol = fake.add_user("carol", protected=True)
    request = fake.tweet(carol, "@protestbot my photo", media=[fake.photo(jpeg(256))])
    [job] = bot.poll()
    _fail_once(monkeypatch, "record_reply")
    with pytest.raises(redis.ConnectionError):
        bot.run(job)
    assert bot.run(job) == "replied"  # and the redelivered job does not DM twice
    assert fake.bot_tweets() == []
    [dm] = fake.bot_dms(to=carol)
    assert dm["text"].startswith("Here is an anonymised copy") and fake.media_of(dm)[0]["category"] == "dm_image"
    assert fake.replies_to(request["id"]) == []


def test_a_large_photo_is_answered_within_xs_5_mb(fake: FakeX, bot: Pipeline) -> None:
    # Made to the stock 16 MiB budget, a detailed photo's copy was refused by X's upload (5 MB).
    noisy = np.random.default_rng(1).integers(0, 256, (2400, 3200, 3), dtype=np.uint8)  # copy: 6 MB at stock quality
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=95)
    assert len(buffer.getvalue()) > 5 * 1024 * 1024
    bot.config = make_config(max_media_bytes=40 * 1024 * 1024, media_timeout_s=20.0)
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot the whole square", media=[fake.photo(buffer.getvalue())])
    assert bot.run_all() == ["replied"]
    [reply] = fake.replies_to(request["id"])
    [upload] = fake.media_of(reply)
    assert len(upload["data"]) <= 5 * 1024 * 1024
    assert Image.open(io.BytesIO(upload["data"])).size == (3200, 2400)


def test_sensitive_original_keeps_a_sensitive_media_warning(fake: FakeX, bot: Pipeline) -> None:
    alice = fake.add_user("alice")
    request = fake.tweet(alice, "@protestbot injured people", media=[fake.photo(jpeg(128))], sensitive=True)
    assert bot.run_all() == ["replied"]
    [reply] = fake.replies_to(request["id"])
    [upload] = fake.media_of(reply)
    assert upload["metadata"]["sensitive_media_warning"] == {"other": True}
    assert upload["metadata"]["alt_text"]["text"] == upload["alt_text"]


def test_sensitive_protected_original_answered_by_dm_keeps_the_warning(fake: FakeX, bot: Pipeline) -> None:
    dave = fake.add_user("dave", protected=True)
    original = fake.tweet(dave, "injured people", media=[fake.photo(jpeg(128)), fake.photo(jpeg(96))], sensitive=True)
    fake.tweet(fake.add_user("bob"), "@protestbot cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    dms = fake.bot_dms()
    uploads = [u for dm in dms for u in fake.media_of(dm)]
    assert len(uploads) == 2 and all(u["category"] == "dm_image" for u in uploads)
    assert all(u["metadata"]["sensitive_media_warning"] == {"other": True} for u in uploads)


@pytest.mark.parametrize("sensitive", [True, False])
def test_a_dm_image_whose_warning_x_refuses_is_not_sent(fake: FakeX, bot: Pipeline, sensitive: bool) -> None:
    """X takes the alt text and the sensitive-media warning in one metadata call. A DM image
    may go without its alt text when that call fails, but a sensitive one never goes without
    its warning: the job fails as a refused tweet image does (the worker dead-letters it and
    apologises)."""
    dave = fake.add_user("dave", protected=True)
    original = fake.tweet(dave, "the square", media=[fake.photo(jpeg(128))], sensitive=sensitive)
    fake.tweet(fake.add_user("bob"), "@protestbot cover please", in_reply_to=original)
    fake.fail("POST /2/media/metadata", 400, {"title": "Invalid Request", "detail": "try later", "type": "about:blank", "status": 400})
    if sensitive:
        with pytest.raises(PlatformError, match="media/metadata"):
            bot.run_all()
        assert [u for dm in fake.bot_dms() for u in fake.media_of(dm)] == [], "no sensitive image without its warning"
    else:
        assert bot.run_all() == ["replied"]
        [image] = [u for dm in fake.bot_dms() for u in fake.media_of(dm)]
        assert image["metadata"] == {}


# --------------------------------------------------------------------------- reply settings


def limited_conversation(fake: FakeX, setting: str = "mentionedUsers") -> tuple[dict, dict, dict]:
    """dave's photo, whose replies he limits to the accounts he mentions (bob) or follows (bob
    again), never the bot, and bob's request under it; returns (bob, original, request)."""
    dave, bob = fake.add_user("dave"), fake.add_user("bob")
    fake.follow(dave, bob)
    original = fake.tweet(dave, "Crowd at the square, @bob was there", media=[fake.photo(jpeg(256))], reply_settings=setting)
    request = fake.tweet(bob, "@protestbot cover the faces please", in_reply_to=original)
    return bob, original, request


@pytest.mark.parametrize("setting", ["mentionedUsers", "following"])
def test_a_conversation_that_limits_replies_gets_its_copy_by_dm(
        fake: FakeX, bot: Pipeline, setting: str, caplog: pytest.LogCaptureFixture) -> None:
    """X refuses the bot's reply under a tweet whose author limits who may reply (X reads the
    conversation's first tweet): bob asked, so the copy goes to him by DM, saying why, instead
    of a dead letter, an apology and a lost copy."""
    bob, original, request = limited_conversation(fake, setting)
    with caplog.at_level("INFO", logger="bot.handler"):
        assert bot.run_all() == ["replied"]
    assert fake.bot_tweets() == [] and fake.count("POST", "/2/tweets") == 1, "tried once, refused, nothing public"
    [copy] = fake.bot_dms(to=bob)
    assert copy["text"].startswith("Here is an anonymised copy (1 image")
    assert messages.REPLIES_CLOSED in copy["text"]
    [upload] = fake.media_of(copy)
    assert upload["category"] == "dm_image" and heads_in(upload["alt_text"]) >= 1
    assert_anonymised(upload["data"], astronaut(256), face_box(256))
    # recorded as the DM it is, so takedowns and the withdrawal check treat it as one
    assert bot.store.reply_for("x", original["id"], bob["id"]) == f"dm:{copy['id']}"
    assert bot.store.copy_visibility("x", f"dm:{copy['id']}") == "direct"
    assert bot.store.dead_letters() == [] and not any(messages.APOLOGY in dm["text"] for dm in fake.bot_dms())
    [line] = [r for r in caplog.records if r.msg == "replies_closed_dm"]
    assert line.post_id == request["id"] and line.requester_id == bob["id"]


def test_a_limited_conversation_whose_requester_takes_no_dms_ends_quietly(fake: FakeX, bot: Pipeline) -> None:
    bob, original, _ = limited_conversation(fake)
    fake.fail("POST /2/dm_conversations/with/:id/messages", 403,
              problem(403, "Forbidden", "You cannot send messages to this user."))
    assert bot.run_all() == ["dm_refused"]
    assert fake.bot_tweets() == [] and fake.bot_dms() == []
    assert bot.store.dead_letters() == [] and bot.store.reply_for("x", original["id"], bob["id"]) is None


def test_a_redelivered_job_does_not_send_its_dm_copy_twice(fake: FakeX, bot: Pipeline,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bob, original, _ = limited_conversation(fake)
    [job] = bot.poll()
    _fail_once(monkeypatch, "record_reply")
    with pytest.raises(redis.ConnectionError):
        bot.run(job)
    [copy] = fake.bot_dms(to=bob)  # the first run did send it
    sent = fake.count("POST", r"/2/dm_conversations/with/\d+/messages")
    assert bot.run(job) == "replied"  # refused as a reply again, then the DM is found by its marker
    assert bot.run(job) == "already_done"
    assert fake.bot_dms(to=bob) == [copy] and fake.count("POST", r"/2/dm_conversations/with/\d+/messages") == sent
    assert fake.bot_tweets() == []
    assert bot.store.reply_for("x", original["id"], bob["id"]) == f"dm:{copy['id']}"


def test_a_refused_reply_keeps_its_images_for_the_dm(fake: FakeX, x: XPlatform) -> None:
    """``reply()`` takes the images handed over with ``upload_image``; when X refuses the reply
    in that conversation they stay pending, so the same draft can go by DM."""
    bob, _, request = limited_conversation(fake)
    image = jpeg(64)
    handle = x.upload_image(image, "image/jpeg", "a covered head")
    draft = ReplyDraft(in_reply_to=x.get_post(request["id"]), text="@bob here", visibility="public",
                       media_ids=[handle], idempotency_key="ppb-reply-test")
    with pytest.raises(RepliesClosed) as refused:
        x.reply(draft)
    assert refused.value.status == 403 and not refused.value.retryable
    assert fake.bot_tweets() == []
    posted = x.reply(replace(draft, visibility="direct"))
    [dm] = fake.bot_dms(to=bob)
    assert posted.id == f"dm:{dm['id']}" and posted.visibility == "direct"
    [upload] = fake.media_of(dm)
    assert (upload["category"], upload["data"], upload["alt_text"]) == ("dm_image", image, "a covered head")
    assert x._pending == {}, "sent: the bytes are out of memory again"
