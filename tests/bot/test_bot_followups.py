"""What happens after the bot has answered: thanks under its copy, a DM reply asking to delete
it, asking again after a takedown (a note, no new copy), long failure lists, and stopping a
quiet listener."""

from __future__ import annotations

import time

from bot import messages
from bot.platforms.mastodon import html_to_text
from bot_harness import E2E
from bot_helpers import jpeg


def _answered(e2e: E2E) -> tuple[dict, dict, dict, dict]:
    fake = e2e.fake
    dave, bob = fake.add_account("dave"), fake.add_account("bob")
    original = fake.post(dave, "At the square", media=[fake.media(jpeg(256))])
    request = fake.mention(bob, "cover please", in_reply_to=original)
    reply = e2e.reply_to(request)
    return bob, original, request, reply


def test_thanks_under_the_bots_copy_is_not_answered_with_another_copy(e2e: E2E) -> None:
    """A reply to the bot's copy mentions the bot automatically; the bot must not anonymise its
    own copy again (and must not post anything at all)."""
    e2e.listen()
    bob, _, _, reply = _answered(e2e)
    thanks = e2e.fake.mention(bob, "thanks!", in_reply_to=reply)
    e2e.settle()
    assert e2e.fake.replies_to(thanks["id"]) == []
    assert len(e2e.fake.bot_posts()) == 1


def test_direct_reply_to_the_bots_copy_takes_it_down(e2e: E2E) -> None:
    """"please delete this" sent as a direct reply to the copy, with no link, is a takedown."""
    e2e.listen()
    _, _, _, reply = _answered(e2e)
    carol = e2e.fake.add_account("carol")
    dm = e2e.fake.mention(carol, "please delete this, I am in it", in_reply_to=reply, visibility="direct")
    confirmation = e2e.reply_to(dm)
    e2e.settle()
    assert e2e.fake.deleted == [reply["id"]]
    assert confirmation["visibility"] == "direct"
    assert html_to_text(confirmation["content"]) == "@carol " + messages.TAKEDOWN_DONE.format(count=1)


def test_after_a_takedown_asking_again_gets_a_note_not_a_new_copy(e2e: E2E) -> None:
    """carol, in the photo, had the copy deleted: bob asking again must not undo that."""
    e2e.listen()
    bob, original, _, reply = _answered(e2e)
    dm = e2e.fake.mention(e2e.fake.add_account("carol"), f"delete {reply['url']}", visibility="direct")
    e2e.reply_to(dm)
    e2e.settle()
    again = e2e.fake.mention(bob, "can I have it again?", in_reply_to=original)
    note = e2e.reply_to(again)
    e2e.settle()
    assert not note["media_attachments"] and note["visibility"] == "direct"
    assert html_to_text(note["content"]) == "@bob " + messages.TAKEN_DOWN
    assert len(e2e.fake.bot_posts()) == 3, "the copy, the confirmation and the note"


def test_asking_again_after_a_text_answer_gets_a_fresh_answer(e2e: E2E) -> None:
    """A text-only answer (here: no image) is keyed by the request, not for a year by the post."""
    e2e.listen()
    bob = e2e.fake.add_account("bob")
    first = e2e.fake.mention(bob, "anonymise?")
    assert html_to_text(e2e.reply_to(first)["content"]).endswith(messages.NO_IMAGE)
    second = e2e.fake.mention(bob, "anonymise? (again)")
    assert html_to_text(e2e.reply_to(second)["content"]).endswith(messages.NO_IMAGE)


def test_reply_text_fits_the_post_length_whatever_fails() -> None:
    failures = [f"image {i}: it is not a supported image (JPEG, PNG, WebP, HEIC, GIF)" for i in range(1, 12)]
    text = messages.reply_text(3, 1, failures)
    assert len(text) <= messages.MAX_TEXT - messages.MENTION_ROOM
    assert "more not processed" in text and "image 1:" in text
    assert len(messages.failed_all(failures)) <= messages.MAX_TEXT - messages.MENTION_ROOM
    assert messages.reply_text(3, 1, failures[:1]).endswith(failures[0])


def test_a_quiet_streaming_listener_stops_promptly(e2e: E2E) -> None:
    """Stop is noticed at the next heartbeat, not only when an event or a drop arrives."""
    running = e2e.listen(stream=True)
    e2e.fake.stream_heartbeat_s = 0.2
    time.sleep(1.0)
    started = time.monotonic()
    running.listener.stop.set()
    running.thread.join(timeout=5)
    assert not running.thread.is_alive()
    assert time.monotonic() - started < 3
    e2e.listeners.remove(running)
