"""The listener: streaming, falling back to polling, restarts, and exactly one job per request."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
import responses

from bot.platforms.base import ServerError
from bot.platforms.mastodon import MastodonPlatform, html_to_text
from bot_harness import E2E
from bot_helpers import MAGIC, RedisMonitor, jpeg


def answered(e2e: E2E, statuses: list[dict]) -> None:
    """Every status got exactly one answer from the bot, and the bot said nothing else."""
    fake = e2e.fake
    for status in statuses:
        e2e.reply_to(status)
    e2e.settle()
    replied_to = [s["in_reply_to_id"] for s in fake.bot_posts()]
    assert sorted(replied_to) == sorted(s["id"] for s in statuses), "each request answered exactly once"


def notification_polls(e2e: E2E) -> int:
    return sum(1 for r in e2e.fake.log() if r.path == "/api/v1/notifications")


@pytest.mark.parametrize("refusal", [404, 501])
def test_stream_refused_polling_answers_every_mention(e2e: E2E, refusal: int) -> None:
    fake = e2e.fake
    fake.stream_refuse = refusal
    alice = fake.add_account("alice")
    e2e.listen()
    # a brand-new bot account: nothing in its notifications when the listener first looks
    fake.wait_for(lambda: notification_polls(e2e) >= 2, 10, what="the listener to poll")
    first = fake.mention(alice, "first ever mention")
    second = fake.mention(alice, "second", media=[fake.media(jpeg(256))])
    answered(e2e, [first, second])
    # Status 0: a retry of the stream the fake has logged but not answered yet (the listener
    # keeps trying it now and then); every one that was answered was refused.
    streams = [r for r in fake.log() if r.path.startswith("/api/v1/streaming") and r.status]
    assert streams and all(r.status == refusal for r in streams)


def test_history_before_first_start_is_not_answered(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    old = [fake.mention(alice, f"old request {i}") for i in range(3)]
    e2e.listen()
    new = fake.mention(alice, "new request")
    answered(e2e, [new])
    assert not any(fake.replies_to(s["id"]) for s in old)


def test_stream_drops_every_mention_still_answered_once(e2e: E2E) -> None:
    fake = e2e.fake
    fake.stream_drop_after = 1  # every stream connection dies after one event
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    e2e.listen()
    requests = []
    for i in range(3):
        requests.append(fake.mention(alice if i % 2 else bob, f"request {i}"))
        requests.append(fake.mention(bob, f"burst {i}"))
        time.sleep(0.3)
    answered(e2e, requests)
    assert len(fake.stream_connections) >= 2, "the listener reconnected after the drop"


def test_mention_arriving_while_the_stream_connects_is_not_lost(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    # Not the first start: the listener has a cursor already (an answered mention).
    e2e.listen()
    earlier = fake.mention(alice, "earlier")
    e2e.reply_to(earlier)
    e2e.stop_listeners()

    in_gap: list[dict] = []
    # lands after the listener's catch-up but before its stream is subscribed: not streamed
    fake.before_subscribe.append(lambda: in_gap.append(fake.mention(alice, "in the gap")))
    e2e.listen()
    later = fake.mention(alice, "later, streamed")
    answered(e2e, [earlier, *in_gap, later])


def test_listener_restart_handles_mentions_made_while_down_exactly_once(e2e: E2E) -> None:
    fake = e2e.fake
    # Enough people that none passes the hourly limit on explanations (10 each by default).
    people = [fake.add_account(f"person{i}") for i in range(5)]
    running = e2e.listen()
    before = fake.mention(people[0], "before the restart")
    e2e.reply_to(before)
    running.stop()

    # more than one page (the client asks for 40 at a time) while the listener is down
    while_down = [fake.mention(people[i % 5], f"while down {i}") for i in range(43)]
    e2e.listen()
    after = fake.mention(people[1], "after the restart")
    answered(e2e, [before, *while_down, after])
    # and a second restart re-reads nothing
    e2e.stop_listeners()
    e2e.listen()
    time.sleep(1.0)
    e2e.settle()
    assert len(fake.bot_posts()) == 45


def test_stream_and_poll_seeing_the_same_mention_enqueue_it_once(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    sent: list[dict] = []

    def enqueue(job):  # noqa: ANN001, ANN202 - the listener's enqueue, recorded
        sent.append(job.to_dict())
        e2e.enqueue(job)

    running = e2e.listen(enqueue=enqueue)
    first = fake.mention(alice, "one", media=[fake.media(jpeg(256))])
    e2e.reply_to(first)
    # A poll that raced with the stream: it still has the old cursor and sees the mention again.
    listener = running.listener
    e2e.store.r.delete(f"ppb:cursor:{listener.platform.name}:mentions")
    e2e.store.set_cursor(listener.platform.name, "mentions", str(int(fake.notifications[0]["id"]) - 1))
    assert listener.catch_up("mentions") == 1
    e2e.settle()
    assert len(sent) == 1
    assert len(fake.bot_posts()) == 1


def test_streams_from_the_host_the_server_publishes(e2e: E2E) -> None:
    # As on mastodon.social: the streaming API on a host of its own, which the API host
    # redirects to; a redirect followed by requests arrives without the token (401), and the
    # listener used to poll for ever.
    fake = e2e.fake
    fake.serve_streaming_apart()
    alice = fake.add_account("alice")
    e2e.listen(hashtags=("demo",))  # waits until both channels stream
    mention = fake.mention(alice, "streamed", media=[fake.media(jpeg(256))])
    post = fake.post(alice, "also streamed #demo", media=[fake.media(jpeg(256))])
    answered(e2e, [mention, post])
    streams = [r for r in fake.log() if r.path.startswith("/api/v1/streaming")]
    assert {r.path for r in streams} == {"/api/v1/streaming/user/notification", "/api/v1/streaming/hashtag"}
    assert all(r.server == "streaming" and r.status == 200 for r in streams), "never refused, never redirected"


def test_hashtag_stream_refused_polling_answers(e2e: E2E) -> None:
    fake = e2e.fake
    fake.stream_refuse = 404
    carol = fake.add_account("carol")
    fake.post(carol, "an old post #demo", media=[fake.media(jpeg(256))])  # history: not answered
    e2e.listen(hashtags=("demo",))
    fake.wait_for(lambda: any(r.path == "/api/v1/timelines/tag/demo" for r in fake.log()), 10, what="a tag poll")
    post = fake.post(carol, "today #Demo", media=[fake.media(jpeg(256))])
    answered(e2e, [post])


def tag_scans(e2e: E2E) -> int:
    """Scans for posts that reached the server late: remote-only reads of the tag timeline."""
    return sum(1 for r in e2e.fake.log() if r.path == "/api/v1/timelines/tag/demo" and r.query.get("remote") == ["true"])


def test_hashtag_post_federated_late_is_answered_when_polling(e2e: E2E) -> None:
    """A post from another server carries an id from its publish time, so when it reaches the
    server after a newer post was polled, it sorts below the cursor: only the scan below the
    cursor lists it, and it must not move the cursor back."""
    fake = e2e.fake
    fake.stream_refuse = 404
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    e2e.listen(hashtags=("demo",))
    fake.wait_for(lambda: any(r.path == "/api/v1/timelines/tag/demo" for r in fake.log()), 10, what="a tag poll")
    published = time.time()
    time.sleep(0.05)  # dana's post is older than carol's by its publish time
    local = fake.post(carol, "here now #demo", media=[fake.media(jpeg(256))])
    e2e.reply_to(local)
    cursor = e2e.store.cursor("mastodon", "tag:demo")
    assert cursor == local["id"]
    late = fake.post(dana, "from a backlogged server #demo", media=[fake.media(jpeg(256))], published=published)
    assert int(late["id"]) < int(local["id"])
    answered(e2e, [local, late])
    assert e2e.store.cursor("mastodon", "tag:demo") == cursor, "a late post never moves the cursor back"
    scans_before = tag_scans(e2e)
    fake.wait_for(lambda: tag_scans(e2e) >= scans_before + 3, 10, what="more scans")
    e2e.settle()
    assert len(fake.replies_to(late["id"])) == 1, "scanned again, answered once"


def test_hashtag_post_published_before_the_first_start_is_history_however_late(e2e: E2E) -> None:
    fake = e2e.fake
    fake.stream_refuse = 404
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    before_start = time.time() - 5
    fake.post(carol, "an old post #demo", media=[fake.media(jpeg(256))])
    e2e.listen(hashtags=("demo",))
    fake.wait_for(lambda: any(r.path == "/api/v1/timelines/tag/demo" for r in fake.log()), 10, what="a tag poll")
    after_start = time.time()
    time.sleep(0.05)
    local = fake.post(carol, "here now #demo", media=[fake.media(jpeg(256))])
    e2e.reply_to(local)
    history = fake.post(dana, "published before the bot watched #demo", media=[fake.media(jpeg(256))], published=before_start)
    late = fake.post(dana, "published after #demo", media=[fake.media(jpeg(256))], published=after_start)
    scans = tag_scans(e2e)
    fake.wait_for(lambda: tag_scans(e2e) >= scans + 3, 10, what="scans below the cursor")
    answered(e2e, [local, late])
    assert not fake.replies_to(history["id"])


@pytest.mark.parametrize("tag", ["empty", "quiet"])
def test_history_listed_above_the_cursor_is_not_answered(e2e: E2E, tag: str) -> None:
    """A post published before the first watch can sort above the cursor when it arrives: above
    "0" on a tag that was empty, above a quiet tag's month-old newest post. The poll lists it
    like a new one; it is history all the same."""
    fake = e2e.fake
    fake.stream_refuse = 404
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    if tag == "quiet":
        fake.post(dana, "a month ago #demo", media=[fake.media(jpeg(256))], published=time.time() - 30 * 86400)
    e2e.listen(hashtags=("demo",))
    fake.wait_for(lambda: e2e.store.cursor("mastodon", "tag:demo") is not None, 10, what="the first poll")
    history = fake.post(dana, "a day-old photo #demo", media=[fake.media(jpeg(256))], published=time.time() - 86400)
    time.sleep(0.05)
    new = fake.post(carol, "here now #demo", media=[fake.media(jpeg(256))])
    answered(e2e, [new])
    e2e.settle()
    assert not fake.replies_to(history["id"])
    assert e2e.store.cursor("mastodon", "tag:demo") == new["id"], "passed over like the first start's history"


def test_the_late_scan_reaches_back_less_far_than_the_first_sighting_keys_last(e2e: E2E) -> None:
    """A quiet tag's cursor stays put and every poll scans below it again: posts found there
    after their first-sighting keys expired (14 days) were queued a second time. The scan now
    reaches back at most LATE_MAX_AGE_S, whatever the cursor's age."""
    from bot.listener import LATE_MAX_AGE_S, Listener
    from bot.store import SEEN_TTL_S

    asked: list[float] = []

    class Platform:
        name = "mastodon"
        watches_hashtags = True
        stream_complete = False

        def hashtag_late(self, tag: str, cursor: str, window_s: float, not_before: float) -> list:
            asked.append(not_before)
            return []

    listener = Listener(Platform(), e2e.store, lambda job: None, ("demo",), stream=False)  # type: ignore[arg-type]
    listener._watched_since["tag:demo"] = time.time() - 30 * 86400  # watched for a month
    listener._late("tag:demo", "110000000000000000")
    assert LATE_MAX_AGE_S < SEEN_TTL_S
    assert asked and asked[0] >= time.time() - LATE_MAX_AGE_S - 5


