"""Takedown by direct message: delete the bot's own replies for a post, then confirm.

Who may ask: anyone. Deletion only removes the bot's own copy, never anyone else's post, so
letting anyone ask cannot hurt the original author, and the people pictured (who are often not
the poster) must be able to ask. Requests are rate-limited per account. Before deleting, the
bot checks that the post is its own.
"""

from __future__ import annotations

import logging
import re

from . import messages
from .handler import Job
from .platforms.base import NotFound, Platform, Post
from .store import Store

log = logging.getLogger("bot.takedown")
_URL = re.compile(r"https?://[^\s<>\"']+")
_ID = re.compile(r"(?<![\w@/])(\d{5,30})(?![\w/])")


def references(text: str) -> list[str]:
    """URLs and bare numeric ids in a message, in order, without duplicates."""
    found = [u.rstrip(".,;:!?)>") for u in _URL.findall(text)]
    without_urls = _URL.sub(" ", text)
    found += _ID.findall(without_urls)
    return list(dict.fromkeys(found))


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
        return self.store.original_for(name, post_id) if post_id else None

    def handle(self, job: Job) -> str:
        me = self.platform.me()
        dm = self.platform.get_post(job.post_id)
        requester = dm.account
        if requester.id == me.id or requester.bot:
            return "ignored_bot"
        done_key = f"takedown:{job.platform}:{dm.id}"
        if self.store.done(done_key):
            return "already_done"
        if not self.store.within_limit(f"takedown:{job.platform}:{requester.id}", self.per_account_per_hour):
            return self._confirm(dm, messages.TAKEDOWN_LIMIT, done_key, "rate_limited")
        refs = [r for r in references(dm.text) if not r.endswith("/@" + me.acct)]
        if not refs and dm.in_reply_to_id:
            refs = [dm.in_reply_to_id]  # a DM answering the bot's copy: "please delete this"
        if not refs:
            return self._confirm(dm, messages.TAKEDOWN_HELP, done_key, "no_reference")
        originals: dict[str, str] = {}
        unknown: list[str] = []
        for ref in refs:
            original = self._original(ref)
            if original:
                originals[original] = ref
            else:
                unknown.append(ref)
        deleted = sum(self._delete_replies(original, me.id) for original in originals)
        if originals and deleted == 0:
            text = messages.TAKEDOWN_ALREADY
        elif originals:
            text = messages.TAKEDOWN_DONE.format(count=deleted)
        else:
            text = messages.TAKEDOWN_UNKNOWN.format(refs=", ".join(unknown[:5])) + " " + messages.TAKEDOWN_HELP
        if originals and unknown:
            text += " " + messages.TAKEDOWN_UNKNOWN.format(refs=", ".join(unknown[:5]))
        log.info("takedown", extra={"dm_id": dm.id, "originals": len(originals), "deleted": deleted, "unknown": len(unknown)})
        return self._confirm(dm, text, done_key, "deleted" if deleted else "nothing_deleted")

    def _delete_replies(self, original: str, my_id: str) -> int:
        name = self.platform.name
        deleted = 0
        for reply_id in sorted(self.store.replies_of(name, original)):
            try:
                post = self.platform.get_post(reply_id)
            except NotFound:
                self.store.forget_reply(name, original, reply_id)
                continue
            if post.account.id != my_id:
                log.warning("not_ours", extra={"post_id": reply_id})
                continue
            self.platform.delete_post(reply_id)
            self.store.forget_reply(name, original, reply_id)
            deleted += 1
        return deleted

    def _confirm(self, dm: Post, text: str, done_key: str, outcome: str) -> str:
        sent = self.platform.direct_message(dm.account, text, in_reply_to=dm, idempotency_key=f"ppb-{done_key}")
        self.store.mark_done(done_key, sent.id)
        return outcome
