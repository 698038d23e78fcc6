"""Mention (or hashtag post) -> anonymised reply: the platform-independent heart of the worker.

Idempotent: a finished job is recorded in Redis, and every post the bot makes carries an
idempotency key derived from the job, so a retried or redelivered task never posts twice even
if it was killed between posting and recording.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from anonymiser.errors import AnonymiserError
from anonymiser.pipeline import Anonymiser, Result

from . import messages
from .config import BotConfig
from .fetch import FetchError, fetch
from .logs import Timer
from .platforms.base import Account, Platform, Post, ReplyDraft, Visibility, narrowest
from .store import Store

log = logging.getLogger("bot.handler")
_NOBOT = re.compile(r"#no(?:bot|anon)\b", re.IGNORECASE)


@dataclass
class Job:
    """What the listener enqueues: ids only, never image bytes."""

    platform: str
    post_id: str
    requester_id: str
    kind: str  # "mention", "hashtag" or "takedown"
    event_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        return cls(**{k: str(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def reply_visibility(target: Visibility, request: Visibility) -> Visibility:
    """Never wider than the original or the request.

    A followers-only original is answered by direct message: the bot's followers are not the
    author's followers, so a followers-only reply from the bot would reach a different audience.
    """
    narrow = narrowest(target, request)
    return "direct" if narrow == "private" else narrow


def opted_out(account: Account) -> bool:
    """``#nobot`` / ``#noanon`` in the profile means: do not repost my images."""
    return bool(_NOBOT.search(account.note or ""))


def choose_target(platform: Platform, request: Post) -> Post | None:
    """The post whose images to anonymise: the request itself, else the one it replies to or quotes."""
    if request.images:
        return request
    for parent_id in (request.in_reply_to_id, request.quote_id):
        if parent_id:
            parent = platform.get_post(parent_id)
            if parent.images:
                return parent
    return None


class MentionHandler:
    """Runs one mention/hashtag job end to end."""

    def __init__(self, platform: Platform, store: Store, anonymiser: Anonymiser, config: BotConfig) -> None:
        self.platform = platform
        self.store = store
        self.anonymiser = anonymiser
        self.config = config

    @staticmethod
    def _key(job: Job, post_id: str) -> str:
        return f"{job.platform}:{post_id}:{job.requester_id}"

    def _answer(self, job: Job, request: Post, text: str, visibility: Visibility, key: str) -> str:
        """A text-only answer in the thread, recorded so it is never sent twice."""
        posted = self.platform.reply(
            ReplyDraft(
                in_reply_to=request,
                text=f"@{request.account.acct} {text}",
                visibility=visibility,
                idempotency_key=f"ppb-note-{key}",
            )
        )
        self.store.mark_done(f"note:{key}", posted.id)
        return posted.id

    def handle(self, job: Job) -> str:
        """Process ``job``; returns a short outcome word for logs and tests."""
        me = self.platform.me()
        request = self.platform.get_post(job.post_id)
        requester = request.account
        if requester.id == me.id or requester.bot:
            return "ignored_bot"
        target = choose_target(self.platform, request)
        if target is not None and target.account.id == me.id:
            # "Thanks!" under the bot's own copy mentions the bot too: never re-anonymise our copy.
            return "ignored_own_copy"
        # Text-only answers are keyed by the request, so asking again later gets a fresh answer;
        # an anonymised copy is keyed by (original, requester), so it is never posted twice.
        key = self._key(job, request.id)
        if self.store.done(f"note:{key}") or (
            target is not None and self.store.reply_for(job.platform, target.id, job.requester_id)
        ):
            return "already_done"
        request_visibility = request.visibility
        if target is None:
            if job.kind == "hashtag":
                return "no_image"
            self._answer(job, request, messages.NO_IMAGE, reply_visibility(request_visibility, request_visibility), key)
            return "no_image"
        visibility = reply_visibility(target.visibility, request_visibility)
        if target.account.locked and visibility in ("public", "unlisted"):
            # A protected account's image is never reposted in public, whatever the post says.
            visibility = "direct"
        if opted_out(target.account):
            if job.kind != "hashtag":
                self._answer(job, request, messages.NOBOT, visibility, key)
            return "opted_out"
        if not (
            self.store.within_limit(f"acct:{job.platform}:{job.requester_id}", self.config.per_account_per_hour)
            and self.store.within_limit(f"global:{job.platform}", self.config.global_per_hour)
        ):
            if job.kind != "hashtag":
                self._answer(job, request, messages.RATE_LIMITED, visibility, key)
            return "rate_limited"

        results, failures = self._anonymise_all(target)
        if not results:
            self._answer(job, request, messages.failed_all(failures), visibility, key)
            return "failed"
        heads = sum(r.report.heads_covered for r in results)
        media_ids = [
            self.platform.upload_image(r.data, r.mime, messages.alt_text(r.report.heads_covered)) for r in results
        ]
        posted = self.platform.reply(
            ReplyDraft(
                in_reply_to=request,
                text=f"@{requester.acct} " + messages.reply_text(heads, len(results), failures),
                visibility=visibility,
                media_ids=media_ids,
                sensitive=target.sensitive,
                spoiler_text=target.spoiler_text,
                # Keyed by the request too: after a takedown, a new request must not get the
                # deleted reply back from the server's idempotency cache.
                idempotency_key=f"ppb-reply-{self._key(job, target.id)}:{request.id}",
            )
        )
        self.store.record_reply(job.platform, target.id, job.requester_id, posted.id, [posted.url, posted.uri, target.url, target.uri])
        log.info("replied", extra={"job": self._key(job, target.id), "reply_id": posted.id, "images": len(results), "heads": heads})
        return "replied"

    def _anonymise_all(self, target: Post) -> tuple[list[Result], list[str]]:
        results: list[Result] = []
        failures: list[str] = []
        images = target.images[: self.config.max_images]
        for index, media in enumerate(images, start=1):
            timer = Timer()
            try:
                data = fetch(
                    media.url,
                    self.config.max_media_bytes,
                    self.config.media_timeout_s,
                    allow_private=self.config.allow_private_addresses,
                )
                try:
                    results.append(self.anonymiser.anonymise(data))
                finally:
                    del data  # the original lives only as long as this call
            except (FetchError, AnonymiserError) as exc:
                failures.append(f"image {index}: {messages.failure_reason(exc)}")
                log.info("image_failed", extra={"post_id": target.id, "media_id": media.id, "error": type(exc).__name__, "s": timer()})
                continue
            log.info("image_done", extra={"post_id": target.id, "media_id": media.id, "heads": results[-1].report.heads_covered, "s": timer()})
        if len(target.images) > self.config.max_images:
            failures.append(f"only the first {self.config.max_images} images were processed")
        return results, failures