def test_a_cursor_from_before_the_late_scan_counts_history_from_the_upgrade(e2e: E2E) -> None:
    """A channel whose cursor an older listener set has no record of when it was first
    watched: the first scan records it, so an upgrade answers nothing published before it,
    and restarts keep that record."""
    fake = e2e.fake
    fake.stream_refuse = 404
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    before_upgrade = time.time() - 5
    old = fake.post(carol, "handled by the old version #demo", media=[fake.media(jpeg(256))])
    e2e.store.set_cursor("mastodon", "tag:demo", old["id"])
    running = e2e.listen(hashtags=("demo",))
    key = "ppb:watched_since:mastodon:tag:demo"
    fake.wait_for(lambda: e2e.store.r.exists(key), 10, what="the first scan")
    watched = e2e.store.watched_since("mastodon", "tag:demo", time.time() + 1000)
    assert before_upgrade < watched <= time.time()
    time.sleep(0.05)
    new = fake.post(carol, "after the upgrade #demo", media=[fake.media(jpeg(256))])
    e2e.reply_to(new)  # the cursor is past the upgrade now, so the scans read below it
    history = fake.post(dana, "published before the upgrade #demo", media=[fake.media(jpeg(256))], published=before_upgrade)
    running.stop()
    e2e.listen(hashtags=("demo",))
    scans = tag_scans(e2e)
    fake.wait_for(lambda: tag_scans(e2e) >= scans + 3, 10, what="scans after the restart")
    e2e.settle()
    assert not fake.replies_to(history["id"]) and not fake.replies_to(old["id"])
    assert e2e.store.watched_since("mastodon", "tag:demo", time.time()) == watched


