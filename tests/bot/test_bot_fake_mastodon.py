"""The fake server itself behaves like Mastodon where the bot depends on it (so that a green
suite means something): paging, idempotency, form posts, rate-limit headers, streaming."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Iterator

import pytest
import requests
import responses

from bot.platforms.base import MediaLimits, ReplyDraft
from bot.platforms.mastodon import LATE_PAGES, PAGE, MastodonPlatform, countable_length, fit_status, id_at, id_time_ms
from bot.takedown import names_a_post, references
from bot_helpers import jpeg
from fake_mastodon import TOKEN, FakeMastodon, iso


@pytest.fixture
def fake() -> Iterator[FakeMastodon]:
    server = FakeMastodon().start()
    yield server
    server.stop()


def get(fake: FakeMastodon, path: str, **params: object) -> requests.Response:
    return requests.get(fake.base_url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)


def test_notification_paging_min_id_since_id_max_id(fake: FakeMastodon) -> None:
    alice = fake.add_account("alice")
    fake.post(alice, "no mention, no notification")
    ids = [fake.notifications[-1]["id"] for _ in range(10) if fake.mention(alice, "hi")]
    assert ids == sorted(ids, key=int)
    newest_first = [n["id"] for n in get(fake, "/api/v1/notifications").json()]
    assert newest_first == ids[::-1]
    # min_id: the page immediately newer than the cursor (oldest ones), still newest first
    assert [n["id"] for n in get(fake, "/api/v1/notifications", min_id=ids[2], limit=3).json()] == [ids[5], ids[4], ids[3]]
    # since_id: the newest ones newer than the cursor
    assert [n["id"] for n in get(fake, "/api/v1/notifications", since_id=ids[2], limit=3).json()] == [ids[9], ids[8], ids[7]]
    # max_id: older than
    assert [n["id"] for n in get(fake, "/api/v1/notifications", max_id=ids[2]).json()] == [ids[1], ids[0]]
    response = get(fake, "/api/v1/notifications", limit=2, **{"types[]": "mention"})
    assert 'rel="next"' in response.headers["Link"] and f"max_id={ids[8]}" in response.headers["Link"]
    assert get(fake, "/api/v1/notifications", **{"types[]": "follow"}).json() == []
    notification = get(fake, "/api/v1/notifications", limit=1).json()[0]
    assert notification["type"] == "mention" and notification["status"]["mentions"][0]["acct"] == "ppbot"


def test_every_api_response_carries_rate_limit_headers(fake: FakeMastodon) -> None:
    response = get(fake, "/api/v1/accounts/verify_credentials")
    assert int(response.headers["X-RateLimit-Remaining"]) < int(response.headers["X-RateLimit-Limit"])
    datetime.fromisoformat(response.headers["X-RateLimit-Reset"].replace("Z", "+00:00"))
    assert requests.get(fake.base_url + "/api/v1/accounts/verify_credentials", timeout=5).status_code == 401


def test_statuses_form_post_idempotency_and_validation(fake: FakeMastodon) -> None:
    alice = fake.add_account("alice")
    original = fake.post(alice, "hello")
    headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "abc"}
    form = {"status": "@alice hi", "in_reply_to_id": original["id"], "visibility": "unlisted", "spoiler_text": "cw"}
    first = requests.post(fake.base_url + "/api/v1/statuses", data=form, headers=headers, timeout=5).json()
    again = requests.post(fake.base_url + "/api/v1/statuses", data=form, headers=headers, timeout=5).json()
    assert first["id"] == again["id"] and len(fake.posted) == 1
    assert first["visibility"] == "unlisted" and first["sensitive"] is True and first["in_reply_to_account_id"] == alice["id"]
    too_long = requests.post(fake.base_url + "/api/v1/statuses", json={"status": "x" * 501},
                             headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert too_long.status_code == 422
    # the content warning counts against the same limit as the text
    cw_too_long = requests.post(fake.base_url + "/api/v1/statuses", json={"status": "x" * 400, "spoiler_text": "c" * 101},
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert cw_too_long.status_code == 422
    missing = requests.post(fake.base_url + "/api/v1/statuses", json={"status": "hi", "in_reply_to_id": "1"},
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert missing.status_code == 404
    # the URL in a post counts as 23 characters, a remote mention as its local part
    assert FakeMastodon.count_chars("@bob@remote.example https://example.com/" + "x" * 100) == len("@bob ") + 23


def test_fit_status_counts_like_the_server_and_shortens_the_warning_first() -> None:
    text = "@bob@remote.example Here is https://example.com/" + "x" * 100 + " and the caveat. Not processed: a; b; c"
    assert countable_length(text) == FakeMastodon.count_chars(text)
    assert fit_status(text, "short cw") == (text, "short cw")
    # a long warning gives way first, down to its floor; the text stays whole while it can
    fitted_text, cw = fit_status(text, "w" * 600)
    assert fitted_text == text and cw == "w" * (500 - countable_length(text) - 1) + "…"
    # a long text beside a long warning: the warning keeps 60 characters, the text loses its end
    long_text = "@bob Here is the copy. Not processed: " + "; ".join(f"image {i} was broken" for i in range(40))
    fitted_text, cw = fit_status(long_text, "w" * 600)
    assert cw == "w" * 59 + "…"
    assert fitted_text.endswith("…") and long_text.startswith(fitted_text[:-1].rstrip())
    assert countable_length(fitted_text) + len(cw) == 500
    # whatever the inputs, the result fits
    for size in (0, 1, 59, 60, 61, 440, 499, 500, 700):
        for text_size in (0, 10, 300, 480, 600):
            fitted_text, cw = fit_status("t" * text_size, "c" * size)
            assert countable_length(fitted_text) + len(cw) <= 500


def test_server_limits_are_read_from_the_instance_api_and_cached(fake: FakeMastodon) -> None:
    platform = MastodonPlatform(fake.base_url, TOKEN)
    assert platform.media_limits() == MediaLimits(16 * 1024 * 1024, 33_177_600)  # mastodon.social's
    fake.configuration["media_attachments"]["image_size_limit"] = 8 * 1024 * 1024
    assert platform.media_limits().max_bytes == 16 * 1024 * 1024, "trusted for an hour"
    assert len([r for r in fake.requests if r.path == "/api/v2/instance"]) == 1
    # Mastodon before 4.0 has only v1; a server whose instance API fails gets the stock limits
    # (the bot never stops answering for want of them) and is asked again a minute later
    older = MastodonPlatform(fake.base_url, TOKEN)
    fake.fail("GET", "/api/v2/instance", 404)
    fake.fail("GET", "/api/v1/instance", 503)
    assert older.media_limits() == MediaLimits(None, None)
    fake.configuration["media_attachments"]["image_matrix_limit"] = "lots"  # nonsense is ignored
    fresh = MastodonPlatform(fake.base_url, TOKEN)
    assert fresh.media_limits() == MediaLimits(8 * 1024 * 1024, None)
    fake.configuration["media_attachments"] = ["not", "an", "object"]
    assert MastodonPlatform(fake.base_url, TOKEN).media_limits() == MediaLimits(None, None)


@pytest.mark.parametrize("body,content_type", [
    ("<html><body>Welcome</body></html>", "text/html"),  # a proxy's or a front end's page
    ("[]", "application/json"), ("null", "application/json"),
])
def test_an_instance_api_answer_that_is_not_an_object_means_stock_limits(body: str, content_type: str) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for version in ("v2", "v1"):
            mock.add(responses.GET, f"https://social.example/api/{version}/instance", body=body, content_type=content_type)
        platform = MastodonPlatform("https://social.example", TOKEN)
        assert platform.media_limits() == MediaLimits()


def test_the_leading_mention_is_never_cut() -> None:
    """Cut into, "@bob@remote.example" could name another account, which would get the copy."""
    text, cw = fit_status("@bob@remote.example Here is a copy of the photo", "w" * 100, 30)
    assert text.startswith("@bob@remote.example ") and countable_length(text) + len(cw) <= 30


def test_deleting_only_own_statuses(fake: FakeMastodon) -> None:
    platform = MastodonPlatform(fake.base_url, TOKEN)
    alice = fake.add_account("alice")
    theirs = fake.post(alice, "not yours")
    with pytest.raises(Exception, match="not found"):
        platform.delete_post(theirs["id"])
    assert fake.deleted == [] and fake.delete_attempts == [theirs["id"]]


def test_private_posts_are_hidden_from_the_bot_unless_it_may_see_them(fake: FakeMastodon) -> None:
    alice = fake.add_account("alice")
    secret = fake.post(alice, "followers only", visibility="private")
    assert get(fake, f"/api/v1/statuses/{secret['id']}").status_code == 404
    fake.follow(fake.bot, alice)
    assert get(fake, f"/api/v1/statuses/{secret['id']}").status_code == 200


def test_streams_push_live_events_with_heartbeats(fake: FakeMastodon) -> None:
    fake.stream_heartbeat_s = 0.05
    alice = fake.add_account("alice")
    response = requests.get(fake.base_url + "/api/v1/streaming/hashtag", params={"tag": "protest"}, stream=True, timeout=5,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.headers["Content-Type"] == "text/event-stream"
    lines: list[str] = []

    def read() -> None:
        try:
            for line in response.iter_lines(decode_unicode=True):
                lines.append(line)
        except requests.exceptions.ChunkedEncodingError:
            lines.append("<dropped>")  # drop_streams() cuts the connection like a network failure

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fake.wait_streaming("hashtag")
    status = fake.post(alice, "#Protest now")
    fake.post(alice, "#protest but unlisted", visibility="unlisted")
    fake.wait_for(lambda: any(line.startswith("data:") for line in lines), 5, what="an update")
    fake.wait_for(lambda: lines[-1:] == [":thump"], 5, what="a heartbeat")
    fake.drop_streams()
    reader.join(5)
    assert ":thump" in lines and "event: update" in lines and lines[-1] == "<dropped>"
    assert sum(1 for line in lines if line.startswith("data:")) == 1
    assert f'"id": "{status["id"]}"' in next(line for line in lines if line.startswith("data:"))


@pytest.mark.parametrize("path", ["/api/v1/streaming/hashtag?tag=protest", "/api/v1/streaming/user/notification"])
def test_every_stream_wants_the_token(fake: FakeMastodon, path: str) -> None:
    """Since Mastodon 4.2 public streams too want a user token (mastodon/mastodon#23989)."""
    with requests.get(fake.base_url + path, stream=True, timeout=5) as response:  # a stream never ends
        assert response.status_code == 401 and fake.subscribers() == 0


def test_streaming_apart_is_published_and_redirected_to_like_mastodon_social(fake: FakeMastodon) -> None:
    fake.serve_streaming_apart()
    published = get(fake, "/api/v2/instance").json()["configuration"]["urls"]["streaming"]
    assert published == fake.streaming_url.replace("http://", "ws://")
    path = "/api/v1/streaming/hashtag?tag=protest"
    moved = requests.get(fake.base_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, allow_redirects=False, timeout=5)
    assert moved.status_code == 301 and moved.headers["Location"] == fake.streaming_url + path
    # requests follows the redirect to the other host without the token, as it must
    assert requests.get(fake.base_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 401
    with requests.get(fake.streaming_url + path, headers={"Authorization": f"Bearer {TOKEN}"}, stream=True, timeout=5) as there:
        assert there.status_code == 200 and there.headers["Content-Type"] == "text/event-stream"
    assert requests.get(fake.streaming_url + "/api/v1/accounts/verify_credentials", timeout=5).status_code == 404
    assert [r.server for r in fake.log() if r.path == "/api/v1/streaming/hashtag"] == ["api", "api", "streaming", "streaming"]


def test_a_server_before_4_0_publishes_its_streaming_url_in_instance_v1(fake: FakeMastodon) -> None:
    fake.instance_api = "v1"
    assert get(fake, "/api/v2/instance").status_code == 404
    v1 = get(fake, "/api/v1/instance").json()
    assert v1["urls"] == {"streaming_api": fake.base_url.replace("http://", "ws://")} and "urls" not in v1["configuration"]


@pytest.mark.parametrize("instance_api", ["v2", "v1"])
def test_the_client_streams_from_the_host_the_server_publishes(fake: FakeMastodon, instance_api: str) -> None:
    # mastodon.social's streaming lives on streaming.mastodon.social; following its redirect
    # loses the token (requests never sends it to another host), so the stream was refused
    fake.serve_streaming_apart()
    fake.instance_api = instance_api
    fake.stream_heartbeat_s = 0.05
    stream = MastodonPlatform(fake.base_url, TOKEN).stream("mentions")
    assert next(stream) is None, "a heartbeat: the stream is open"
    fake.wait_streaming("notification")
    alice = fake.add_account("alice")
    mention = fake.mention(alice, "hello")
    event = next(e for e in stream if e is not None)
    assert event.kind == "mention" and event.post.id == mention["id"]
    stream.close()
    streams = [r for r in fake.log() if r.path.startswith("/api/v1/streaming")]
    assert [(r.server, r.status) for r in streams] == [("streaming", 200)], "straight to the streaming host"


@pytest.mark.parametrize("published, streamed_from", [
    ("wss://streaming.social.example", "https://streaming.social.example"),  # mastodon.social's way
    ("wss://social.example/", "https://social.example"),
    ("https://streaming.social.example/base", "https://streaming.social.example/base"),
    (None, "https://social.example"),  # nothing published: the server's own host
    ("", "https://social.example"),
    ("ws://streaming.social.example", "https://social.example"),  # never the token in clear from an https server
    ("ftp://streaming.social.example", "https://social.example"),
    ("wss://", "https://social.example"),
    (["not", "a", "url"], "https://social.example"),
])
def test_the_published_streaming_url_and_when_it_is_not_used(published: object, streamed_from: str) -> None:
    seen: list[str | None] = []

    def streaming(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(request.headers.get("Authorization"))
        return 200, {"Content-Type": "text/event-stream"}, ":)\n\n"

    urls = {} if published is None else {"urls": {"streaming": published}}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.GET, "https://social.example/api/v2/instance", json={"configuration": urls})
        mock.add_callback(responses.GET, f"{streamed_from}/api/v1/streaming/user/notification", callback=streaming)
        stream = MastodonPlatform("https://social.example", TOKEN).stream("mentions")
        assert next(stream) is None
        assert seen == [f"Bearer {TOKEN}"]


def test_post_references_in_other_digits_are_not_post_ids() -> None:
    """A takedown DM's bare number is an id only in ASCII digits: "١٢٣" or "²" pass
    ``str.isdigit`` but are no Mastodon id, and were looked up as one."""
    platform = MastodonPlatform("https://m.example", TOKEN)
    assert platform.post_id_from_reference("109876543210.") == "109876543210"
    assert platform.post_id_from_reference("\u0661\u0662\u0663") is None
    assert platform.post_id_from_reference("\u00b2") is None


def test_post_links_from_every_web_interface_and_in_any_case_are_read() -> None:
    """The advanced web interface shows ``/deck/@user/id`` in the address bar, and a phone
    capitalises a message's first word ("Https://..."): both were answered "unknown link"."""
    platform = MastodonPlatform("https://m.example", TOKEN)
    for link in ("https://m.example/deck/@ppbot/111222333444555", "https://m.example/deck/@alice@remote.example/111222333444555",
                 "https://M.EXAMPLE/@ppbot/111222333444555?lang=en", "https://m.example/web/statuses/111222333444555"):
        assert platform.post_id_from_reference(link) == "111222333444555", link
    [found] = references("Https://m.example/@ppbot/111222333444555 please delete")
    assert platform.post_id_from_reference(found) == "111222333444555"
    assert names_a_post("HTTPS://m.example/@ppbot/111222333444555")


def test_status_ids_are_snowflakes_and_a_late_remote_status_is_dated_by_its_publishing(fake: FakeMastodon) -> None:
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    published = time.time() - 60
    first = fake.post(carol, "one #demo")
    late = fake.post(dana, "two #demo", published=published)
    third = fake.post(carol, "three #demo")
    assert abs((int(first["id"]) >> 16) - time.time() * 1000) < 5000
    assert int(late["id"]) >> 16 == int(published * 1000) and late["created_at"].startswith(iso(published)[:19])
    assert int(first["id"]) < int(third["id"]) and int(late["id"]) < int(first["id"])
    with pytest.raises(ValueError):
        fake.post(carol, "a local status arrives when it is made", published=published)
    ids = lambda **params: [s["id"] for s in get(fake, "/api/v1/timelines/tag/demo", **params).json()]  # noqa: E731
    assert ids() == [third["id"], first["id"], late["id"]]
    assert ids(remote="true") == [late["id"]]
    assert ids(local="true") == [third["id"], first["id"]]
    assert ids(local="true", remote="true") == ids()


def test_the_late_arrivals_scan_reads_below_the_cursor_within_its_window(fake: FakeMastodon) -> None:
    """``hashtag_late`` lists remote posts below the cursor, no older than the window or the
    time the channel was first watched, newest first from the cursor, at most LATE_PAGES pages."""
    carol, dana = fake.add_account("carol"), fake.add_account("dana", domain="slow.example")
    now = time.time()
    too_old = fake.post(dana, "outside the window #demo", published=now - 120)
    in_window = [fake.post(dana, f"late {i} #demo", published=now - 50 + i * 0.01) for i in range(2 * PAGE + 5)]
    fake.post(carol, "local, never late #demo", published=None)
    cursor = fake.post(carol, "the cursor #demo")["id"]
    above = fake.post(dana, "above the cursor: the ordinary poll's #demo")
    platform = MastodonPlatform(fake.base_url, TOKEN)

    found = platform.hashtag_late("demo", cursor, 60, 0)
    assert [e.id for e in found] == [s["id"] for s in in_window]  # oldest first, nothing local, nothing above
    assert all(e.kind == "hashtag" and e.tag == "demo" for e in found)
    scans = [r for r in fake.log() if r.path == "/api/v1/timelines/tag/demo"]
    assert len(scans) == 3 and all(r.query["remote"] == ["true"] for r in scans)  # two full pages, one empty
    assert too_old["id"] not in {e.id for e in found} and above["id"] not in {e.id for e in found}
    # first watched 20 s ago: what was published before is history
    assert [e.id for e in platform.hashtag_late("demo", cursor, 60, now - 20)] == []
    assert [e.id for e in platform.hashtag_late("demo", cursor, 60, now - 49.995)] == [s["id"] for s in in_window[1:]]
    # a window wider than the page cap: the newest LATE_PAGES pages below the cursor
    many = [fake.post(dana, f"busy {i} #demo", published=now - 10 + i * 0.001) for i in range(LATE_PAGES * PAGE + 7)]
    cursor = fake.post(carol, "a newer cursor #demo")["id"]
    # (the earlier post "above the cursor" is below this one, and newer than all of them)
    assert [e.id for e in platform.hashtag_late("demo", cursor, 60, 0)] == [s["id"] for s in many[8:] + [above]]
    # nothing to scan below a channel that started empty, a window of 0, or an id that is no snowflake
    assert platform.hashtag_late("demo", "0", 60, 0) == []
    assert platform.hashtag_late("demo", cursor, 0, 0) == []
    assert platform.hashtag_late("demo", "12345", 60, 0) == []


def test_status_ids_tell_their_time_as_snowflakes_and_as_ulids() -> None:
    # the ULID spec's example (github.com/ulid/spec), and a Mastodon snowflake
    assert id_time_ms("01ARYZ6S41TSV4RRFFQ69G5FAV") == 1469918176385
    assert id_at(1469918176385, "01ARYZ6S41TSV4RRFFQ69G5FAV") == "01ARYZ6S41" + "0" * 16
    assert id_time_ms(str((1_795_393_532_568 << 16) | 4242)) == 1_795_393_532_568
    assert id_at(1_795_393_532_568, "1") == str(1_795_393_532_568 << 16)
    for no_time in ("0", "12345", "9zL3eyZH2Mw1WKrk9s", "01ARYZ6S41TSV4RRFFQ69G5FA", "01ARYZ6S41TSV4RRFFQ69G5FAU"):
        assert id_time_ms(no_time) is None, no_time  # too small, Pleroma's FlakeId, too short, no Crockford U


def test_the_late_arrivals_scan_works_with_gotosocial_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = MastodonPlatform("https://gts.example", TOKEN)
    asked: list[dict] = []

    def answer(method: str, path: str, params: dict) -> list:
        asked.append(dict(params, path=path))
        return []

    monkeypatch.setattr(platform, "_json", answer)
    cursor = id_at(1_795_393_532_568, "01ARYZ6S41TSV4RRFFQ69G5FAV")[:10] + "Q69G5FAVTSV4RRFF"
    assert platform.hashtag_late("demo", cursor, 60, 0) == []
    [query] = asked
    assert query["path"] == "/api/v1/timelines/tag/demo" and query["max_id"] == cursor
    assert query["since_id"] == id_at(1_795_393_532_568 - 60_000, cursor) < cursor


def test_context_lists_the_thread_the_bot_may_see(fake: FakeMastodon) -> None:
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    root = fake.post(alice, "root")
    request = fake.post(bob, "@ppbot please", in_reply_to=root)
    fake.follow(bob, alice)
    hidden = fake.post(alice, "followers only", in_reply_to=request, visibility="private")
    below_hidden = fake.post(bob, "public answer to it", in_reply_to=hidden)
    later = fake.post(alice, "another answer", in_reply_to=request)
    body = get(fake, f"/api/v1/statuses/{request['id']}/context").json()
    assert [s["id"] for s in body["ancestors"]] == [root["id"]]
    assert [s["id"] for s in body["descendants"]] == [below_hidden["id"], later["id"]]
    assert get(fake, "/api/v1/statuses/999999/context").status_code == 404


def test_own_reply_is_the_bots_reply_of_that_kind_to_that_post(fake: FakeMastodon) -> None:
    """What a retry past the server's idempotency hour finds instead of posting again: the bot's
    reply to that very post, with images for a copy or without for a note; not another
    account's, not one further down the thread, not a deleted one."""
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    platform = MastodonPlatform(fake.base_url, TOKEN)
    request = fake.post(alice, "@ppbot please", notify=False)
    request_post = platform.get_post(request["id"])
    assert platform.own_reply(request["id"], True) is None
    fake.post(bob, "me too", in_reply_to=request, media=[fake.media(jpeg(64))])
    note = platform.reply(ReplyDraft(request_post, "@alice no photo here", "unlisted"))
    deeper = fake.post(alice, "thanks", in_reply_to=fake.statuses[note.id])
    platform.reply(ReplyDraft(platform.get_post(deeper["id"]), "@alice copy", "unlisted",
                              media_ids=[platform.upload_image(jpeg(64), "image/jpeg", "alt")]))
    assert platform.own_reply(request["id"], True) is None
    assert platform.own_reply(request["id"], False).id == note.id  # type: ignore[union-attr]
    copy = platform.reply(ReplyDraft(request_post, "@alice copy", "direct",
                                     media_ids=[platform.upload_image(jpeg(64), "image/jpeg", "alt")]))
    found = platform.own_reply(request["id"], True)
    assert found is not None and found.id == copy.id and found.visibility == "direct"
    platform.delete_post(copy.id)
    assert platform.own_reply(request["id"], True) is None
