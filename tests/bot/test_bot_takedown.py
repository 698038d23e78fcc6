"""Takedown by direct message: the bot deletes its own copy, confirms by DM, and never touches
anyone else's post."""

from __future__ import annotations

import pytest
import requests

from bot import messages
from bot.platforms.mastodon import html_to_text
from bot_harness import E2E
from bot_helpers import jpeg


def text_of(status: dict) -> str:
    return html_to_text(status["content"])


def answered_photo(e2e: E2E, author_domain: str | None = None) -> tuple[dict, dict, dict]:
    """A photo post by dave, bob's request under it and the bot's anonymised reply."""
    fake = e2e.fake
    dave = fake.add_account("dave", domain=author_domain)
    bob = fake.add_account("bob")
    original = fake.post(dave, "Crowd at the square", media=[fake.media(jpeg(256))])
    request = fake.mention(bob, "cover the faces please", in_reply_to=original)
    reply = e2e.reply_to(request)
    assert reply["media_attachments"], "the setup needs an anonymised copy"
    return original, request, reply


def confirmation_to(e2e: E2E, dm: dict) -> dict:
    confirmation = e2e.reply_to(dm)
    assert confirmation["visibility"] == "direct"
    assert [m["id"] for m in confirmation["mentions"]] == [dm["account"]["id"]]
    return confirmation


@pytest.mark.parametrize("reference", ["reply url", "original url", "original id", "reply id", "remote original url", "remote original uri"])
def test_takedown_by_direct_message_deletes_the_copy_and_confirms(e2e: E2E, reference: str) -> None:
    fake = e2e.fake
    e2e.listen()
    original, request, reply = answered_photo(e2e, "remote.example" if reference.startswith("remote") else None)
    named = {
        "reply url": reply["url"],
        "reply id": reply["id"],
        "original url": original["url"],
        "original id": original["id"],
        "remote original url": original["url"],
        "remote original uri": original["uri"],
    }[reference]
    if reference.startswith("remote"):
        assert named.startswith("https://remote.example/")
    carol = fake.add_account("carol")  # someone in the photo, not the requester
    dm = fake.mention(carol, f"I am in this photo, please delete {named}", visibility="direct")

    confirmation = confirmation_to(e2e, dm)
    e2e.settle()
    assert fake.deleted == [reply["id"]]
    assert text_of(confirmation) == "@carol " + messages.TAKEDOWN_DONE.format(count=1)
    assert original["id"] not in fake.delete_attempts and request["id"] not in fake.delete_attempts
    assert len(fake.bot_posts()) == 2, "the reply and the confirmation, nothing else"


def test_takedown_deletes_every_copy_of_the_original(e2e: E2E) -> None:
    fake = e2e.fake
    e2e.listen()
    original, _, first = answered_photo(e2e)
    erin = fake.add_account("erin")
    second_request = fake.mention(erin, "me too", in_reply_to=original)
    second = e2e.reply_to(second_request)
    dm = fake.mention(fake.add_account("carol"), f"delete {original['url']}", visibility="direct")

    confirmation = confirmation_to(e2e, dm)
    e2e.settle()
    assert sorted(fake.deleted) == sorted([first["id"], second["id"]])
    assert text_of(confirmation) == "@carol " + messages.TAKEDOWN_DONE.format(count=2)


def followers_only_photo(e2e: E2E) -> tuple[dict, dict, dict]:
    """bob's followers-only photo post; the bot and alice follow bob."""
    fake = e2e.fake
    e2e.listen()
    bob, alice = fake.add_account("bob"), fake.add_account("alice")
    fake.follow(fake.bot, bob)
    fake.follow(alice, bob)
    return bob, alice, fake.post(bob, "for my followers", media=[fake.media(jpeg(128))], visibility="private")


def test_takedown_never_tells_how_many_copies_went_to_an_audience_the_sender_is_not_in(e2e: E2E) -> None:
    # bob's followers-only photo; alice (a follower) and bob got their copies by DM. eve, a
    # remote stranger, sends its id: both copies go (anyone may ask), but how many people asked
    # about a post eve cannot see is not hers to learn.
    fake = e2e.fake
    bob, alice, original = followers_only_photo(e2e)
    alices = e2e.reply_to(fake.mention(alice, "cover", in_reply_to=original, visibility="private"))
    bobs = e2e.reply_to(fake.mention(bob, "me too", in_reply_to=original, visibility="private"))
    assert alices["visibility"] == bobs["visibility"] == "direct"  # a followers-only original is answered by DM
    eve = fake.add_account("eve", domain="elsewhere.example")
    assert not fake.visible_to(eve, original)

    confirmation = confirmation_to(e2e, fake.mention(eve, f"delete {original['id']}", visibility="direct"))
    e2e.settle()
    assert sorted(fake.deleted) == sorted([alices["id"], bobs["id"]])
    assert text_of(confirmation) == "@eve " + messages.TAKEDOWN_DONE_UNCOUNTED
    assert not any(ch.isdigit() for ch in messages.TAKEDOWN_DONE_UNCOUNTED)