def test_listener_enqueues_only_ids(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    photo = jpeg(256)
    photo_post = fake.post(alice, "crowd", media=[fake.media(photo)])
    media_urls = [m["url"] for m in photo_post["media_attachments"]]
    with RedisMonitor("127.0.0.1", e2e.redis_server.port) as monitor:
        e2e.listen()
        requests = [fake.mention(bob, "this please", in_reply_to=photo_post),
                    fake.mention(alice, "and this", media=[fake.media(jpeg(200))])]
        answered(e2e, requests)
    media_urls += [m["url"] for m in requests[1]["media_attachments"]]

    pushes = [c for c in monitor.writes(b"LPUSH") if c[1] == b"celery"]
    assert len(pushes) == 2, "one broker message per request"
    for command in pushes:
        raw = command[2]
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        args, kwargs, _ = body
        assert kwargs == {}
        [job] = args
        assert set(job) == {"platform", "post_id", "requester_id", "kind", "event_id"}
        assert job["platform"] == "mastodon" and job["kind"] == "mention"
        assert all(job[k].isdigit() for k in ("post_id", "requester_id", "event_id"))
        assert len(raw) < 4000, "a broker message is a few ids, never an image"
        for url in media_urls:
            assert url.encode() not in raw and url.split("/")[-1].encode() not in raw
        assert not MAGIC.search(raw) and not MAGIC.search(base64.b64decode(message["body"]))
    # the content of the posts is not in the queue either
    for command in pushes:
        assert b"crowd" not in command[2] and html_to_text(requests[0]["content"]).encode() not in command[2]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "polled"])
