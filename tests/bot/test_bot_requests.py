"""Who gets answered, and how often: the request rules of the mention and takedown handlers.

These run the handlers in this process against the fake Mastodon server and the real Redis (a
database of their own), with a stand-in anonymiser: what is tested here is who may get a copy,
what the bot says and how many posts it makes, not the image work the end-to-end tests cover.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import redis

from bot import messages
from bot.config import BotConfig
from bot.deletion_words import asks_deletion, commands_deletion
from bot.handler import Job, MentionHandler
from bot.listener import Listener, job_for
from bot.platforms.base import Account, Event, NotFound, PlatformError, Post, RateLimited, ServerError
from bot.platforms.mastodon import MastodonPlatform, html_to_text
from bot.store import FIRST_CHECK_S, Store
from bot.takedown import TakedownHandler
from bot.withdrawal import sweep
from bot_harness import RedisServer
from bot_helpers import jpeg
from fake_mastodon import TOKEN, FakeMastodon, iso


class StandIn:
    """Answers every photo with a small JPEG and one covered head."""

    def __init__(self) -> None:
        self.calls = 0
        self.budgets: list[dict[str, int | None]] = []

    def anonymise(self, data: bytes, **budgets: int | None) -> SimpleNamespace:
        self.calls += 1
        self.budgets.append(budgets)
        return SimpleNamespace(data=jpeg(32, exif=False), mime="image/jpeg", report=SimpleNamespace(heads_covered=1))


class World:
    def __init__(self, fake: FakeMastodon, store: Store) -> None:
        self.fake = fake
        self.store = store
        self.anonymiser = StandIn()
        self.configure()

    def configure(self, **settings: Any) -> None:
        self.config = BotConfig(mastodon_base_url=self.fake.base_url, mastodon_access_token=TOKEN,
                                allow_private_addresses=True, **settings)

    def platform(self) -> MastodonPlatform:
        return MastodonPlatform(self.fake.base_url, TOKEN)

    def job(self, status: dict[str, Any]) -> Job:
        platform = self.platform()
        job = job_for(Event("mention", "1", platform.parse_post(status)), platform.me())
        job.platform = "mastodon"
        return job

    def run(self, status: dict[str, Any]) -> str:
        job = self.job(status)
        if job.kind == "takedown":
            return TakedownHandler(self.platform(), self.store, 20).handle(job)
        return MentionHandler(self.platform(), self.store, self.anonymiser, self.config).handle(job)

    def said(self) -> list[str]:
        return [html_to_text(s["content"]) for s in self.fake.bot_posts()]


@pytest.fixture
def world(fake_server: FakeMastodon, redis_server: RedisServer) -> Iterator[World]:
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3", decode_responses=True)
    client.flushdb()
    fake_server.reset()
    yield World(fake_server, Store(client))
    fake_server.reset()
    client.flushdb()
    client.close()


def answered_privately(world: World) -> tuple[dict, dict, dict]:
    """bob's followers-only photo, alice's request (she follows bob) and the bot's DM copy."""
    fake = world.fake
    bob, alice = fake.add_account("bob"), fake.add_account("alice")
    fake.follow(fake.bot, bob)
    fake.follow(alice, bob)
    original = fake.post(bob, "our demo", media=[fake.media(jpeg(64))], visibility="private")
    request = fake.mention(alice, "please cover the faces", in_reply_to=original, visibility="private")
    assert world.run(request) == "replied"
    [copy] = fake.bot_posts()
    assert copy["visibility"] == "direct" and copy["media_attachments"]
    return original, request, copy


# -- takedowns --------------------------------------------------------------------------------


def answered_publicly(world: World, author_domain: str | None = None) -> tuple[dict, dict, dict]:
    """dave's public photo, bob's request under it and the bot's public copy."""
    fake = world.fake
    dave, bob = fake.add_account("dave", domain=author_domain), fake.add_account("bob")
    original = fake.post(dave, "Crowd at the square", media=[fake.media(jpeg(64))])
    request = fake.mention(bob, "cover the faces please", in_reply_to=original)
    assert world.run(request) == "replied"
    [copy] = fake.bot_posts()
    return original, request, copy


@pytest.mark.parametrize("visibility", ["direct", "public"])
@pytest.mark.parametrize("under", ["original", "request"])
def test_a_deletion_asked_in_the_thread_by_link_is_a_takedown(world: World, under: str, visibility: str) -> None:
    """Asked under the photo, it used to get the asker a fresh copy (and leave the named one up);
    asked under someone's request, it went unanswered."""
    fake = world.fake
    original, request, copy = answered_publicly(world)
    carol = fake.add_account("carol")
    parent = original if under == "original" else request
    ask = fake.mention(carol, f"please delete {copy['url']}, I am in this photo", in_reply_to=parent, visibility=visibility)
    assert world.job(ask).kind == "takedown"

    assert world.run(ask) == "deleted"
    assert fake.deleted == [copy["id"]]
    assert world.anonymiser.calls == 1, "no new copy for the person asking for its removal"
    assert world.said()[-1] == "@carol " + messages.TAKEDOWN_DONE.format(count=1)


def test_in_the_thread_only_a_named_post_makes_a_deletion_word_a_takedown(world: World) -> None:
    """"remove the faces" under a photo asks for a copy; so does a link the message does not
    ask to delete, and a profile link names no post."""
    fake = world.fake
    original, _, copy = answered_publicly(world)
    carol = fake.add_account("carol")
    for text, visibility in [
        ("please remove the faces", "direct"),
        (f"cover this one too, like {copy['url']}", "direct"),
        (f"please remove the faces, {fake.base_url}/@protestbot", "direct"),
        (f"I saw {copy['url']}, please delete nothing", "public"),  # public: not a command
    ]:
        assert world.job(fake.mention(carol, text, in_reply_to=original, visibility=visibility)).kind == "mention", text
    assert fake.deleted == []


def test_a_failed_lookup_of_a_remote_link_is_retried_not_answered_as_unknown(world: World) -> None:
    """A link to a post on another server needs the bot's server to look it up; a 503 there
    said "not a copy of mine" and closed the request, leaving the copy up."""
    fake = world.fake
    _, _, copy = answered_publicly(world)
    carol = fake.add_account("carol", domain="their.example")
    ask = fake.mention(carol, f"please delete {fake.seen_from(copy, 'their.example')}", visibility="direct")
    fake.fail("GET", "/api/v2/search", 503)
    with pytest.raises(ServerError):
        world.run(ask)
    assert fake.deleted == [] and world.said()[1:] == []

    assert world.run(ask) == "deleted"  # the task's retry
    assert fake.deleted == [copy["id"]]


def test_a_malformed_link_does_not_stop_the_others_in_a_takedown(world: World) -> None:
    fake = world.fake
    _, _, copy = answered_publicly(world)
    carol = fake.add_account("carol")
    ask = fake.mention(carol, f"delete http://[oops and {copy['url']} and http://x.example:port/1", visibility="direct")
    assert world.run(ask) == "deleted"
    assert fake.deleted == [copy["id"]]


def test_thanks_answering_the_copy_does_not_delete_it(world: World) -> None:
    fake = world.fake
    _, _, copy = answered_privately(world)
    alice = copy["mentions"][0]
    thanks = fake.mention(fake.accounts[alice["id"]], "thank you so much!", in_reply_to=copy, visibility="direct")
    assert world.job(thanks).kind == "takedown"  # a DM answering the bot: the takedown handler decides

    assert world.run(thanks) == "no_intent"
    assert fake.deleted == [] and fake.delete_attempts == []
    assert world.said()[-1] == "@alice " + messages.TAKEDOWN_ASK


def test_the_bot_explains_how_to_ask_once_an_hour(world: World) -> None:
    fake = world.fake
    _, _, copy = answered_privately(world)
    alice = fake.accounts[copy["mentions"][0]["id"]]
    outcomes = [world.run(fake.mention(alice, text, in_reply_to=copy, visibility="direct")) for text in ("thanks!", "great")]
    outcomes.append(world.run(fake.mention(alice, "how does this work?", visibility="direct")))
    assert outcomes == ["no_intent", "helped_recently", "helped_recently"]
    assert world.said()[1:] == ["@alice " + messages.TAKEDOWN_ASK]
    # a request is still a request
    assert world.run(fake.mention(alice, "please delete this", in_reply_to=copy, visibility="direct")) == "deleted"


