"""Mentions and hashtag posts in, anonymised replies out: the whole path through the listener,
Redis, the Celery worker process and the fake Mastodon server."""

from __future__ import annotations

import re

from bot import messages
from bot.platforms.mastodon import html_to_text
from bot_helpers import assert_anonymised, astronaut, face_box, jpeg, png, truncated_jpeg
from bot_harness import JOB_TIMEOUT_S, MAX_ATTEMPTS, MAX_MEDIA_BYTES, E2E


def text_of(status: dict) -> str:
    return html_to_text(status["content"])


def heads_in_alt(description: str) -> int:
    found = re.search(r"(\d+) heads? covered", description)
    assert found, f"no head count in the alt text {description!r}"
    return int(found.group(1))


def test_mention_with_photo_gets_anonymised_reply_in_thread(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    original = jpeg(1448)  # about 2 MP, with EXIF (camera make, serial number, GPS)
    e2e.listen()
    request = fake.mention(alice, "please cover the faces", media=[fake.media(original)])

    reply = e2e.reply_to(request)
    e2e.settle()

    assert fake.bot_posts() == [reply], "exactly one post by the bot"
    assert reply["in_reply_to_id"] == request["id"]
    assert reply["in_reply_to_account_id"] == alice["id"]
    assert [m["acct"] for m in reply["mentions"]] == ["alice"]
    assert text_of(reply).startswith("@alice Here is an anonymised copy (1 image")
    assert reply["visibility"] == "public"
    assert not reply["sensitive"] and reply["spoiler_text"] == ""
    assert reply["quote_approval"]["automatic"] == [], "no one may quote the copy into another audience"
    [attachment] = reply["media_attachments"]
    assert attachment["type"] == "image"
    assert heads_in_alt(attachment["description"]) >= 1
    assert "raised-fist" in attachment["description"]
    assert_anonymised(fake.upload_of(attachment), astronaut(1448), face_box(1448))
    assert len(fake.media_requests()) == 1, "the original is downloaded once"


def test_hashtag_post_gets_reply(e2e: E2E) -> None:
    fake = e2e.fake
    carol = fake.add_account("carol")
    e2e.listen(hashtags=("protest",))
    post = fake.post(carol, "March for the climate #Protest", media=[fake.media(jpeg())])
    # a post that both mentions the bot and carries the tag is seen on both channels: one reply
    both = fake.mention(carol, "again #protest", media=[fake.media(png())])
    # followers-only posts never reach a hashtag timeline
    fake.post(carol, "only for my followers #protest", media=[fake.media(jpeg())], visibility="private")

    reply = e2e.reply_to(post)
    reply_both = e2e.reply_to(both)
    e2e.settle()
    assert len(fake.bot_posts()) == 2
    assert text_of(reply).startswith("@carol Here is an anonymised copy")
    assert reply["visibility"] == "public"
    assert_anonymised(fake.upload_of(reply["media_attachments"][0]), astronaut(512), face_box(512))
    assert fake.upload_of(reply_both["media_attachments"][0])[:8] == b"\x89PNG\r\n\x1a\n", "a PNG stays a PNG"


def test_hashtag_authors_hear_nothing_when_their_post_fails(e2e: E2E) -> None:
    """The author of a hashtag post never asked the bot: neither "could not anonymise" nor an
    apology after the job is given up may reach them (a mention gets both)."""
    fake = e2e.fake
    carol = fake.add_account("carol")
    e2e.listen(hashtags=("protest",))
    outage = fake.fail("POST", r"/api/v2/media", 503, times=1000)
    fake.post(carol, "March #protest", media=[fake.media(truncated_jpeg())])
    fake.post(carol, "Square #protest", media=[fake.media(jpeg(256))])
    fake.wait_for(lambda: len(e2e.store.dead_letters()) == 1, JOB_TIMEOUT_S, what="the second post's dead letter")
    e2e.settle()
    assert len(outage.hits) == MAX_ATTEMPTS, "the second post was tried, then given up"
    assert fake.bot_posts() == [], "no failure note, no apology"


def test_mention_in_reply_to_a_photo_post_anonymises_the_parent(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob", domain="remote.example")
    photo_post = fake.post(alice, "Crowd at the square", media=[fake.media(jpeg())])
    e2e.listen()
    request = fake.mention(bob, "@alice could you cover the faces?", in_reply_to=photo_post)

    reply = e2e.reply_to(request)
    e2e.settle()
    assert fake.bot_posts() == [reply]
    assert reply["in_reply_to_id"] == request["id"], "the answer goes to whoever asked, in their thread"
    assert text_of(reply).startswith("@bob Here is an anonymised copy"), "a remote requester is mentioned as @user@domain"
    assert "bob@remote.example" in [m["acct"] for m in reply["mentions"]]
    assert_anonymised(fake.upload_of(reply["media_attachments"][0]), astronaut(512), face_box(512))


def test_mention_without_any_image_gets_helpful_text(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    text_post = fake.post(alice, "No photos here, just words")
    e2e.listen()
    request = fake.mention(bob, "what about this one?", in_reply_to=text_post)

    reply = e2e.reply_to(request)
    e2e.settle()
    assert fake.bot_posts() == [reply]
    assert reply["media_attachments"] == []
    assert text_of(reply) == f"@bob {messages.NO_IMAGE}"
    assert fake.uploads == {}


def test_corrupt_image_gets_polite_reply_and_worker_carries_on(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    e2e.listen()
    broken = fake.mention(alice, "this one is broken", media=[fake.media(truncated_jpeg())])
    fine = fake.mention(bob, "and this one is fine", media=[fake.media(jpeg())])

    answer = e2e.reply_to(broken)
    reply = e2e.reply_to(fine)
    e2e.settle()
    assert len(fake.bot_posts()) == 2
    assert text_of(answer) == "@alice Sorry, I could not anonymise this post: image 1: the image file is damaged or empty."
    assert answer["media_attachments"] == []
    assert len(reply["media_attachments"]) == 1
    assert e2e.store.dead_letters() == []
    assert e2e.workers.alive()


def test_oversized_image_is_refused_politely(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    e2e.listen()
    huge = fake.media(jpeg(), declared_length=MAX_MEDIA_BYTES + 1)
    request = fake.mention(alice, "a very big photo", media=[huge])

    answer = e2e.reply_to(request)
    e2e.settle()
    assert fake.bot_posts() == [answer]
    assert text_of(answer) == "@alice Sorry, I could not anonymise this post: image 1: the image is too large."
    assert fake.uploads == {}
    [download] = fake.media_requests()
    assert download.status == 200, "refused on the declared Content-Length"


def test_followers_only_original_is_answered_by_direct_message(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    fake.follow(fake.bot, alice)  # the bot may see alice's followers-only posts
    fake.follow(bob, alice)  # and so may bob: his server lets him reply to them
    private_post = fake.post(alice, "Our meeting today", media=[fake.media(jpeg())], visibility="private")
    e2e.listen()
    request = fake.mention(bob, "cover these please", in_reply_to=private_post)  # bob asks in public

    reply = e2e.reply_to(request)
    e2e.settle()
    assert reply["visibility"] == "direct", "the followers-only photo must never be reposted wider"
    assert [m["acct"] for m in reply["mentions"]] == ["bob"]
    assert len(reply["media_attachments"]) == 1


def test_own_followers_only_post_is_answered_by_direct_message(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    e2e.listen()
    request = fake.mention(alice, "for my followers", media=[fake.media(jpeg())], visibility="private")
    reply = e2e.reply_to(request)
    e2e.settle()
    assert reply["visibility"] == "direct"


def test_unlisted_original_gets_unlisted_reply_and_content_warning_is_kept(e2e: E2E) -> None:
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    unlisted = fake.post(alice, "Police at the square", media=[fake.media(jpeg())], visibility="unlisted",
                         sensitive=True, spoiler_text="police violence")
    e2e.listen()
    request = fake.mention(bob, "please", in_reply_to=unlisted)

    reply = e2e.reply_to(request)
    e2e.settle()
    assert reply["visibility"] == "unlisted"
    assert reply["sensitive"] is True
    assert reply["spoiler_text"] == "police violence"


def test_long_content_warning_and_failures_still_fit_one_status(e2e: E2E) -> None:
    # Mastodon counts the CW with the text: a copied 440-character CW beside a reply listing a
    # failure used to exceed 500 and be refused (422) on every retry.
    fake = e2e.fake
    alice, bob = fake.add_account("alice"), fake.add_account("bob")
    warning = "Content warning: " + "police, tear gas, injuries, " * 15
    assert len(warning) > 400
    post = fake.post(alice, "Tonight", media=[fake.media(jpeg()), fake.media(b"not an image at all")],
                     sensitive=True, spoiler_text=warning)
    e2e.listen()
    request = fake.mention(bob, "please", in_reply_to=post)

    reply = e2e.reply_to(request)
    e2e.settle()
    assert len(reply["media_attachments"]) == 1 and reply["sensitive"] is True
    assert reply["spoiler_text"].endswith("…") and warning.startswith(reply["spoiler_text"][:-1])
    assert fake.count_chars(text_of(reply)) + len(reply["spoiler_text"]) <= 500
    assert "To have my copy deleted, send me a direct message with its link." in text_of(reply)


def test_nobot_in_author_profile_gets_explanation_and_no_image(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice", note="Photographer. Please no bots #NoBot")
    bob = fake.add_account("bob")
    photo_post = fake.post(alice, "Crowd", media=[fake.media(jpeg())])
    e2e.listen()
    request = fake.mention(bob, "cover the faces", in_reply_to=photo_post)

    answer = e2e.reply_to(request)
    e2e.settle()
    assert fake.bot_posts() == [answer]
    assert text_of(answer) == f"@bob {messages.NOBOT}"
    assert answer["media_attachments"] == [] and fake.uploads == {}
    assert fake.media_requests() == [], "the opted-out author's image is not even downloaded"


def test_bot_accounts_and_the_bot_itself_are_never_answered(e2e: E2E) -> None:
    fake = e2e.fake
    robot = fake.add_account("robot", bot=True)
    e2e.listen()
    from_bot = fake.mention(robot, "beep", media=[fake.media(jpeg())])
    # the listener skips them; a job that reaches the worker anyway is ignored there too
    own = fake.post(fake.bot, "a post of my own", media=[fake.media(jpeg())])
    e2e.send(e2e.job(from_bot))
    e2e.send(e2e.job(own))
    human = fake.add_account("human")
    control = fake.mention(human, "and me?", media=[fake.media(jpeg())])

    e2e.reply_to(control)
    e2e.settle()
    assert [s["in_reply_to_id"] for s in fake.bot_posts()] == [control["id"]]
    assert e2e.listeners[0].listener.enqueued == 1


def test_media_processed_asynchronously_and_redirected_downloads(e2e: E2E) -> None:
    fake = e2e.fake
    fake.media_async = True  # the server answers 202 and processes the upload in the background
    alice = fake.add_account("alice")
    target = fake.add_file(jpeg())
    moved = fake.media(b"", redirect_to=target)  # the media URL redirects (e.g. to object storage)
    e2e.listen()
    request = fake.mention(alice, "via a redirect", media=[moved])

    reply = e2e.reply_to(request)
    e2e.settle()
    [attachment] = reply["media_attachments"]
    assert attachment["url"], "posted only once the media was processed"
    polls = [r for r in fake.log() if r.path == f"/api/v1/media/{attachment['id']}"]
    assert [r.status for r in polls][-1] == 200 and 206 in [r.status for r in polls]
    assert [r.status for r in fake.media_requests()] == [302, 200]
    assert_anonymised(fake.upload_of(attachment), astronaut(512), face_box(512))


def test_only_the_first_four_images_are_processed_and_the_reply_says_so(e2e: E2E) -> None:
    fake = e2e.fake
    alice = fake.add_account("alice")
    e2e.listen()
    request = fake.mention(alice, "five photos", media=[fake.media(jpeg(96 + 8 * i, exif=False)) for i in range(5)])

    reply = e2e.reply_to(request)
    e2e.settle()
    assert len(reply["media_attachments"]) == 4
    assert text_of(reply).startswith("@alice Here is an anonymised copy (4 images")
    assert text_of(reply).endswith("Not processed: only the first 4 images were processed")
    assert len(fake.media_requests()) == 4