@pytest.mark.parametrize("odd", [{"account": None}, {"media_attachments": [{"type": "image", "url": "x"}]}],
                         ids=["no author", "media without id"])
def test_an_unreadable_mention_is_passed_over_and_later_ones_answered(
        e2e: E2E, caplog: pytest.LogCaptureFixture, stream: bool, odd: dict) -> None:
    """A server's odd JSON (another implementation, or a bug) must not stop the channel: the
    listener logs it, moves its cursor past it, and answers the mentions after it."""
    fake = e2e.fake
    if not stream:
        fake.stream_refuse = 404
    alice = fake.add_account("alice")
    with caplog.at_level(logging.WARNING, logger="bot.mastodon"):
        e2e.listen(stream=stream)
        fake.wait_for(lambda: notification_polls(e2e) >= 2, 10, what="the listener to poll")  # past its first start
        before = fake.mention(alice, "before")
        answered(e2e, [before])
        unreadable = fake.mention(alice, "odd", odd=odd)
        after = fake.mention(alice, "after", media=[fake.media(jpeg(256))])
        answered(e2e, [before, after])
        # A poll (a stream moves no cursor on Mastodon) takes the cursor past it.
        e2e.stop_listeners()
        e2e.listen(stream=False)
        [notification] = [n for n in fake.notifications if n["status"]["id"] == unreadable["id"]]
        past = (len(notification["id"]), notification["id"])
        fake.wait_for(lambda: (len(c := e2e.store.cursor("mastodon", "mentions") or ""), c) >= past, 10,
                      what="the cursor to move past the unreadable mention")
        e2e.settle()
    assert not fake.replies_to(unreadable["id"])
    assert len(fake.bot_posts()) == 2
    warned = [r for r in caplog.records if r.getMessage() == "unreadable_item"]
    assert warned and {r.item_id for r in warned} == {notification["id"]}
    assert {r.error for r in warned} == {"KeyError" if "media_attachments" in odd else "AttributeError"}