def test_an_auto_responder_gets_one_answer_not_one_per_message(world: World) -> None:
    """An auto-responder (not marked as a bot) answers every direct message; the bot used to
    answer every such answer with how to ask, and the two wrote to each other until the hourly
    takedown limit, every hour."""
    fake = world.fake
    away = fake.add_account("away")
    message = fake.mention(away, "hello", visibility="direct")
    outcomes = []
    for _ in range(5):
        outcomes.append(world.run(message))
        message = fake.mention(away, "I am away until Monday.", in_reply_to=fake.bot_posts()[-1], visibility="direct")
    assert outcomes == ["no_reference"] + ["ignored_reply"] * 4
    assert world.said() == ["@away " + messages.TAKEDOWN_HELP]


def test_thanks_for_a_confirmation_is_not_answered(world: World) -> None:
    """Only an answer to one of the bot's copies may be a takedown; an answer to its confirmation
    or help is talk."""
    fake = world.fake
    _, _, copy = answered_privately(world)
    alice = fake.accounts[copy["mentions"][0]["id"]]
    assert world.run(fake.mention(alice, "please delete this", in_reply_to=copy, visibility="direct")) == "deleted"
    confirmation = fake.bot_posts()[-1]
    thanks = fake.mention(alice, "thank you!", in_reply_to=confirmation, visibility="direct")
    assert world.job(thanks).kind == "takedown"
    assert world.run(thanks) == "ignored_reply"
    assert len(fake.bot_posts()) == 2, "the copy and the confirmation"


@pytest.mark.parametrize("text, unknown", [
    ("please delete this", 0), ("Take it down please", 0), ("bitte löschen", 0), ("supprimez-la svp", 0),
    # a link or number that names nothing of the bot's does not undo the request for the copy
    # answered, and is said to have been left alone
    ("please delete this, I am in it. Why: https://example.org/privacy-matters", 1),
    ("take it down please, call me on 0123456789 if needed", 1),
])
def test_asking_to_delete_in_a_reply_to_the_copy_deletes_it(world: World, text: str, unknown: int) -> None:
    fake = world.fake
    _, _, copy = answered_privately(world)
    alice = fake.accounts[copy["mentions"][0]["id"]]
    assert world.run(fake.mention(alice, text, in_reply_to=copy, visibility="direct")) == "deleted"
    assert fake.deleted == [copy["id"]]
    said = [messages.TAKEDOWN_DONE.format(count=1)] + ([messages.takedown_unknown(unknown)] if unknown else [])
    assert world.said()[-1] == " ".join(["@alice", *said])


def test_a_link_answering_the_copy_without_asking_deletes_nothing(world: World) -> None:
    fake = world.fake
    _, _, copy = answered_privately(world)
    alice = fake.accounts[copy["mentions"][0]["id"]]
    assert world.run(fake.mention(alice, "thanks! more at https://example.org/march", in_reply_to=copy,
                                  visibility="direct")) == "nothing_deleted"
    assert fake.deleted == [] and fake.delete_attempts == []


def test_a_public_answer_to_the_copy_asking_for_deletion_deletes_it(world: World) -> None:
    # Many people answer the copy in public instead of by DM; "delete this" must work there too,
    # confirmed by DM; a public "quite good, thanks" is not a takedown.
    fake = world.fake
    bob, alice = fake.add_account("bob"), fake.add_account("alice")
    original = fake.post(bob, "the square", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(alice, "cover please", in_reply_to=original)) == "replied"
    [copy] = fake.bot_posts()
    assert copy["visibility"] == "public"

    praise = fake.mention(bob, "quite good, thanks", in_reply_to=copy)
    assert world.job(praise).kind == "mention" and world.run(praise) == "ignored_own_copy"
    assert fake.deleted == []
    request = fake.mention(bob, "@alice please take this down, I am in it", in_reply_to=copy)
    assert world.job(request).kind == "takedown"
    assert world.run(request) == "deleted"
    assert fake.deleted == [copy["id"]]
    confirmation = fake.bot_posts()[-1]
    assert confirmation["visibility"] == "direct" and [m["acct"] for m in confirmation["mentions"]] == ["bob"]


@pytest.mark.parametrize("text,asks", [
    ("please delete this", True), ("Take that down", True), ("bitte löschen", True), ("bórralo por favor", True),
    ("quítala", True), ("cancellala", True), ("verwijder dit", True), ("exclua", True), ("usuń to", True),
    ("retirez-la", True), ("I am in it, please remove it", True),
    ("quite good, thanks", False), ("can I borrow this?", False), ("exclusive photo!", False),
    ("the march was cancelled", False), ("cancellation", False), ("thank you so much!", False),
    ("Retired teachers marched too", False), ("Happy retirement", False),
    ("@retired_nurse @bob nice one", False), ("see https://example.com/delete-me", False),
])
def test_deletion_intent_words(text: str, asks: bool) -> None:
    assert asks_deletion(text) is asks


@pytest.mark.parametrize("text,commands", [
    ("@ppbot delete this", True), ("@ppbot @alice please take it down", True), ("Bitte löschen!", True),
    ("please, remove this copy", True), ("@ppbot supprime-la", True),
    ("Thanks! I'll delete my original now", False), ("Great, removing the original", False),
    ("Please don't delete this", False), ("@ppbot great work, will delete mine", False),
])
def test_a_public_answer_must_be_a_command_to_delete(text: str, commands: bool) -> None:
    """Public answers to the copy are mostly thanks and talk: only a deletion word first (after
    at most a "please") takes the copy down."""
    assert commands_deletion(text) is commands


def _two_copies(world: World) -> tuple[dict[str, Any], Any, dict[str, Any], dict[str, Any]]:
    """bob's photo post, copied for alice and then for carol."""
    fake = world.fake
    bob, alice, carol = fake.add_account("bob"), fake.add_account("alice"), fake.add_account("carol")
    original = fake.post(bob, "the square", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(alice, "cover please", in_reply_to=original)) == "replied"
    assert world.run(fake.mention(carol, "me too", in_reply_to=original)) == "replied"
    copy_a, copy_c = fake.bot_posts()
    return original, alice, copy_a, copy_c


def test_takedown_retried_after_a_platform_error_deletes_the_other_copies(world: World) -> None:
    """The first run deletes alice's copy, then the server fails on carol's copy (a 503, or
    Mastodon's 30 deletions per 30 minutes): the retry must still find the original through the
    deleted copy, delete carol's copy and confirm both. It used to find nothing, leave carol's
    copy up and tell alice that nothing was deleted; then it confirmed carol's copy only."""
    fake = world.fake
    _, alice, copy_a, copy_c = _two_copies(world)
    dm = fake.mention(alice, "please delete this", in_reply_to=copy_a, visibility="direct")
    fake.fail("GET", f"/api/v1/statuses/{copy_c['id']}", 503)
    with pytest.raises(ServerError):
        world.run(dm)  # Celery retries the task
    assert fake.deleted == [copy_a["id"]]
    assert world.run(dm) == "deleted"
    assert sorted(fake.deleted) == sorted([copy_a["id"], copy_c["id"]])
    assert world.said()[-1] == "@alice " + messages.TAKEDOWN_DONE.format(count=2)


