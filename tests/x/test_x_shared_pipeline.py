"""The pipeline's invariants, once, for every platform: the same scenarios run against Mastodon
(its REST API faked with ``responses``) and X (its API v2 faked the same way), through the real
listener, handlers and Redis store."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from bot import messages
from bot.platforms.base import RateLimited
from bot.store import FIRST_CHECK_S
from bot.withdrawal import sweep
from bot_helpers import assert_anonymised, astronaut, face_box, jpeg

from worlds import WORLDS
from x_driver import Pipeline


@pytest.fixture(params=sorted(WORLDS))
def world(request: pytest.FixtureRequest, http: Any) -> Any:
    return WORLDS[request.param](http)


@pytest.fixture
def bot(world: Any, store: Any, anonymiser: Any) -> Pipeline:
    pipeline = Pipeline(world.platform, store, anonymiser, world.config)
    pipeline.start()
    return pipeline


def body(world: Any, post: dict[str, Any]) -> str:
    """A post's text without the leading mention and X's idempotency marker."""
    return re.sub(r"\s*ref [0-9a-f]{10}$", "", world.text_of(post))


def test_mention_with_photo_gets_anonymised_reply(world: Any, bot: Pipeline) -> None:
    alice = world.person("alice")
    request = world.mention(alice, "please cover the faces", images=[jpeg(512)])
    assert bot.run_all() == ["replied"]
    [reply] = world.replies_to(request)
    assert world.public_posts_by_bot() == [reply]
    assert body(world, reply).startswith("@alice Here is an anonymised copy (1 image")
    [(data, alt)] = world.images_of(reply)
    assert_anonymised(data, astronaut(512), face_box(512))
    assert "raised-fist" in alt and re.search(r"\d+ heads? covered", alt)


def test_mention_without_image_gets_help(world: Any, bot: Pipeline) -> None:
    alice = world.person("alice")
    request = world.mention(alice, "hello bot")
    assert bot.run_all() == ["no_image"]
    [answer] = world.replies_to(request)
    assert body(world, answer) == "@alice " + messages.NO_IMAGE
    assert world.images_of(answer) == []


def test_author_with_nobot_gets_no_repost_and_the_requester_an_explanation(world: Any, bot: Pipeline) -> None:
    dave = world.person("dave", note="Photographer. #NoBot please")
    bob = world.person("bob")
    original = world.photo_post(dave, "Crowd at the square", [jpeg(128)])
    request = world.mention(bob, "cover this please", in_reply_to=original)
    assert bot.run_all() == ["opted_out"]
    [answer] = world.replies_to(request)
    assert body(world, answer) == "@bob " + messages.NOBOT
    assert world.images_of(answer) == []


def answered(world: Any, bot: Pipeline) -> tuple[dict[str, Any], dict[str, Any]]:
    """dave's photo post and the bot's copy for bob."""
    dave, bob = world.person("dave"), world.person("bob")
    original = world.photo_post(dave, "Crowd at the square", [jpeg(256)])
    request = world.mention(bob, "cover the faces please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    [reply] = world.replies_to(request)
    return original, reply


def test_takedown_by_direct_message_deletes_the_copy_and_confirms(world: Any, bot: Pipeline) -> None:
    original, reply = answered(world, bot)
    carol = world.person("carol")
    world.direct_message(carol, f"I am in this photo, please delete {world.url_of(reply)}")
    assert bot.run_all() == ["deleted"]
    assert world.deleted() == [reply["id"]]
    [confirmation] = world.dms_to(carol)
    assert messages.TAKEDOWN_DONE.format(count=1) in confirmation
    world.direct_message(carol, f"and again {world.url_of(original)}")
    assert bot.run_all() == ["nothing_deleted"]
    assert messages.TAKEDOWN_ALREADY in world.dms_to(carol)[-1]
    assert len(world.dms_to(carol)) == 2 and world.public_posts_by_bot() == []


def test_a_malformed_link_does_not_stop_a_takedown(world: Any, bot: Pipeline) -> None:
    """"http://[oops" is no URL to the parser: it used to end the job with an error, so the copy
    the same message names stayed up and the sender heard "try again later", for ever."""
    _, reply = answered(world, bot)
    world.direct_message(world.person("carol"), f"please delete {world.url_of(reply)} (see also http://[oops )")
    assert bot.run_all() == ["deleted"]
    assert world.deleted() == [reply["id"]]


def test_after_a_takedown_a_new_request_gets_a_note_not_a_copy(world: Any, bot: Pipeline) -> None:
    dave, bob, carol = world.person("dave"), world.person("bob"), world.person("carol")
    original = world.photo_post(dave, "Crowd at the square", [jpeg(128)])
    world.mention(bob, "cover the faces please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    world.direct_message(carol, f"I am in this photo, please delete {world.url_of(original)}")
    assert bot.run_all() == ["deleted"]

    erin = world.person("erin")
    request = world.mention(erin, "cover this please", in_reply_to=original)
    assert bot.run_all() == ["taken_down"]
    public = [p for p in world.replies_to(request) if p.get("visibility", "public") != "direct"]  # X: tweets
    assert public == [], "no public note pointing at the photo"
    [note] = world.dms_to(erin)
    assert messages.TAKEN_DOWN in note


# --------------------------------------------------------------------------- withdrawn originals


def copied(world: Any, bot: Pipeline, author: dict[str, Any], text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``author``'s photo post and the bot's public copy of it, asked for by a fresh account."""
    original = world.photo_post(author, text, [jpeg(64)])
    request = world.mention(world.person(f"asker{len(world.deleted())}{text[:3]}"), "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    [copy] = world.replies_to(request)
    return original, copy


def test_a_copy_goes_when_its_original_is_deleted(world: Any, bot: Pipeline) -> None:
    """The author took the photo back: the bot's copy must not stay up as its only trace."""
    original, copy = copied(world, bot, world.person("dave"), "Crowd at the square")
    now = time.time()
    assert sweep(world.platform, bot.store, now) == 0, "not due before its first check"
    assert sweep(world.platform, bot.store, now + FIRST_CHECK_S + 1) == 0, "unchanged: kept"
    world.author_deletes(original)
    assert sweep(world.platform, bot.store, now + FIRST_CHECK_S + 2) == 0, "next check not due yet"
    assert sweep(world.platform, bot.store, now + 6 * 3600 + 1) == 1
    assert world.deleted() == [copy["id"]]
    assert bot.store.due_originals(world.name, now + 400 * 86400, 10, 60) == [], "no longer watched"


def test_copies_go_when_the_author_locks_the_account_or_opts_out(world: Any, bot: Pipeline) -> None:
    """A locked (protected) account's photos are never copied in public, and #nobot means no
    copy at all: a change of mind after the copy counts as much as before it."""
    locker, refuser, steady = world.person("dave"), world.person("erin"), world.person("fay")
    _, locked_copy = copied(world, bot, locker, "March one")
    _, refused_copy = copied(world, bot, refuser, "March two")
    _, kept_copy = copied(world, bot, steady, "March three")
    world.lock(locker)
    world.set_note(refuser, "Please no bots here #NoBot")
    assert sweep(world.platform, bot.store, time.time() + FIRST_CHECK_S + 1) == 2
    assert sorted(world.deleted()) == sorted([locked_copy["id"], refused_copy["id"]])
    assert kept_copy["id"] not in world.deleted()


def test_a_copy_made_while_a_takedown_runs_does_not_survive_it(world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """erin's copy is being made when carol's takedown of the same photo runs: the takedown
    cannot see a copy not yet recorded, so the handler looks for the mark after recording."""
    dave, bob, carol, erin = (world.person(n) for n in ("dave", "bob", "carol", "erin"))
    original = world.photo_post(dave, "Crowd at the square", [jpeg(64)])
    world.mention(bob, "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    request = world.mention(erin, "me too please", in_reply_to=original)
    [erins_job] = bot.poll()
    real = bot.anonymiser.anonymise
    outcomes: list[str] = []

    def takedown_meanwhile(*args: Any, **kwargs: Any) -> Any:
        world.direct_message(carol, f"I am in this photo, please delete {world.url_of(original)}")
        outcomes.extend(bot.run_all())
        return real(*args, **kwargs)

    monkeypatch.setattr(bot.anonymiser, "anonymise", takedown_meanwhile)
    assert bot.run(erins_job) == "taken_down"
    assert outcomes == ["deleted"]
    assert bot.store.replies_of(world.name, original["id"]) == set()
    live = [p for p in world.public_posts_by_bot() if p["id"] not in world.deleted()]
    assert not any(world.images_of(p) for p in live), "no copy left up"
    assert all(p["id"] in world.deleted() for p in world.replies_to(request))


def _record_fails_once(bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next ``record_reply`` fails as a Redis outage would, after the copy was posted."""
    import redis

    real = bot.store.record_reply

    def failing(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(bot.store, "record_reply", real)
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(bot.store, "record_reply", failing)


def test_a_copy_posted_but_not_recorded_is_found_whatever_happens_before_the_retry(
    world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failed between posting bob's copy and recording it, and dave deleted his photo
    before the retry: the retry answered "gone" and the copy stayed up, recorded nowhere, so no
    takedown or sweep could ever remove it. The retry now finds and records it first, and the
    sweep deletes it at once."""
    dave, bob = world.person("dave"), world.person("bob")
    original = world.photo_post(dave, "Crowd at the square", [jpeg(64)])
    request = world.mention(bob, "cover please", in_reply_to=original)
    [job] = bot.poll()
    _record_fails_once(bot, monkeypatch)
    with pytest.raises(Exception, match="Redis went away"):
        bot.run(job)
    [copy] = [p for p in world.replies_to(request) if world.images_of(p)]
    world.author_deletes(original)
    assert bot.run(job) == "replied"  # its answer went out, in the first run
    assert bot.store.replies_of(world.name, original["id"]) == {copy["id"]}
    assert [p for p in world.replies_to(request) if p["id"] != copy["id"]] == [], "no second answer"
    assert sweep(world.platform, bot.store, time.time() + 1) == 1
    assert copy["id"] in world.deleted()


def test_a_takedown_while_the_first_copy_is_made_is_kept_for_it(world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """carol asks for dave's photo to be taken down while its first copy is being made: the
    takedown found no record, kept nothing, and the copy was posted and left up."""
    dave, erin, carol = (world.person(n) for n in ("dave", "erin", "carol"))
    original = world.photo_post(dave, "Crowd at the square", [jpeg(64)])
    request = world.mention(erin, "cover please", in_reply_to=original)
    [job] = bot.poll()
    real_reply = world.platform.reply
    outcomes: list[str] = []

    def takedown_meanwhile(draft: Any) -> Any:
        world.direct_message(carol, f"I am in this photo, please delete {world.url_of(original)}")
        outcomes.extend(bot.run_all())
        return real_reply(draft)

    monkeypatch.setattr(world.platform, "reply", takedown_meanwhile)
    assert bot.run(job) == "taken_down"
    assert outcomes == ["nothing_deleted"]
    assert bot.store.taken_down(world.name, original["id"])
    assert all(p["id"] in world.deleted() for p in world.replies_to(request) if world.images_of(p))


def test_a_check_where_nothing_changed_reads_only_the_original(world: Any, bot: Pipeline, http: Any) -> None:
    """A locked author's photo, copied by DM: every check reads the original, never the copies
    (X would answer each DM read from the budget the listener's DM polling needs)."""
    dave, bob = world.person("dave"), world.person("bob")
    world.lock(dave)
    original = world.photo_post(dave, "Only for my followers", [jpeg(64)])
    world.mention(bob, "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    copy_id = bot.store.reply_for(world.name, original["id"], bob["id"]).split(":")[-1]
    before = len(http.calls)
    assert sweep(world.platform, bot.store, time.time() + FIRST_CHECK_S + 1) == 0
    urls = [call.request.url for call in http.calls[before:]]
    assert any(original["id"] in url for url in urls), "the original was read"
    assert not any(copy_id in url for url in urls), "its DM copy was not"


def test_a_copy_made_during_a_check_keeps_its_first_check(world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """erin's copy of dave's photo is recorded while the sweep checks it (its first copy, bob's,
    is days old): the sweep then set the next check from bob's schedule, days away, and erin's
    copy missed its first check an hour after it was made."""
    dave, bob, erin = (world.person(n) for n in ("dave", "bob", "erin"))
    original = world.photo_post(dave, "Crowd at the square", [jpeg(64)])
    world.mention(bob, "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    later = time.time() + 3 * 86400  # bob's copy is three days old: checks are a day apart
    real = world.platform.get_post

    def copy_meanwhile(post_id: str) -> Any:
        if post_id == original["id"]:
            monkeypatch.setattr(world.platform, "get_post", real)
            world.mention(erin, "me too please", in_reply_to=original)
            monkeypatch.setattr(time, "time", lambda: later)
            assert bot.run_all() == ["replied"]
            monkeypatch.undo()
        return real(post_id)

    monkeypatch.setattr(world.platform, "get_post", copy_meanwhile)
    assert sweep(world.platform, bot.store, later) == 0
    due = bot.store.r.zscore(f"ppb:watch:{world.name}", original["id"])
    assert due <= later + FIRST_CHECK_S + 1, f"next check {(due - later) / 3600:.1f} h away"


def test_one_failing_check_does_not_stop_the_others(world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    broken, _ = copied(world, bot, world.person("dave"), "First")
    withdrawn, copy = copied(world, bot, world.person("erin"), "Second")
    world.author_deletes(withdrawn)
    real = world.platform.get_post

    def get_post(post_id: str) -> Any:
        if post_id == broken["id"]:
            raise ValueError("the server answered a page that is not JSON")
        return real(post_id)

    monkeypatch.setattr(world.platform, "get_post", get_post)
    assert sweep(world.platform, bot.store, time.time() + FIRST_CHECK_S + 1) == 1
    assert copy["id"] in world.deleted()


def test_a_copy_a_takedown_overtook_is_deleted_by_the_retry_when_its_deletion_failed(
    world: Any, bot: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The takedown may just have spent the deletion budget: the overtaken copy's deletion fails
    (a rate limit), the job is retried, and the retry deletes it instead of calling it done.
    The original's withdrawal check was brought forward meanwhile, as a backstop."""
    dave, bob, carol, erin = (world.person(n) for n in ("dave", "bob", "carol", "erin"))
    original = world.photo_post(dave, "Crowd at the square", [jpeg(64)])
    world.mention(bob, "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    world.mention(erin, "me too please", in_reply_to=original)
    [erins_job] = bot.poll()
    real_anonymise, real_delete = bot.anonymiser.anonymise, world.platform.delete_post

    def takedown_meanwhile(*args: Any, **kwargs: Any) -> Any:
        world.direct_message(carol, f"I am in this photo, please delete {world.url_of(original)}")
        assert bot.run_all() == ["deleted"]
        monkeypatch.setattr(world.platform, "delete_post", spent)
        return real_anonymise(*args, **kwargs)

    def spent(post_id: str) -> bool:
        raise RateLimited("deletion budget spent", 60.0)

    monkeypatch.setattr(bot.anonymiser, "anonymise", takedown_meanwhile)
    with pytest.raises(RateLimited):
        bot.run(erins_job)
    [overtaken] = bot.store.replies_of(world.name, original["id"])
    assert bot.store.r.zscore(f"ppb:watch:{world.name}", original["id"]) <= time.time(), "check brought forward"
    monkeypatch.setattr(world.platform, "delete_post", real_delete)
    assert bot.run(erins_job) == "taken_down"
    assert bot.store.replies_of(world.name, original["id"]) == set()
    assert overtaken.split(":")[-1] in [d.split(":")[-1] for d in world.deleted()] + [
        e.split(":")[-1] for e in getattr(world.fake, "deleted_dms", [])]


def test_a_copy_recorded_without_its_visibility_is_read_once(world: Any, bot: Pipeline, http: Any) -> None:
    """Copies an older version recorded carry no visibility: the first check reads and keeps
    it, the next ones read only the original."""
    dave, bob = world.person("dave"), world.person("bob")
    world.lock(dave)
    original = world.photo_post(dave, "Only for my followers", [jpeg(64)])
    world.mention(bob, "cover please", in_reply_to=original)
    assert bot.run_all() == ["replied"]
    copy_id = bot.store.reply_for(world.name, original["id"], bob["id"])
    bot.store.r.delete(f"ppb:visibility:{world.name}:{copy_id}")  # as an older version recorded it
    raw = copy_id.split(":")[-1]
    reads = []
    for hours in (1, 7):
        before = len(http.calls)
        assert sweep(world.platform, bot.store, time.time() + hours * 3600 + 1) == 0
        reads.append(sum(raw in call.request.url for call in http.calls[before:]))
    assert reads[0] >= 1 and reads[1] == 0
    assert bot.store.copy_visibility(world.name, copy_id) == "direct"