def test_a_mention_with_nulls_where_lists_belong_is_answered(e2e: E2E) -> None:
    """Null (some servers' "none") for the lists of a status, and entries that are not objects,
    read as what they mean: nothing there."""
    fake = e2e.fake
    fake.stream_refuse = 404
    alice = fake.add_account("alice")
    e2e.listen(stream=False)
    fake.wait_for(lambda: notification_polls(e2e) >= 2, 10, what="the listener to poll")
    odd = {"tags": None, "content": None, "spoiler_text": None, "account": dict(alice, acct=None, fields=None, note=None)}
    request = fake.mention(alice, "this one", media=[fake.media(jpeg(256))], odd=odd)
    answered(e2e, [request])


def test_nulls_and_stray_entries_in_a_status_read_as_nothing_there() -> None:
    status = {
        "id": "7", "visibility": "public", "content": None, "spoiler_text": None, "tags": None,
        "account": {"id": "3", "acct": None, "note": None, "fields": None},
        "media_attachments": [None, "x", {"id": "5", "type": "image", "url": "https://files.example/a.jpg", "description": None}],
        "mentions": ["ppbot", {"id": "1"}, {"id": None}],
    }
    post = MastodonPlatform.parse_post(status)
    assert (post.text, post.spoiler_text, post.tags, post.addressed) == ("", "", (), ("1",))
    assert (post.account.acct, post.account.note, post.account.fields, post.account.local) == ("", "", (), True)
    assert [(m.id, m.url, m.description) for m in post.images] == [("5", "https://files.example/a.jpg", "")]


@responses.activate
def test_listed_items_without_an_id_are_dropped_and_a_listing_that_is_no_list_is_a_server_error(
        caplog: pytest.LogCaptureFixture) -> None:
    base = "https://masto.example"
    status = {"id": "9", "visibility": "public", "content": "<p>@ppbot hi</p>", "account": {"id": "3", "acct": "alice"}}
    listing = f"{base}/api/v1/notifications"
    responses.get(listing, json=[{"type": "mention", "status": status}, {"id": "", "type": "mention", "status": status},
                                 {"id": True, "type": "mention"}, "odd", {"id": "5", "type": "mention", "status": status}])
    responses.get(listing, json=[])
    platform = MastodonPlatform(base, "token")
    with caplog.at_level(logging.WARNING, logger="bot.mastodon"):
        assert [(e.id, e.post.id, e.skip) for e in platform.mentions_since("1")] == [("5", "9", False)]
    assert [r.items for r in caplog.records if r.getMessage() == "unreadable_item"] == [4]
    responses.get(listing, json={"error": "not a list"})
    with pytest.raises(ServerError, match="not a list"):
        platform.mentions_since("5")