def test_a_takedown_retried_after_the_deletion_limit_is_counted_once(world: World) -> None:
    """The server refuses the second deletion with a 429 and Celery retries the job later: the
    retry used to count against the sender's hourly takedown limit again (here refusing the
    sender's only request of the hour as a flood) and to confirm only what it deleted itself."""
    fake = world.fake
    original, _, copy_a, copy_c = _two_copies(world)
    dave = fake.add_account("dave")
    job = world.job(fake.mention(dave, f"please delete {original['url']}", visibility="direct"))
    fake.fail("DELETE", f"/api/v1/statuses/{copy_c['id']}", 429)
    with pytest.raises(RateLimited):
        TakedownHandler(world.platform(), world.store, per_account_per_hour=1).handle(job)
    assert fake.deleted == [copy_a["id"]]

    assert TakedownHandler(world.platform(), world.store, per_account_per_hour=1).handle(job) == "deleted"
    assert sorted(fake.deleted) == sorted([copy_a["id"], copy_c["id"]])
    assert world.said()[-1] == "@dave " + messages.TAKEDOWN_DONE.format(count=2)
    # counted once, all the same: a second request in the hour is one too many
    again = world.job(fake.mention(dave, f"delete {original['id']}", visibility="direct"))
    assert TakedownHandler(world.platform(), world.store, per_account_per_hour=1).handle(again) == "rate_limited"
    assert world.said()[-1] == "@dave " + messages.TAKEDOWN_LIMIT


def test_second_takedown_of_a_deleted_copy_says_it_is_already_gone(world: World) -> None:
    fake = world.fake
    _, _, copy_a, _ = _two_copies(world)
    dave = fake.add_account("dave")
    assert world.run(fake.mention(dave, f"delete {copy_a['id']}", visibility="direct")) == "deleted"
    assert world.run(fake.mention(dave, f"delete {copy_a['id']}", visibility="direct")) == "nothing_deleted"
    assert world.said()[-1] == "@dave " + messages.TAKEDOWN_ALREADY


def test_takedown_answer_never_repeats_what_was_sent(world: World) -> None:
    """Echoed text would let a sender smuggle a mention in, and the DM would reach a third person."""
    fake = world.fake
    carol = fake.add_account("carol")
    fake.add_account("victim")
    dm = fake.mention(carol, "delete https://e.example/a,@victim and 123456789", visibility="direct")
    assert world.run(dm) == "nothing_deleted"
    [answer] = fake.bot_posts()
    assert [m["acct"] for m in answer["mentions"]] == ["carol"]
    assert "victim" not in html_to_text(answer["content"]) and "123456789" not in html_to_text(answer["content"])
    assert html_to_text(answer["content"]).startswith("@carol " + messages.takedown_unknown(2))


def test_a_flood_of_takedown_requests_gets_one_notice(world: World) -> None:
    fake = world.fake
    carol = fake.add_account("carol")
    handler = TakedownHandler(world.platform(), world.store, per_account_per_hour=2)
    outcomes = [handler.handle(world.job(fake.mention(carol, f"delete {10_000 + n}", visibility="direct"))) for n in range(6)]
    # "I do not know that link" once an hour; every request counts against the limit
    assert outcomes == ["nothing_deleted", "helped_recently"] + ["rate_limited"] * 4
    assert world.said()[-1] == "@carol " + messages.TAKEDOWN_LIMIT
    assert len(fake.bot_posts()) == 2, "one answer and one notice, not six posts"


@pytest.mark.parametrize("when", ["before the lookup", "between lookup and delete"])
def test_takedown_of_a_copy_deleted_meanwhile_says_so(world: World, when: str) -> None:
    fake = world.fake
    original, _, copy = answered_privately(world)
    if when == "before the lookup":
        fake.deleted.append(copy["id"])  # a moderator removed it
    else:
        fake.fail("DELETE", f"/api/v1/statuses/{copy['id']}", 404)
    carol = fake.add_account("carol")
    assert world.run(fake.mention(carol, f"delete {original['id']}", visibility="direct")) == "nothing_deleted"
    assert world.said()[-1] == "@carol " + messages.TAKEDOWN_ALREADY


def test_after_a_takedown_nobody_gets_a_new_copy(world: World) -> None:
    """A person in the photo has the copies deleted; the next request for that photo, by anyone
    (the first requester too), is answered with a short note, not with a new copy."""
    fake = world.fake
    original, alice, copy_a, copy_c = _two_copies(world)
    pictured = fake.add_account("pictured")
    assert world.run(fake.mention(pictured, f"I am in it, delete {copy_a['url']}", visibility="direct")) == "deleted"
    assert sorted(fake.deleted) == sorted([copy_a["id"], copy_c["id"]])
    posts_before = len(fake.bot_posts())

    erin = fake.add_account("erin")
    request = fake.mention(erin, "cover please", in_reply_to=original)
    assert world.run(request) == "taken_down"
    again = fake.mention(alice, "can I have it again?", in_reply_to=original)
    assert world.run(again) == "taken_down"
    assert world.anonymiser.calls == 2, "only the two copies made before the takedown"
    [note_e] = fake.replies_to(request["id"])
    [note_a] = fake.replies_to(again["id"])
    assert html_to_text(note_e["content"]) == "@erin " + messages.TAKEN_DOWN
    assert html_to_text(note_a["content"]) == "@alice " + messages.TAKEN_DOWN
    # privately, though the request was public: a public note would point at the photo
    assert note_e["visibility"] == note_a["visibility"] == "direct" and not note_e["media_attachments"]
    assert len(fake.bot_posts()) == posts_before + 2
    # kept, like the reply records, for a year, under the post id
    ttl = world.store.r.ttl(f"ppb:taken_down:mastodon:{original['id']}")
    assert 364 * 24 * 3600 < ttl <= 365 * 24 * 3600


def test_the_note_after_a_takedown_follows_the_audience_rules(world: World) -> None:
    """A followers-only original: its audience is told by direct message, a stranger outside it
    gets the answer every stranger gets and does not learn that a copy existed."""
    fake = world.fake
    original, request, copy = answered_privately(world)
    alice = fake.accounts[copy["mentions"][0]["id"]]
    assert world.run(fake.mention(alice, "please delete this", in_reply_to=copy, visibility="direct")) == "deleted"

    again = fake.mention(alice, "once more please", in_reply_to=original, visibility="private")
    assert world.run(again) == "taken_down"
    [note] = fake.replies_to(again["id"])
    assert note["visibility"] == "direct" and html_to_text(note["content"]) == "@alice " + messages.TAKEN_DOWN
    eve = fake.add_account("eve", domain="elsewhere.example")
    assert world.run(fake.mention(eve, "cover", in_reply_to=original)) == "not_visible"
    assert world.said()[-1] == "@eve " + messages.NOT_YOURS


def test_a_hashtag_post_under_a_photo_its_author_may_not_see_gets_no_answer(world: World) -> None:
    """Its author asked nothing: like every other refusal to a hashtag post, this one is silent."""
    fake = world.fake
    alice = fake.add_account("alice")
    fake.follow(fake.bot, alice)
    private = fake.post(alice, "for my followers", media=[fake.media(jpeg(64))], visibility="private")
    bob = fake.add_account("bob", domain="elsewhere.example")
    tagged = fake.post(bob, "what a day #protest", in_reply_to=private)
    job = Job(platform="mastodon", post_id=tagged["id"], requester_id=bob["id"], kind="hashtag")
    assert MentionHandler(world.platform(), world.store, world.anonymiser, world.config).handle(job) == "not_visible"
    assert fake.bot_posts() == []


def test_a_hashtag_post_that_mentions_the_bot_is_judged_as_a_mention(world: World) -> None:
    """The tag's channel may sight such a post before the mentions channel: its one job must
    still be a request (told why it gets no copy) or a takedown, not a silent hashtag job."""
    fake = world.fake
    platform = world.platform()
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    plain = fake.post(alice, "the march today #protest", media=[fake.media(jpeg(64))])
    no_photo = fake.post(bob, "@ppbot how does this work? #protest")
    _, _, copy = answered_publicly(world)
    command = fake.post(bob, f"@ppbot delete {copy['url']} #protest")

    def kind(status: dict[str, Any]) -> str:
        return job_for(Event("hashtag", status["id"], platform.parse_post(status), tag="protest"), platform.me()).kind

    assert [kind(plain), kind(no_photo), kind(command)] == ["hashtag", "mention", "takedown"]