def test_takedown_counts_the_followers_only_copy_made_for_the_sender(e2e: E2E) -> None:
    fake = e2e.fake
    bob, alice, original = followers_only_photo(e2e)
    alices = e2e.reply_to(fake.mention(alice, "cover", in_reply_to=original, visibility="private"))

    confirmation = confirmation_to(e2e, fake.mention(alice, f"delete {alices['url']}", visibility="direct"))
    e2e.settle()
    assert fake.deleted == [alices["id"]]
    assert text_of(confirmation) == "@alice " + messages.TAKEDOWN_DONE.format(count=1)


def test_takedown_of_a_post_the_bot_never_answered_deletes_nothing(e2e: E2E) -> None:
    fake = e2e.fake
    e2e.listen()
    _, _, reply = answered_photo(e2e)
    stranger = fake.add_account("stranger")
    unrelated = fake.post(stranger, "some other post", media=[fake.media(jpeg(64))])
    carol = fake.add_account("carol")
    dm = fake.mention(carol, f"please delete {unrelated['url']}", visibility="direct")

    confirmation = confirmation_to(e2e, dm)
    e2e.settle()
    assert fake.delete_attempts == []
    text = text_of(confirmation)
    assert text.startswith("@carol " + messages.takedown_unknown(1))
    assert unrelated["url"] not in text, "the references are never echoed"
    assert messages.TAKEDOWN_HELP in text
    assert reply["id"] not in fake.deleted


def test_direct_message_without_a_reference_gets_help(e2e: E2E) -> None:
    fake = e2e.fake
    e2e.listen()
    carol = fake.add_account("carol")
    dm = fake.mention(carol, "hello, how do I get my photo removed?", visibility="direct")
    confirmation = confirmation_to(e2e, dm)
    e2e.settle()
    assert text_of(confirmation) == "@carol " + messages.TAKEDOWN_HELP
    assert fake.delete_attempts == []


def test_bot_never_deletes_a_post_that_is_not_its_own(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    original = fake.post(alice, "Crowd", media=[fake.media(jpeg(64))])
    not_ours = fake.post(bob, "bob's own post")
    # A poisoned record: Redis claims bob's post is one of the bot's replies to alice's post.
    e2e.store.record_reply("mastodon", original["id"], bob["id"], not_ours["id"], [original["url"]])
    e2e.listen()
    carol = fake.add_account("carol")
    dm = fake.mention(carol, f"delete {original['url']} and {not_ours['url']}", visibility="direct")

    confirmation_to(e2e, dm)
    e2e.settle()
    assert fake.delete_attempts == [], "no DELETE request for someone else's post"
    assert not_ours["id"] not in fake.deleted


def test_a_taken_down_copy_takes_its_image_with_it(e2e: E2E) -> None:
    """Mastodon keeps a deleted post's attachments online for about a day unless asked
    (``delete_media``); a taken-down copy's image must stop being served at once."""
    fake = e2e.fake
    e2e.listen()
    _, _, reply = answered_photo(e2e)
    image_url = reply["media_attachments"][0]["url"]
    assert requests.get(image_url, timeout=10).status_code == 200
    carol = fake.add_account("carol")
    confirmation_to(e2e, fake.mention(carol, f"delete {reply['url']}", visibility="direct"))
    e2e.settle()
    assert fake.deleted == [reply["id"]]
    [delete] = [r for r in fake.log() if r.method == "DELETE"]
    assert delete.query == {"delete_media": ["true"]}
    assert requests.get(image_url, timeout=10).status_code == 404


def test_takedown_request_redelivered_is_answered_once(e2e: E2E) -> None:
    fake = e2e.fake
    e2e.listen()
    _, _, reply = answered_photo(e2e)
    carol = fake.add_account("carol")
    dm = fake.mention(carol, f"delete {reply['url']}", visibility="direct")
    confirmation_to(e2e, dm)
    e2e.send(e2e.job(dm, kind="takedown"))  # the same job delivered again
    e2e.settle()
    assert len(fake.replies_to(dm["id"])) == 1
    assert fake.deleted == [reply["id"]]
    assert [r.path for r in fake.log() if r.method == "DELETE"] == [f"/api/v1/statuses/{reply['id']}"]
