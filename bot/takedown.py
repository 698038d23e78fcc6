"""Takedown by direct message: delete the bot's own replies for a post, then confirm.

Who may ask: anyone. Deletion only removes the bot's own copy, never anyone else's post, so
letting anyone ask cannot hurt the original author, and the people pictured (who are often not
the poster) must be able to ask. Requests are rate-limited per account. Before deleting, the
bot checks that the post is its own.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from . import messages, soft_limit
from .copies import delete_copy, own_copies
from .deletion_words import URL, asks_deletion
from .earlier_post import earlier_post
from .handler import Job
from .platforms.base import Account, MessagesRefused, NotFound, Platform, Post
from .store import Store

log = logging.getLogger("bot.takedown")
_ID = re.compile(r"(?<![\w@/])(\d{5,30})(?![\w/])")

#: references looked up per message: each remote link costs the bot a search request
MAX_REFERENCES = 10


def references(text: str) -> list[str]:
    """URLs and bare numeric ids in a message, in order, without duplicates."""
    found = [u.rstrip(".,;:!?)>") for u in URL.findall(text)]
    without_urls = URL.sub(" ", text)
    found += _ID.findall(without_urls)
    return list(dict.fromkeys(found))


#: a link to an account's profile, which names no post ("https://server/@bot@bot.server")
_PROFILE = re.compile(r"/@[\w.\-]+(?:@[\w.\-]+)?/?$")


def names_a_post(text: str) -> bool:
    """Whether a message names a post by link or id (a profile link names none)."""
    return any(not _PROFILE.search(ref) for ref in references(text))


@dataclass
class Deleted:
    """What one takedown removed, over all its attempts."""

    #: copies deleted, everywhere or on the bot's side only
    deleted: int = 0
    #: of those, copies the platform deleted only on the bot's side (X DMs)
    one_sided: int = 0
    #: of those, copies for an audience the sender is not in (followers-only, someone else's DM)
    unseen: int = 0


class TakedownHandler:
    """Handles one direct message to the bot."""

    def __init__(self, platform: Platform, store: Store, per_account_per_hour: int) -> None:
        self.platform = platform
        self.store = store
        self.per_account_per_hour = per_account_per_hour

    def _original(self, reference: str) -> str | None:
        name = self.platform.name
        original = self.store.original_for_url(name, reference)
        if original:
            return original
        post_id = self.platform.post_id_from_reference(reference)
        if not post_id:
            return None
        original = self.store.original_for(name, post_id)
        if original is None and getattr(self.platform, "edits_make_new_ids", False):
            # A version of an edited post (the one X shows now, say) whose copies are recorded
            # under its first version: one read finds that. Only links the bot has no record
            # of cost a read.
            try:
                post = self.platform.get_post(post_id)
            except NotFound:
                return None
            if post.key != post_id:
                original = self.store.original_for(name, post.key)
        return original

    def handle(self, job: Job) -> str:
        me = self.platform.me()
        try:
            dm = self.platform.get_post(job.post_id)
        except NotFound:
            return "request_gone"
        requester = dm.account
        if requester.id == me.id or requester.bot:
            return "ignored_bot"
        done_key = f"takedown:{job.platform}:{dm.id}"
        if self.store.done(done_key):
            return "already_done"
        refs = [r for r in references(dm.text) if not r.endswith("/@" + me.acct)][:MAX_REFERENCES]
        answered = self._answered_original(dm)  # the original of the copy ``dm`` answers, if it does
        talk = not refs and bool(dm.in_reply_to_id) and not asks_deletion(dm.text)
        if talk and not answered:
            # An answer to the bot's confirmation or help ("thanks", an auto-responder's "I am
            # away"): answering it would start a conversation that never ends.
            return "ignored_reply"
        if not self.store.admitted(done_key, {f"takedown:{job.platform}:{requester.id}": self.per_account_per_hour}):
            # One notice per hour: a flood of requests must not become a flood of answers.
            if self.store.once(f"notice:takedown:{job.platform}:{requester.id}", 3600):
                return self._confirm(dm, messages.TAKEDOWN_LIMIT, done_key, "rate_limited")
            return "rate_limited"
        if talk:
            # A direct answer to the bot's copy that does not ask for deletion ("thanks!").
            return self._help(dm, messages.TAKEDOWN_ASK, done_key, "no_intent")
        if not refs and answered:
            refs = [dm.in_reply_to_id or ""]  # "please delete this", answering the copy
        if not refs and dm.media:
            # A photo sent by DM (X, where DM photos cannot be fetched): say how to ask instead.
            return self._help(dm, messages.DM_PHOTO, done_key, "dm_photo")
        if not refs:
            return self._help(dm, messages.TAKEDOWN_HELP, done_key, "no_reference")
        originals: dict[str, str] = {}
        unknown = 0
        for ref in refs:
            original = self._original(ref)
            if original:
                originals[original] = ref
            else:
                unknown += 1
        if not originals and answered and asks_deletion(dm.text):
            # "Please delete this, I'm in it: https://example.org/why" or a phone number,
            # answering the copy: what the message names is none of the bot's, the copy is.
            originals[answered] = dm.in_reply_to_id or ""
        for original in originals:
            # Marked before deleting: from now on no request gets a new copy, even if a deletion fails.
            self.store.mark_taken_down(self.platform.name, original)
            self._delete_replies(original, me.id, requester, done_key)
        # What every attempt deleted: one that failed part-way (a 429, a 5xx) deleted some already.
        counts = Deleted(**self.store.tally(done_key))
        deleted, one_sided, unseen = counts.deleted, counts.one_sided, counts.unseen
        if originals and deleted == 0:
            text = messages.TAKEDOWN_ALREADY
        elif unseen:
            # Some copies were for an audience the sender is not in: their number (how many
            # people asked about a followers-only post) is not the sender's to learn.
            text = messages.TAKEDOWN_DONE_UNCOUNTED + (" " + messages.TAKEDOWN_ONE_SIDED_OTHERS if one_sided else "")
        elif originals:
            text = messages.TAKEDOWN_DONE.format(count=deleted)
            if one_sided:
                text += " " + messages.takedown_one_sided(one_sided)
        else:
            # Only links and numbers the bot does not know: said once an hour, like the other
            # explanations (an auto-responder's signature carries links and phone numbers).
            text = messages.takedown_unknown(unknown) + " " + messages.TAKEDOWN_HELP
            return self._help(dm, text, done_key, "nothing_deleted", topic="unknown")
        if originals and unknown:
            text += " " + messages.takedown_unknown(unknown)
        log.info("takedown", extra={"dm_id": dm.id, "originals": len(originals), "deleted": deleted, "unknown": unknown})
        return self._confirm(dm, text, done_key, "deleted" if deleted else "nothing_deleted")

    def _delete_replies(self, original: str, my_id: str, sender: Account, tally_key: str) -> None:
        """Delete the bot's replies for ``original``, counting them (and those the sender may not
        see) in the tally of ``tally_key`` as each goes."""
        name = self.platform.name
        for post in own_copies(self.platform, self.store, original, my_id):
            seen = (
                post.visibility in ("public", "unlisted")
                or post.addresses(sender)
                or self.store.requester_of(name, post.id) == sender.id
            )

            def count(removed: bool) -> None:  # called within this iteration, before the record goes
                self.store.add_to_tally(tally_key, deleted=1, unseen=int(not seen), one_sided=int(removed is False))

            delete_copy(self.platform, self.store, original, post, count)

    def _answered_original(self, dm: Post) -> str | None:
        """The original of the bot's copy ``dm`` replies to; None when it replies to no copy
        (to the bot's confirmation or help, or to nothing)."""
        replied_to = dm.in_reply_to_id
        return self.store.original_for(self.platform.name, replied_to) if replied_to else None

    def _help(self, dm: Post, text: str, done_key: str, outcome: str, topic: str = "how") -> str:
        """An explanation (how to ask; which links the bot does not know), each ``topic`` at most
        once per account and hour: an auto-responder, or someone chatting with the bot, must not
        get the same explanation for every message, while a person who next sends a wrong link
        still hears about it."""
        once = f"help:takedown:{topic}:{self.platform.name}:{dm.account.id}"
        if not self.store.once(once, 3600):
            return "helped_recently"
        try:
            return self._confirm(dm, text, done_key, outcome)
        except Exception:
            self.store.forget(once)  # not sent: the retry must still send it
            raise

    def _confirm(self, dm: Post, text: str, done_key: str, outcome: str) -> str:
        with soft_limit.held("confirmation"):  # sent and recorded in one go (bot/soft_limit.py)
            key = f"ppb-{done_key}"
            try:
                earlier = earlier_post(self.platform, self.store, key, dm.id, with_media=False)
                sent_id = (earlier or self.platform.direct_message(dm.account, text, in_reply_to=dm, idempotency_key=key)).id
            except MessagesRefused:
                # What was asked is done, and a retry would only be refused again.
                log.warning("confirmation_refused", extra={"dm_id": dm.id, "outcome": outcome})
                sent_id = "confirmation-refused"
            self.store.mark_done(done_key, sent_id)
        return outcome