def test_a_hashtag_post_taken_down_is_not_copied_again_and_nothing_is_said(world: World) -> None:
    fake = world.fake
    bob = fake.add_account("bob")
    post = fake.post(bob, "at the square #protest", media=[fake.media(jpeg(64))])
    job = Job(platform="mastodon", post_id=post["id"], requester_id=bob["id"], kind="hashtag")
    handler = MentionHandler(world.platform(), world.store, world.anonymiser, world.config)
    assert handler.handle(job) == "replied"
    [copy] = fake.bot_posts()
    carol = fake.add_account("carol")
    assert world.run(fake.mention(carol, f"delete {copy['url']}", visibility="direct")) == "deleted"
    posts_before = len(fake.bot_posts())

    # the same post seen again (a second listener, the first sighting expired): it was answered
    assert handler.handle(job) == "already_done"
    assert len(fake.bot_posts()) == posts_before, "silent: the author of a hashtag post asked nothing"
    assert world.anonymiser.calls == 1


def test_a_request_deleted_while_its_photo_is_anonymised_ends_quietly(world: World) -> None:
    # "Delete & re-draft" while the worker is busy: the reply's 404 used to be a non-retryable
    # platform error, so the job was dead-lettered and an apology went to a deleted post.
    fake = world.fake
    bob, alice = fake.add_account("bob"), fake.add_account("alice")
    original = fake.post(bob, "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(alice, "cover please", in_reply_to=original)
    stand_in = world.anonymiser.anonymise

    def deleted_meanwhile(data: bytes, **budgets: int | None) -> SimpleNamespace:
        fake.deleted.append(request["id"])
        return stand_in(data, **budgets)

    world.anonymiser.anonymise = deleted_meanwhile  # type: ignore[method-assign]
    assert world.run(request) == "request_gone"
    assert fake.bot_posts() == []
    assert world.store.reply_for("mastodon", original["id"], alice["id"]) is None


@pytest.mark.parametrize("profile", [
    {"note": "Photographer. #NoBot please"},
    {"fields": [("Bots", "#nobot"), ("Web", "https://example.org")]},  # a metadata value
    {"fields": [("#NoAnon", "please"), ("Pronouns", "she/her")]},  # a metadata name
])
def test_an_author_who_opts_out_anywhere_in_the_profile_gets_no_copy(world: World, profile: dict) -> None:
    fake = world.fake
    dave, bob = fake.add_account("dave", **profile), fake.add_account("bob")
    original = fake.post(dave, "Crowd at the square", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(bob, "cover please", in_reply_to=original)) == "opted_out"
    assert world.said() == [f"@bob {messages.NOBOT}"]
    assert world.anonymiser.calls == 0 and fake.media_requests() == []


def test_a_reply_refused_as_not_found_for_another_reason_is_still_an_error(world: World) -> None:
    fake = world.fake
    alice = fake.add_account("alice")
    request = fake.mention(alice, "cover please", media=[fake.media(jpeg(64))])
    fake.fail("POST", "/api/v1/statuses", 404)
    with pytest.raises(NotFound):
        world.run(request)


def test_the_copy_is_made_to_fit_what_the_server_publishes_it_accepts(world: World) -> None:
    """A server with smaller limits than mastodon.social's (its instance API says so) would
    refuse an upload made to the stock limits after all the work; its text limit is the reply's."""
    fake = world.fake
    fake.configuration["media_attachments"].update(image_size_limit=2 * 1024 * 1024, image_matrix_limit=4_000_000)
    fake.configuration["statuses"]["max_characters"] = 300
    bob, alice = fake.add_account("bob"), fake.add_account("alice")
    photos = [fake.post(bob, f"the square {n}", media=[fake.media(jpeg(64))], spoiler_text="police " * 30)
              for n in range(2)]
    for photo in photos:
        assert world.run(fake.mention(alice, "cover please", in_reply_to=photo)) == "replied"
    assert world.anonymiser.budgets == [{"max_output_bytes": 2 * 1024 * 1024, "max_output_pixels": 4_000_000}] * 2
    for copy in fake.bot_posts():
        assert fake.count_chars(html_to_text(copy["content"])) + len(copy["spoiler_text"]) <= 300


def test_a_server_without_an_instance_api_gets_the_stock_limits(world: World) -> None:
    fake = world.fake
    fake.fail("GET", "/api/v2/instance", 404)
    fake.fail("GET", "/api/v1/instance", 404)
    alice = fake.add_account("alice")
    assert world.run(fake.mention(alice, "cover please", media=[fake.media(jpeg(64))])) == "replied"
    assert world.anonymiser.budgets == [{"max_output_bytes": None, "max_output_pixels": None}]


# -- who may get a copy -----------------------------------------------------------------------


def test_no_copy_of_a_followers_only_post_for_someone_outside_its_audience(world: World) -> None:
    """The bot follows locked bob, so it can read his followers-only photo; a remote account
    that does not follow him replies to it anyway (other servers' replies are not checked)."""
    fake = world.fake
    bob = fake.add_account("bob", locked=True)
    fake.follow(fake.bot, bob)
    original = fake.post(bob, "for my followers", media=[fake.media(jpeg(64))], visibility="private")
    stranger = fake.add_account("eve", domain="elsewhere.example")
    request = fake.mention(stranger, "cover please", in_reply_to=original)

    assert world.run(request) == "not_visible"
    assert world.anonymiser.calls == 0 and fake.uploads == {} and fake.media_requests() == []
    [answer] = fake.bot_posts()
    assert answer["media_attachments"] == [] and answer["visibility"] == "direct"
    assert html_to_text(answer["content"]) == "@eve " + messages.NOT_YOURS  # Mastodon shows a remote mention short


def test_a_stranger_cannot_tell_whether_a_followers_only_post_has_photos(world: World) -> None:
    """The answer to a reply under a post outside the requester's audience is the same whether
    the post has photos or not: "no photo here" would tell her what she may not see."""
    fake = world.fake
    bob = fake.add_account("bob", locked=True)
    fake.follow(fake.bot, bob)
    with_photo = fake.post(bob, "followers only", media=[fake.media(jpeg(64))], visibility="private")
    text_only = fake.post(bob, "followers only, no photo", visibility="private")
    eve = fake.add_account("eve", domain="elsewhere.example")

    outcomes = [world.run(fake.mention(eve, "cover?", in_reply_to=post)) for post in (with_photo, text_only)]
    assert outcomes == ["not_visible", "not_visible"]
    first, second = fake.bot_posts()
    assert html_to_text(first["content"]) == html_to_text(second["content"]) == "@eve " + messages.NOT_YOURS
    assert first["visibility"] == second["visibility"] == "direct"
    # bob himself still hears that his text-only post has no photo
    assert world.run(fake.mention(bob, "cover?", in_reply_to=text_only, visibility="private")) == "no_image"


def test_a_direct_post_is_copied_only_for_the_people_it_addresses(world: World) -> None:
    fake = world.fake
    carol, dave = fake.add_account("carol"), fake.add_account("dave", domain="elsewhere.example")
    frank = fake.add_account("frank")
    photo = fake.mention(carol, "@frank look, please cover", media=[fake.media(jpeg(64))], visibility="direct")
    assert world.run(photo) == "replied"  # her own photo

    assert world.run(fake.mention(dave, "me too", in_reply_to=photo)) == "not_visible"
    assert world.run(fake.mention(frank, "me too", in_reply_to=photo, visibility="direct")) == "replied"
    copies = [p for p in fake.bot_posts() if p["media_attachments"]]
    assert sorted(p["mentions"][0]["acct"] for p in copies) == ["carol", "frank"]


def test_a_local_followers_only_post_is_never_reposted_in_public(world: World) -> None:
    """glitch-soc and Hometown mark posts that must not leave their server ``local_only``."""
    fake = world.fake
    alice = fake.add_account("alice")
    status = fake.mention(alice, "local only", media=[fake.media(jpeg(64))])
    status["local_only"] = True
    assert world.run(status) == "replied"
    assert fake.bot_posts()[0]["visibility"] == "direct"


def test_a_request_kept_on_its_server_is_answered_by_direct_message(world: World) -> None:
    """A local-only request under a public photo: a public reply would federate, carrying the
    requester's name and a post their server keeps to itself; the copy goes to them alone."""
    fake = world.fake
    dave, bob = fake.add_account("dave"), fake.add_account("bob")
    photo = fake.post(dave, "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(bob, "cover it", in_reply_to=photo)
    request["local_only"] = True
    assert world.run(request) == "replied"
    [copy] = [p for p in fake.bot_posts() if p["media_attachments"]]
    assert copy["visibility"] == "direct"
    assert [m["acct"] for m in copy["mentions"]] == ["bob"]


@pytest.mark.parametrize("marked", ["local_only", "akkoma_local"])
def test_a_post_kept_on_its_server_is_never_copied_for_a_remote_account(world: World, marked: str) -> None:
    """Its server shows it to its own accounts only (even when mentioned, a remote account never
    receives it), so a remote request for it came through a server that should not have it."""
    fake = world.fake
    alice = fake.add_account("alice")
    mallory = fake.add_account("mallory", domain="elsewhere.example")
    post = fake.post(alice, "for this server only @mallory@elsewhere.example", media=[fake.media(jpeg(64))])
    if marked == "local_only":
        post["local_only"] = True
    else:
        post["visibility"] = "local"
    post["mentions"] = [{"id": mallory["id"], "acct": mallory["acct"], "username": "mallory", "url": mallory["url"]}]
    assert world.run(fake.mention(mallory, "cover it", in_reply_to=post)) == "not_visible"
    assert [p for p in fake.bot_posts() if p["media_attachments"]] == []
    bob = fake.add_account("bob")  # an account of the same server may ask
    assert world.run(fake.mention(bob, "cover it", in_reply_to=post)) == "replied"
    assert [p["visibility"] for p in fake.bot_posts() if p["media_attachments"]] == ["direct"]


@pytest.mark.parametrize(("state", "outcome", "text"), [
    ("accepted", "replied", None),
    ("pending", "quote_pending", messages.QUOTE_PENDING),
    ("rejected", "quote_refused", messages.QUOTE_REFUSED),
    ("revoked", "gone", messages.GONE),
    ("deleted", "gone", messages.GONE),
])
def test_a_request_quoting_a_photo_is_judged_by_the_quotes_state(world: World, state: str, outcome: str, text: str | None) -> None:
    """Mastodon 4.5 shows a quoted post only once its author's server approves the quote: a
    pending one was answered "no photo here", and no new mention comes when it is approved."""
    fake = world.fake
    photo = fake.post(fake.add_account("dave", domain="remote.example"), "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(fake.add_account("bob"), "please anonymise")
    fake.set_quote(request, photo, state)
    assert world.run(request) == outcome
    [answer] = fake.replies_to(request["id"])
    if text is None:
        assert answer["media_attachments"]
    else:
        assert not answer["media_attachments"]
        assert html_to_text(answer["content"]) == "@bob " + text


def copied_photo(world: World) -> tuple[dict, dict]:
    """dave's photo and the copy the bot made of it for bob."""
    fake = world.fake
    photo = fake.post(fake.add_account("dave"), "the square", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(fake.add_account("bob"), "cover please", in_reply_to=photo)) == "replied"
    [copy] = fake.bot_posts()
    return photo, copy


def told_privately(world: World, ask: dict, text: str) -> None:
    """``ask`` gets ``text`` by direct message, without an image, and only once."""
    assert world.run(ask) == "takedown_help"
    [answer] = world.fake.replies_to(ask["id"])
    assert answer["visibility"] == "direct" and not answer["media_attachments"]
    assert html_to_text(answer["content"]) == f"@{ask['account']['acct']} " + text
    assert world.run(ask) == "already_done"


def test_asking_under_the_original_for_the_copy_to_go_never_makes_another(world: World) -> None:
    """"@ppbot delete your copy, I am in this photo" under a photo the bot copied: the person
    asking for removal got a fresh copy and the first stayed up. They are told how to have it
    deleted, privately. On a photo not yet copied, "remove ..." is an ordinary request."""
    fake = world.fake
    photo, copy = copied_photo(world)
    ask = fake.mention(fake.add_account("carol"), "delete your copy please, I am in this photo", in_reply_to=photo)
    told_privately(world, ask, messages.DELETE_NOT_COPY)
    assert [p["id"] for p in fake.bot_posts() if p["media_attachments"]] == [copy["id"]]

    fresh = fake.post(fake.add_account("erin"), "the park", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(fake.add_account("frank"), "remove the faces please", in_reply_to=fresh)) == "replied"


def test_asking_under_the_copy_for_it_to_go_gets_told_how(world: World) -> None:
    """Public talk under a copy is a takedown only when it starts with the command; "can you
    delete this? I'm in it" was met with silence."""
    fake = world.fake
    _, copy = copied_photo(world)
    carol = fake.add_account("carol")
    told_privately(world, fake.mention(carol, "can you delete this? I'm in it", in_reply_to=copy), messages.TAKEDOWN_HELP)
    assert world.run(fake.mention(carol, "thank you!", in_reply_to=copy)) == "ignored_own_copy"
    assert fake.deleted == []


def test_an_unknown_visibility_counts_as_direct(world: World) -> None:
    status = {"id": "1", "account": {"id": "2", "acct": "a"}, "visibility": "local", "content": ""}
    assert MastodonPlatform.parse_post(status).visibility == "direct"
    del status["visibility"]  # a server or relay that leaves it out
    assert MastodonPlatform.parse_post(status).visibility == "direct"


def test_a_copy_of_a_photo_edited_out_of_its_post_is_withdrawn(world: World) -> None:
    """Removing a photo from a post (Mastodon lets an author edit attachments) takes it back as
    much as deleting the post; copies of the photos still shown stay, and no copy is read."""
    fake = world.fake
    dave = fake.add_account("dave")
    kept, removed = fake.media(jpeg(64)), fake.media(jpeg(64))
    original = fake.post(dave, "two photos from the square", media=[kept, removed])
    assert world.run(fake.mention(fake.add_account("bob"), "cover", in_reply_to=original)) == "replied"
    [both] = fake.bot_posts()
    start = time.time()

    assert sweep(world.platform(), world.store, start + FIRST_CHECK_S + 1) == 0, "nothing changed"
    assert fake.deleted == []
    original["media_attachments"] = [a for a in original["media_attachments"] if a["id"] == kept["id"]]
    original["edited_at"] = iso(time.time())
    assert world.run(fake.mention(fake.add_account("erin"), "cover", in_reply_to=original)) == "replied"
    only_kept = fake.bot_posts()[-1]
    reads = len(fake.requests)

    assert sweep(world.platform(), world.store, start + 6 * 3600 + 1) == 1
    assert fake.deleted == [both["id"]]
    read = [r.path for r in fake.requests[reads:] if r.method == "GET"]
    assert only_kept["id"] not in " ".join(read), "a copy of photos still shown is not even read"
    assert world.store.replies_of("mastodon", original["id"]) == {only_kept["id"]}


@pytest.mark.parametrize("warning", ["content warning", "sensitive"])
def test_a_copy_goes_when_its_original_is_put_behind_a_warning(world: World, warning: str) -> None:
    """An author who later hides the photo behind a content warning (or marks it sensitive) no
    longer shows it at a glance; a copy without the warning still would. Copies made with the
    warning stay, and none of them is read while the original has none."""
    fake = world.fake
    dave = fake.add_account("dave")
    original = fake.post(dave, "the square", media=[fake.media(jpeg(64))])
    assert world.run(fake.mention(fake.add_account("bob"), "cover", in_reply_to=original)) == "replied"
    [bare] = fake.bot_posts()
    assert not bare["sensitive"] and bare["spoiler_text"] == ""
    start = time.time()
    reads = len(fake.requests)
    assert sweep(world.platform(), world.store, start + FIRST_CHECK_S + 1) == 0, "nothing changed"
    assert bare["id"] not in " ".join(r.path for r in fake.requests[reads:])

    if warning == "content warning":
        original["spoiler_text"] = "injured protesters"
    original["sensitive"] = True
    original["edited_at"] = iso(time.time())
    assert world.run(fake.mention(fake.add_account("erin"), "cover", in_reply_to=original)) == "replied"
    warned = fake.bot_posts()[-1]
    assert warned["sensitive"] and warned["spoiler_text"] == original["spoiler_text"]

    assert sweep(world.platform(), world.store, start + 6 * 3600 + 1) == 1
    assert fake.deleted == [bare["id"]]
    assert world.store.replies_of("mastodon", original["id"]) == {warned["id"]}
    # a copy recorded before warnings were kept is judged by what it shows
    world.store.r.delete(f"ppb:warned:mastodon:{warned['id']}")
    assert world.store.copy_warned("mastodon", warned["id"]) is None
    assert sweep(world.platform(), world.store, start + 24 * 3600 + 1) == 0
    assert fake.deleted == [bare["id"]]


def test_a_copy_made_late_in_a_watch_restarts_it(world: World) -> None:
    """The watch used to keep its first copy's schedule and end: after the check on day 84 the
    next fell on day 91, past the watch's end on day 90, so a copy made on day 85 of a post
    deleted on day 86 stayed up for good."""
    from bot.withdrawal import next_check

    store, day = world.store, 24 * 3600.0
    t0 = time.time()
    store.watch("mastodon", "o1", t0)
    assert [o for o, _ in store.due_originals("mastodon", t0 + 84 * day, 10, 60)] == ["o1"]
    store.check_again("mastodon", "o1", next_check(t0, t0 + 84 * day))  # what a sweep does
    store.watch("mastodon", "o1", t0 + 85 * day)  # a new copy
    assert store.due_originals("mastodon", t0 + 85 * day + FIRST_CHECK_S + 1, 10, 60) == [("o1", t0 + 85 * day)]
    # and a copy never postpones a check due sooner
    store.watch("mastodon", "o2", t0)
    store.watch("mastodon", "o2", t0 + 1800)
    assert [o for o, _ in store.due_originals("mastodon", t0 + FIRST_CHECK_S + 1, 10, 60)] == ["o2"]


@pytest.mark.parametrize("change", ["deleted", "photos edited out"])
def test_a_redelivered_job_whose_original_changed_does_not_answer_again(world: World, change: str) -> None:
    """The copy was posted and recorded, then the worker died before its ack; by the time the
    job comes back the original is gone. The copy's record is keyed by the original, which the
    job can no longer find: it used to post a "gone" or "no photo" note as a second answer."""
    fake = world.fake
    original = fake.post(fake.add_account("dave"), "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(fake.add_account("bob"), "cover", in_reply_to=original)
    assert world.run(request) == "replied"
    if change == "deleted":
        fake.deleted.append(original["id"])
    else:
        original["media_attachments"] = []
    assert world.run(request) == "already_done"
    assert len(fake.bot_posts()) == 1


def test_the_reply_says_which_attachments_were_not_anonymised(world: World) -> None:
    fake = world.fake
    alice = fake.add_account("alice")
    video = fake.media(b"\x00\x00\x00\x18ftypmp42", content_type="video/mp4", kind="video")
    assert world.run(fake.mention(alice, "cover", media=[fake.media(jpeg(64)), video])) == "replied"
    assert "1 video, audio or other attachment (only photos are anonymised)" in world.said()[0]


# -- how often the bot speaks ------------------------------------------------------------------


def test_replies_in_a_thread_that_once_mentioned_the_bot_are_not_answered(world: World) -> None:
    fake = world.fake
    dave, alice, carol = fake.add_account("dave"), fake.add_account("alice"), fake.add_account("carol")
    photo = fake.post(dave, "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(alice, "cover please", in_reply_to=photo)
    assert world.run(request) == "replied"
    # carol answers alice; her client pre-fills "@alice @ppbot"
    chat = fake.post(carol, "@alice @ppbot great idea", in_reply_to=request)
    assert world.run(chat) == "ignored_incidental"
    # a text-only question at the top of a thread still gets help
    question = fake.mention(carol, "what do you do?")
    assert world.run(question) == "no_image"
    assert len(fake.bot_posts()) == 2


def test_talk_under_a_request_that_carried_its_photo_gets_no_copy_of_its_own(world: World) -> None:
    """A request with its own photo, answered in public: replies-all under it ("@alice @ppbot
    great idea") each cost a full copy of the same photo before."""
    fake = world.fake
    alice, bob, carol = fake.add_account("alice"), fake.add_account("bob"), fake.add_account("carol")
    request = fake.mention(alice, "cover please", media=[fake.media(jpeg(64))])
    assert world.run(request) == "replied"
    assert [world.run(fake.post(who, "@alice @ppbot great idea", in_reply_to=request)) for who in (bob, carol)] \
        == ["ignored_incidental"] * 2
    assert len(fake.bot_posts()) == 1
    # Where the copy is not in view (a followers-only request, answered to its author alone), a
    # follower's mention under it is still a request of its own.
    fake.follow(bob, alice)
    private = fake.mention(alice, "cover please", media=[fake.media(jpeg(64))], visibility="private")
    assert world.run(private) == "replied" and fake.bot_posts()[-1]["visibility"] == "direct"
    assert world.run(fake.post(bob, "@alice @ppbot me too", in_reply_to=private, visibility="private")) == "replied"
    assert fake.bot_posts()[-1]["visibility"] == "direct"


def test_two_bots_do_not_answer_each_other(world: World) -> None:
    fake = world.fake
    other = fake.add_account("autoresponder")  # a bot that does not say it is one
    post = fake.mention(other, "hello")
    outcomes = [world.run(post)]
    for _ in range(5):
        last = fake.bot_posts()[-1]
        post = fake.mention(other, "hello again", in_reply_to=last)
        outcomes.append(world.run(post))
    assert outcomes == ["no_image"] + ["ignored_incidental"] * 5
    assert len(fake.bot_posts()) == 1


def test_a_flood_of_requests_gets_one_notice_and_retries_count_once(world: World) -> None:
    fake = world.fake
    world.configure(per_account_per_hour=2)
    alice = fake.add_account("alice")
    first = fake.mention(alice, "one", media=[fake.media(jpeg(64))])
    # the first attempt fails at the upload and is retried: it must not use up a second request
    fake.fail("POST", "/api/v2/media", 500)
    with pytest.raises(Exception):
        world.run(first)
    assert world.run(first) == "replied"
    outcomes = [world.run(fake.mention(alice, f"more {n}", media=[fake.media(jpeg(64))])) for n in range(4)]
    assert outcomes == ["replied", "rate_limited", "rate_limited", "rate_limited"]
    assert world.said()[-1] == "@alice " + messages.RATE_LIMITED
    assert len(fake.bot_posts()) == 3, "two copies and one notice"


def test_explanations_have_their_own_hourly_limit(world: World) -> None:
    fake = world.fake
    world.configure(per_account_per_hour=2, global_per_hour=3)
    alice, bob, carol, dave = (fake.add_account(n) for n in ("alice", "bob", "carol", "dave"))
    # Mentions that cost no photo (none attached, the post gone, its author opted out) still
    # cost a post each: past the limit they get no answer.
    gone = fake.post(dave, "the square", media=[fake.media(jpeg(64))])
    under_gone = fake.mention(alice, "x", in_reply_to=gone)
    fake.deleted.append(gone["id"])
    opted = fake.post(fake.add_account("erin", note="#nobot"), "the march", media=[fake.media(jpeg(64))])
    outcomes = [world.run(fake.mention(alice, "hi")), world.run(under_gone),
                world.run(fake.mention(alice, "y", in_reply_to=opted)), world.run(fake.mention(alice, "z"))]
    assert outcomes == ["no_image", "gone", "opted_out", "no_image"]
    assert world.said() == ["@alice " + messages.NO_IMAGE, "@alice " + messages.GONE]
    # Another account has its own; the bot's limit (3) stops the third answer of the hour.
    assert [world.run(fake.mention(bob, "hi")), world.run(fake.mention(carol, "hi"))] == ["no_image"] * 2
    assert len(fake.bot_posts()) == 3
    # The copies' limits are apart: a photo still gets its copy.
    assert world.run(fake.mention(alice, "now with a photo", media=[fake.media(jpeg(64))])) == "replied"
    assert len(fake.bot_posts()) == 4


# -- posts that vanished ------------------------------------------------------------------------


def test_a_request_under_a_deleted_post_is_told_so(world: World) -> None:
    fake = world.fake
    dave, alice = fake.add_account("dave"), fake.add_account("alice")
    photo = fake.post(dave, "the square", media=[fake.media(jpeg(64))])
    request = fake.mention(alice, "cover please", in_reply_to=photo)
    fake.deleted.append(photo["id"])
    assert world.run(request) == "gone"
    assert world.said() == ["@alice " + messages.GONE]
    assert world.store.dead_letters() == []


def test_a_deleted_request_is_dropped_quietly(world: World) -> None:
    fake = world.fake
    alice = fake.add_account("alice")
    request = fake.mention(alice, "cover please", media=[fake.media(jpeg(64))])
    job = world.job(request)
    fake.deleted.append(request["id"])
    assert MentionHandler(world.platform(), world.store, world.anonymiser, world.config).handle(job) == "request_gone"
    assert fake.bot_posts() == []


# -- the listener and the platform ---------------------------------------------------------------


def test_a_mention_whose_enqueue_failed_is_queued_by_the_next_poll(world: World) -> None:
    fake = world.fake
    platform = world.platform()
    queued: list[Job] = []
    failures = [ConnectionError("broker down")]

    def enqueue(job: Job) -> None:
        if failures:
            raise failures.pop()
        queued.append(job)

    listener = Listener(platform, world.store, enqueue, stream=False)
    listener.catch_up("mentions")  # first start: sets the cursor
    request = fake.mention(fake.add_account("alice"), "cover", media=[fake.media(jpeg(64))])
    with pytest.raises(ConnectionError):
        listener.catch_up("mentions")
    assert listener.catch_up("mentions") == 1
    assert [j.post_id for j in queued] == [request["id"]]


class _Streaming:
    """A platform whose poll returns ``history`` and whose stream delivers ``streamed``, then
    stops the listener."""

    name = "mastodon"
    watches_hashtags = False
    #: a stream that carries everything (neither real platform's does): streamed events may move
    #: the cursor, except past an event claimed elsewhere, which this tests
    stream_complete = True

    def __init__(self, history: list[Event], streamed: list[Event], stop: threading.Event) -> None:
        self.history, self.streamed, self.stop = history, streamed, stop

    def me(self) -> Account:
        return Account(id="bot", acct="bot")

    def mentions_since(self, since: str | None) -> list[Event]:
        return [e for e in self.history if since is None or (len(e.id), e.id) > (len(since), since)]

    def stream(self, channel: str) -> Iterator[Event | None]:
        yield from self.streamed
        self.stop.set()
        yield None


def test_a_streamed_mention_does_not_move_the_cursor_past_one_claimed_elsewhere(world: World) -> None:
    """A listener claimed mention 11 and was killed before queueing it. The next listener's poll
    stops before it, as it should; a streamed mention 12 then moved the cursor past it, so once
    the dead claim expired no poll ever looked at 11 again."""
    store = world.store
    store.set_cursor("mastodon", "mentions", "10")

    def mention(event_id: str, who: str) -> Event:
        return Event("mention", event_id, Post(id=f"p{event_id}", account=Account(id=who, acct=who), text="@bot"))

    earlier, later = mention("11", "alice"), mention("12", "bob")
    assert store.first_sighting("mastodon", "p11", "alice") == "new"  # the dead listener's claim
    stop = threading.Event()
    platform = _Streaming([earlier], [later], stop)
    queued: list[Job] = []
    listener = Listener(platform, store, queued.append, poll_interval_s=0.05)  # type: ignore[arg-type]
    listener.stop = stop
    listener.run_channel("mentions")
    assert [j.post_id for j in queued] == ["p12"]
    assert store.cursor("mastodon", "mentions") == "10"

    store.unsee("mastodon", "p11", "alice")  # the dead claim expires
    platform.history = [earlier, later]
    listener.catch_up("mentions")
    assert [j.post_id for j in queued] == ["p12", "p11"], "11 found again, 12 not queued twice"
    assert store.cursor("mastodon", "mentions") == "12"


def test_a_mention_is_not_lost_when_redis_fails_between_claim_and_enqueue(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis goes away after the sighting is claimed: the enqueue fails and so does undoing the
    claim. The claim used to be a two-week "seen" mark, so the next poll skipped the mention and
    moved the cursor past it; a claim now expires, and until then the cursor stays before it."""
    from bot import store as store_module

    fake = world.fake
    queued: list[Job] = []
    failing = {"enqueue": True}

    def enqueue(job: Job) -> None:
        if failing["enqueue"]:
            raise redis.ConnectionError("Redis went away")
        queued.append(job)

    def unsee(*_: Any) -> None:
        raise redis.ConnectionError("Redis went away")

    listener = Listener(world.platform(), world.store, enqueue, stream=False)
    listener.catch_up("mentions")
    request = fake.mention(fake.add_account("alice"), "cover", media=[fake.media(jpeg(64))])
    monkeypatch.setattr(world.store, "unsee", unsee)
    with pytest.raises(redis.ConnectionError):
        listener.catch_up("mentions")
    failing["enqueue"] = False  # Redis is back; the claim has not expired yet
    later = fake.mention(fake.add_account("bob"), "cover", media=[fake.media(jpeg(64))])
    listener.catch_up("mentions")
    assert queued == [], "neither queued nor skipped past while the failed claim stands"
    key = f"{store_module.PREFIX}:seen:mastodon:{request['id']}:{request['account']['id']}"
    assert 0 < world.store.r.ttl(key) <= store_module.CLAIM_TTL_S
    world.store.r.delete(key)  # what its expiry does
    listener.catch_up("mentions")
    assert [j.post_id for j in queued] == [request["id"], later["id"]]
    listener.catch_up("mentions")
    assert len(queued) == 2, "each queued once"


def test_strangers_direct_messages_reach_the_bot(world: World) -> None:
    """Mastodon 4.3+ filters direct messages from accounts the bot does not follow: unlisted
    and unstreamed. The listener turns the filter off and its polls include what was filtered."""
    fake = world.fake
    platform = world.platform()
    queued: list[Job] = []
    listener = Listener(platform, world.store, queued.append, stream=False)
    listener.catch_up("mentions")
    early = fake.mention(fake.add_account("carol"), "delete 1234567", visibility="direct")
    assert fake.filtered, "the fake filters it like Mastodon does"

    platform.prepare()
    assert fake.notification_policy["for_private_mentions"] == "accept"
    late = fake.mention(fake.add_account("erin"), "delete 7654321", visibility="direct")
    assert len(fake.filtered) == 1, "not filtered once the policy accepts private mentions"
    listener.catch_up("mentions")
    assert [(j.post_id, j.kind) for j in queued] == [(early["id"], "takedown"), (late["id"], "takedown")]


def test_a_streamed_request_is_read_as_utf8(world: World) -> None:
    """Server-sent events are UTF-8 whatever the headers say, and Mastodon's name no charset
    (``text/event-stream``), for which ``requests`` assumes ISO-8859-1: "Löschen!" under the
    bot's copy read as "LÃ¶schen!" is no command, and the takedown became a mention."""
    fake = world.fake
    platform = world.platform()
    alice = fake.add_account("alice")
    photo = fake.post(alice, "crowd", media=[fake.media(jpeg(64))])
    copy = fake.post(fake.bot, "@alice covered", in_reply_to=photo, notify=False)
    events = platform.stream("mentions")

    def answer() -> None:
        fake.wait_streaming()
        fake.mention(alice, "@ppbot Löschen! ✊", in_reply_to=copy)

    threading.Thread(target=answer, daemon=True).start()
    event = next(e for e in events if e is not None)
    events.close()
    assert event.post.text == "@ppbot Löschen! ✊"
    assert job_for(event, platform.me()).kind == "takedown"


def test_a_filtered_message_is_not_passed_by_the_stream(world: World) -> None:
    """What a notification policy filters (a stranger's direct message where the policy could
    not be changed, a mention from an account a moderator limited) is listed with
    ``include_filtered`` but never streamed: a streamed mention after it must not move the
    cursor past it, or no poll would ever find that request."""
    fake = world.fake
    queued: list[Job] = []
    listener = Listener(world.platform(), world.store, queued.append, stream=True, poll_interval_s=0.2)
    listener.catch_up("mentions")
    runner = threading.Thread(target=listener.run_channel, args=("mentions",), daemon=True)
    runner.start()
    try:
        fake.wait_streaming()
        first = fake.mention(fake.add_account("alice"), "cover")
        fake.wait_for(lambda: len(queued) == 1, 10, what="the first streamed mention")
        hidden = fake.mention(fake.add_account("carol"), "delete 1234567", visibility="direct")
        assert fake.filtered == {fake.notifications[-1]["id"]}, "the fake filters it like Mastodon does"
        streamed = fake.mention(fake.add_account("bob"), "cover")
        fake.wait_for(lambda: {j.post_id for j in queued} == {first["id"], hidden["id"], streamed["id"]}, 10,
                      what="every mention, the filtered one too")
    finally:
        listener.stop.set()
        fake.drop_streams()
        runner.join(10)


def test_a_spent_upload_budget_does_not_block_takedowns(world: World) -> None:
    """Mastodon's media uploads have their own budget (30 per 30 minutes); its headers on an
    upload describe that budget."""
    fake = world.fake
    platform = world.platform()
    platform.me()
    fake.exhaust("POST", "/api/v2/media", reset_in_s=1800)
    platform.upload_image(jpeg(32, exif=False), "image/jpeg", "first")
    with pytest.raises(RateLimited) as refused:
        platform.upload_image(jpeg(32, exif=False), "image/jpeg", "second")
    assert refused.value.retry_after_s > 1700
    assert sum(1 for r in fake.log() if r.path == "/api/v2/media") == 1, "refused without asking the server"
    mine = platform.direct_message(platform.parse_account(fake.add_account("carol")), "still talking")
    assert platform.delete_post(mine.id) is True
    assert fake.deleted == [mine.id]


#: the keys kept without a time to live, each with what bounds it
UNEXPIRING = (
    "ppb:watch:",  # one entry per original copied in the last 90 days: the sweep drops the rest
    "ppb:cursor:",  # one per channel
)


def test_every_record_of_a_copy_expires(world: World) -> None:
    """A bot answering a viral hashtag for years must not fill Redis: each key a copy leaves
    behind expires (a year for the reply records), however many originals it copied. The set of
    an original's copies had no time to live, and outlived every other record of them."""
    _two_copies(world)
    lasting = {k: world.store.r.ttl(k) for k in world.store.r.scan_iter(count=1000)}
    assert lasting, "the copies were recorded"
    forever = sorted(k for k, ttl in lasting.items() if ttl == -1 and not k.startswith(UNEXPIRING))
    assert forever == []
    assert all(ttl <= 365 * 24 * 3600 for ttl in lasting.values())


def test_the_dead_letter_list_keeps_the_newest(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead letters are for an operator to read, and a year of hostile photos (each one
    dead-lettered after it killed its workers) must not fill Redis: the oldest go first. The
    alert counts them from the workers' counter, not from the list's length."""
    from bot import store as store_module

    monkeypatch.setattr(store_module, "DEAD_LETTERS_KEPT", 3)
    for n in range(5):
        world.store.dead_letter({"post_id": str(n)}, "WorkerLost")
    assert [d["job"]["post_id"] for d in world.store.dead_letters()] == ["2", "3", "4"]


def test_a_claim_that_lapses_while_another_listener_looks_is_not_taken_for_queued(world: World) -> None:
    """Two listeners of one platform share the cursor. Listener A claimed a mention and died
    before queueing it; its claim expires (or A undoes it) just as listener B looks: B's claim
    failed because A's was there, and its read of the claim found nothing. B took that for
    "queued" and moved the shared cursor past a mention nobody queued: it was never answered."""
    fake = world.fake
    queued: list[Job] = []
    listener = Listener(world.platform(), world.store, queued.append, stream=False)
    listener.catch_up("mentions")  # the cursor starts now
    request = fake.mention(fake.add_account("alice"), "cover", media=[fake.media(jpeg(64))])
    later = fake.mention(fake.add_account("bob"), "cover", media=[fake.media(jpeg(64))])
    key = f"ppb:seen:mastodon:{request['id']}:{request['account']['id']}"
    real = world.store.r

    class ClaimLapses:
        """The Redis client, with A's claim expiring between B's two commands."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def set(self, *args: Any, **kwargs: Any) -> Any:
            if args[0] == key and kwargs.get("nx") and not real.exists(key):
                real.set(key, "claimed", ex=120)  # listener A's claim, from just before
            return real.set(*args, **kwargs)

        def get(self, name: str) -> Any:
            if name == key:
                real.delete(key)  # ... which lapses now
            return real.get(name)

    world.store.r = ClaimLapses()  # type: ignore[assignment]
    try:
        listener.catch_up("mentions")
    finally:
        world.store.r = real
    listener.catch_up("mentions")
    assert [j.post_id for j in queued] == [request["id"], later["id"]]


def test_a_spent_posting_budget_does_not_block_reading(world: World) -> None:
    """Mastodon limits posting to 300 statuses per 3 hours (``RateLimiter`` family
    ``statuses``), and its headers on a post describe that budget when it is the closer one:
    the 300th reply must stop the bot's posting until the reset, not its polls and look-ups
    (mentions and takedown requests go on being read, copies go on being deleted)."""
    fake = world.fake
    platform = world.platform()
    platform.me()
    alice = fake.add_account("alice")
    request = fake.mention(alice, "cover")
    fake.exhaust("POST", "/api/v1/statuses", reset_in_s=3 * 3600)
    mine = platform.direct_message(platform.parse_account(alice), "the 300th")
    with pytest.raises(RateLimited) as refused:
        platform.direct_message(platform.parse_account(alice), "the 301st")
    assert refused.value.retry_after_s > 3 * 3600 - 100
    assert sum(1 for r in fake.log() if r.path == "/api/v1/statuses") == 1, "refused without asking the server"
    assert platform.get_post(request["id"]).id == request["id"]
    assert [e.post.id for e in platform.mentions_since("0")] == [request["id"]]
    assert platform.delete_post(mine.id) is True


@pytest.mark.parametrize("status, body", [
    (200, "<html><body>Down for maintenance</body></html>"),  # a proxy's page, answered 200
    (422, "[]"),  # JSON, but not the {"error": ...} object Mastodon sends
    (403, "null"),
])
def test_an_answer_that_is_not_mastodons_json_is_a_platform_error(status: int, body: str) -> None:
    """What a reverse proxy or a broken server puts in place of Mastodon's JSON must end as a
    PlatformError under the worker's rules (a 200 page: a server error, retried), not as a
    ValueError or AttributeError, which the worker takes for a bug and gives up on at once."""
    import responses

    platform = MastodonPlatform("https://m.example", TOKEN)
    with responses.RequestsMock() as http:
        http.get("https://m.example/api/v1/statuses/1", body=body, status=status)
        with pytest.raises(ServerError if status == 200 else PlatformError) as raised:
            platform.get_post("1")
    assert raised.value.status == status


@pytest.mark.parametrize("body", [
    '{"statuses": null}', '{"statuses": [null]}', '{"statuses": [{"id": null}]}', '{"statuses": {"id": "1"}}', "[]",
])
def test_a_search_answer_of_another_shape_names_no_post(body: str) -> None:
    """A remote link is resolved by the bot's server's search; an answer of another shape must
    count as "not a post I know" for that link, not as an error that fails the whole takedown."""
    import responses

    platform = MastodonPlatform("https://m.example", TOKEN)
    with responses.RequestsMock() as http:
        http.get("https://m.example/api/v2/search", body=body, status=200)
        assert platform.post_id_from_reference("https://elsewhere.example/@dave/110000000000000001") is None
    with responses.RequestsMock() as http:
        http.get("https://m.example/api/v2/search", json={"accounts": [], "statuses": [{"id": "110"}], "hashtags": []})
        assert platform.post_id_from_reference("https://elsewhere.example/@dave/110000000000000001") == "110"
