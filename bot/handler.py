"""Mention (or hashtag post) -> anonymised reply: the platform-independent heart of the worker.

Idempotent: a finished job is recorded in Redis, and every post the bot makes carries an
idempotency key derived from the job, so a retried or redelivered task never posts twice even
if it was killed between posting and recording.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from anonymiser.errors import AnonymiserError
from anonymiser.pipeline import Anonymiser, Result

from . import messages, soft_limit
from .config import BotConfig
from .copies import delete_copy
from .deletion_words import asks_deletion, commands_deletion
from .earlier_post import earlier_post
from .fetch import FetchError, fetch
from .logs import Timer
from .platforms.base import Account, MessagesRefused, NotFound, Platform, Post, RepliesClosed, ReplyDraft, Visibility, narrowest
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


def reply_visibility(target: Post, request: Post) -> Visibility:
    """Never wider than the original or the request.

    A followers-only original is answered by direct message: the bot's followers are not the
    author's followers, so a followers-only reply from the bot would reach a different audience.
    A protected account's image, or a post its server keeps local, is never reposted in public,
    whatever the post says. Nor is a request its server keeps local answered in public: the
    reply would federate, mentioning the requester and pointing at a post meant for one server.
    """
    narrow = narrowest(target.visibility, request.visibility)
    if narrow == "private":
        return "direct"
    if narrow in ("public", "unlisted") and (target.account.locked or target.local_only or request.local_only):
        return "direct"
    return narrow


def opted_out(account: Account) -> bool:
    """``#nobot`` / ``#noanon`` in the profile means: do not repost my images. The profile is
    the bio and its metadata fields (a "Bots: #nobot" line is as clear as the bio)."""
    texts = [account.note or "", *(part for field in account.fields for part in field)]
    return any(_NOBOT.search(text) for text in texts)


def may_see(request: Post, target: Post) -> bool:
    """Whether the requester is in the audience of ``target`` as far as the bot can tell.

    The bot reads posts with its own rights, which may be wider than the requester's (the bot
    follows a locked author; another server relays a reply to a post its author never showed the
    replier). For a followers-only or direct post the bot cannot list who follows whom, so it
    trusts the author, the accounts the post mentions where that puts them in its audience
    (Mastodon, not X), and a reply from an account of its own server, which that server accepts
    only to a post the account may see. A post its server keeps local is for that server's
    accounts only, whatever its visibility.
    """
    requester = request.account
    if requester.id == target.account.id:
        return True
    if target.local_only and not requester.local:
        # Its server shows it to its own accounts only; a remote reply to it came through a
        # server that should never have had it.
        return False
    if target.visibility in ("public", "unlisted"):
        return True
    if target.mentions_see and target.addresses(requester):
        return True
    return requester.local and request.in_reply_to_id == target.id


@dataclass
class Lookup:
    """Where a request points."""

    #: the post whose images to anonymise, if any
    target: Post | None
    #: the post the request replies to, if the bot could read it
    parent: Post | None = None
    #: the post the request quotes, if the bot could read it
    quoted: Post | None = None
    #: a post the request points at is deleted or hidden from the bot
    gone: bool = False


def choose_target(platform: Platform, request: Post) -> Lookup:
    """The post whose images to anonymise: the request itself, else the one it replies to or quotes."""
    if request.images:
        return Lookup(request)
    found = Lookup(None)
    for parent_id in (request.in_reply_to_id, request.quote_id):
        if not parent_id:
            continue
        try:
            post = platform.get_post(parent_id)
        except NotFound:
            found.gone = True
            continue
        if parent_id == request.in_reply_to_id:
            found.parent = post
        else:
            found.quoted = post
        if post.images:
            found.target = post
            return found
    return found


def incidental(request: Post, parent: Post | None, me: Account) -> bool:
    """A mention nobody meant as a request.

    Replies pre-fill every account the parent mentions, so answers in a thread where someone
    once asked the bot mention it again and again; a reply to the bot's own post (another bot's
    auto-reply, a "thanks") mentions it too. Answering those with "no photo here" would spam the
    thread, and two bots would answer each other for ever.
    """
    if request.in_reply_to_account_id == me.id:
        return True
    return parent is not None and (parent.account.id == me.id or parent.addresses(me))


class _RequestGone(Exception):
    """The request was deleted while the bot worked on it: there is nobody left to answer."""


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
        with soft_limit.held("answer"):
            posted = self._reply(
                ReplyDraft(
                    in_reply_to=request,
                    text=f"@{request.account.acct} {text}",
                    visibility=visibility,
                    idempotency_key=f"ppb-note-{key}",
                )
            )
            self.store.mark_done(f"note:{key}", posted.id)
        return posted.id

    def _decline(self, job: Job, request: Post, text: str, visibility: Visibility, key: str, outcome: str,
                 counted: bool = False) -> str:
        """No copy: a mention is told why; a hashtag post, whose author asked nothing, is not.

        Explanations have hourly limits of their own, per account and for the bot, of the same
        size as the copies' (a request whose copy was already ``counted`` against those is
        answered regardless): mentions that cost no photo must not buy a flood of posts, each
        of which spends the bot's posting budget that copies wait for."""
        if job.kind == "hashtag":
            return outcome
        if counted or self.store.admitted(f"answer:{key}", {
            f"answers:acct:{job.platform}:{job.requester_id}": self.config.per_account_per_hour,
            f"answers:global:{job.platform}": self.config.global_per_hour,
        }):
            self._answer(job, request, text, visibility, key)
        else:
            log.info("answer_limited", extra={"platform": job.platform, "post_id": job.post_id, "outcome": outcome})
        return outcome

    def _notice(self, job: Job, request: Post, text: str, visibility: Visibility, key: str, limit_key: str) -> None:
        """A "too many requests" answer, at most once per account and hour: a loop or a flood
        must not turn every refused request into another post."""
        if self.store.once(f"notice:{limit_key}", 3600):
            self._answer(job, request, text, visibility, key)

    def _copy_in_view(self, platform: str, original_key: str) -> bool:
        """Whether a copy of ``original_key`` was posted where anyone may see it."""
        return any(self.store.copy_visibility(platform, reply) in ("public", "unlisted")
                   for reply in self.store.replies_of(platform, original_key))

    def _admitted(self, job: Job, key: str) -> bool:
        """Count the request against the per-account and global hourly limits, once per job."""
        return self.store.admitted(key, {
            f"acct:{job.platform}:{job.requester_id}": self.config.per_account_per_hour,
            f"global:{job.platform}": self.config.global_per_hour,
        })

    def _reply(self, draft: ReplyDraft) -> Post:
        """Post ``draft``; by direct message to the requester, saying why, where the platform
        refuses a reply in that conversation (X's reply settings): the answer was asked for, and
        a retry or an apology would meet the same refusal. The idempotency key stays, so a
        redelivered job finds the message sent before."""
        try:
            return self._post(draft)
        except RepliesClosed:
            log.info("replies_closed_dm", extra={"post_id": draft.in_reply_to.id,
                                                 "requester_id": draft.in_reply_to.account.id})
            return self._post(replace(draft, visibility="direct", text=f"{draft.text} {messages.REPLIES_CLOSED}"))

    def _post(self, draft: ReplyDraft) -> Post:
        """Post ``draft``; ``_RequestGone`` if the request it answers was deleted meanwhile
        (a "delete & re-draft" while its photos were being anonymised), which no retry mends."""
        earlier = earlier_post(self.platform, self.store, draft.idempotency_key, draft.in_reply_to.id,
                               bool(draft.media_ids))
        if earlier is not None:
            return earlier
        try:
            return self.platform.reply(draft)
        except NotFound:
            try:
                self.platform.get_post(draft.in_reply_to.id)
            except NotFound:
                raise _RequestGone() from None
            raise

    def handle(self, job: Job) -> str:
        """Process ``job``; returns a short outcome word for logs and tests."""
        try:
            return self._handle(job)
        except _RequestGone:
            return "request_gone"
        except MessagesRefused:
            # A protected requester (X) whose messages are closed to the bot: an answer that
            # may only be private cannot be sent at all, and no retry or apology reaches them.
            log.warning("dm_refused", extra={"platform": job.platform, "post_id": job.post_id})
            return "dm_refused"

    def _handle(self, job: Job) -> str:
        me = self.platform.me()
        try:
            request = self.platform.get_post(job.post_id)
        except NotFound:
            return "request_gone"  # deleted before its turn: there is nobody left to answer
        requester = request.account
        if requester.id == me.id or requester.bot:
            return "ignored_bot"
        recovered = self._recover_copy(job, request)
        found = choose_target(self.platform, request)
        target = found.target
        if target is not None and target.account.id == me.id:
            # "Thanks!" under the bot's own copy mentions the bot too: never re-anonymise our copy.
            if asks_deletion(request.text):
                # "can you delete this? I'm in it": public talk under a copy is not taken as a
                # takedown command unless it starts with one, but silence would leave the person
                # asking with no way forward; they are told how, privately, once.
                key = self._key(job, request.key)
                if self.store.done(f"note:{key}"):
                    return "already_done"
                return self._decline(job, request, messages.TAKEDOWN_HELP, "direct", key, "takedown_help")
            return "ignored_own_copy"
        if job.kind != "hashtag" and incidental(request, found.parent, me) and (
            (target is None and not found.gone)
            # Talk under a request that carried its photo ("@alice @ppbot great idea!") is not a
            # new request either once that photo's copy is in the thread for all to see: else
            # every reply-all under a busy request would cost a copy of its own.
            or (target is not None and self._copy_in_view(job.platform, target.key))
        ):
            return "ignored_incidental"
        # Text-only answers are keyed by the request, so asking again later gets a fresh answer;
        # an anonymised copy is keyed by (original, requester), so it is never posted twice.
        key = self._key(job, request.key)
        copied = self.store.reply_for(job.platform, target.key, job.requester_id) if target is not None else None
        if copied and target is not None and self.store.taken_down(job.platform, target.key):
            # A retry of a run whose copy was overtaken by a takedown and could not be deleted
            # then (the deletion budget the takedown spent, a worker lost): delete it now.
            try:
                self._take_back(target.key, self.platform.get_post(copied))
            except NotFound:
                self.store.forget_reply(job.platform, target.key, copied)  # gone already
            return "taken_down"
        if self.store.done(f"note:{key}") or copied:
            return "replied" if recovered else "already_done"  # recovered: this job's answer went out now
        if target is None:
            if job.kind == "hashtag":
                return "no_image"
            hidden = [p for p in (found.parent, found.quoted) if p is not None and not may_see(request, p)]
            if hidden:
                # Same answer as for a post with photos: whether a post outside the requester's
                # audience has photos is not theirs to learn.
                return self._decline(job, request, messages.NOT_YOURS, reply_visibility(hidden[0], request), key,
                                     "not_visible")
            text, outcome = (messages.GONE, "gone") if found.gone else (messages.NO_IMAGE, "no_image")
            if request.quote_id is None and request.quote_state not in ("", "accepted"):
                # A quote not (or no longer) approved hides the quoted post from everyone but
                # its quoter: "no photo here" would be wrong, and no new mention comes once a
                # pending quote is approved.
                text, outcome = {"pending": (messages.QUOTE_PENDING, "quote_pending"),
                                 "rejected": (messages.QUOTE_REFUSED, "quote_refused")}.get(
                                     request.quote_state, (messages.GONE, "gone"))
            return self._decline(job, request, text, reply_visibility(request, request), key, outcome)
        visibility = reply_visibility(target, request)
        if not may_see(request, target):
            # Only the bot's rights reached this post: a copy would widen its audience.
            return self._decline(job, request, messages.NOT_YOURS, visibility, key, "not_visible")
        if commands_deletion(request.text) and self.store.replies_of(job.platform, target.key):
            # "@ppbot delete your copy, I am in this photo" under the original: a fresh copy
            # would hand the person asking for removal another one and leave the first up.
            return self._decline(job, request, messages.DELETE_NOT_COPY, "direct", key, "takedown_help")
        if opted_out(target.account):
            return self._decline(job, request, messages.NOBOT, visibility, key, "opted_out")
        if self.store.taken_down(job.platform, target.key):
            # Someone (often a person in the photo) had the copies deleted: a new copy for the
            # next requester would undo that. Said privately: a public note would point at the photo.
            return self._decline(job, request, messages.TAKEN_DOWN, "direct", key, "taken_down")
        copy_key = self._key(job, target.key)
        if not self._admitted(job, copy_key):
            if job.kind != "hashtag":
                self._notice(job, request, messages.RATE_LIMITED, visibility, key, f"{job.platform}:{job.requester_id}")
            return "rate_limited"

        results, copied_media, failures = self._anonymise_all(target)
        if not results:
            return self._decline(job, request, messages.failed_all(failures), visibility, key, "failed", counted=True)
        heads = sum(r.report.heads_covered for r in results)
        media_ids = [
            self.platform.upload_image(r.data, r.mime, messages.alt_text(r.report.heads_covered)) for r in results
        ]
        # Posted and recorded in one go: a copy posted but not recorded could not be taken down
        # by direct message, and its requester would be sent an apology too.
        with soft_limit.held("reply"):
            self.store.begin_copy(job.platform, target.key, request.id, job.requester_id)
            posted = self._reply(
                ReplyDraft(
                    in_reply_to=request,
                    text=f"@{requester.acct} " + messages.reply_text(heads, len(results), failures),
                    visibility=visibility,
                    media_ids=media_ids,
                    sensitive=target.sensitive,
                    spoiler_text=target.spoiler_text,
                    # Keyed by the request too: after a takedown, a new request must not get the
                    # deleted reply back from the server's idempotency cache.
                    idempotency_key=f"ppb-reply-{copy_key}:{request.id}",
                )
            )
            self.store.record_reply(job.platform, target.key, job.requester_id, posted.id,
                                    [posted.url, posted.uri, target.url, target.uri],
                                    # as sent: a reply the platform refused went by direct message
                                    narrowest(visibility, posted.visibility), copied_media,
                                    # a redelivery finding the original gone (deleted, its photos
                                    # edited out) must still see that this request has its answer
                                    answered=f"note:{key}",
                                    warned=target.sensitive or bool(target.spoiler_text), request_id=request.id)
        if self.store.taken_down(job.platform, target.key):
            # A takedown ran while this copy was being made: it marked the original before
            # reading its copies, and this copy was recorded before this look, so one of the two
            # always sees the other and the copy never outlives the takedown.
            self._take_back(target.key, posted)
            log.info("copy_taken_down", extra={"job": copy_key, "reply_id": posted.id})
            return "taken_down"
        log.info("replied", extra={"job": copy_key, "reply_id": posted.id, "images": len(results), "heads": heads})
        return "replied"

    def _recover_copy(self, job: Job, request: Post) -> bool:
        """Record a copy an earlier run of this job posted but could not record (Redis failed,
        the worker was killed between the two), before anything below may end the run: only
        reaching the post again used to find it, and every earlier answer (the original deleted
        meanwhile, a takedown, an opt-out) left the copy online for good, beyond any takedown.
        Recorded, it meets the checks like any copy; the sweep looks at its original at once.
        True when one was recovered."""
        original = self.store.unrecorded_copy(job.platform, request.id, job.requester_id)
        find = getattr(self.platform, "own_reply", None)
        if original is None or find is None or self.store.reply_for(job.platform, original, job.requester_id):
            return False
        posted: Post | None = find(request.id, True)
        if posted is None:
            return False  # the earlier run ended before its copy went out
        self.store.record_reply(job.platform, original, job.requester_id, posted.id, [posted.url, posted.uri],
                                posted.visibility, answered=f"note:{self._key(job, request.key)}",
                                warned=posted.sensitive or bool(posted.spoiler_text), request_id=request.id)
        self.store.check_again(job.platform, original, time.time())
        log.warning("unrecorded_copy_recovered", extra={"post_id": request.id, "reply_id": posted.id})
        return True

    def _take_back(self, original_id: str, copy: Post) -> None:
        """Delete a copy a takedown overtook. Its original's withdrawal check is brought forward
        first, so that if this deletion fails for good the sweep deletes the copy soon after."""
        self.store.check_again(self.platform.name, original_id, time.time())
        delete_copy(self.platform, self.store, original_id, copy)

    def _anonymise_all(self, target: Post) -> tuple[list[Result], list[str], list[str]]:
        """The anonymised images, the ids of the attachments they copy, and what failed."""
        results: list[Result] = []
        copied: list[str] = []
        failures: list[str] = []
        images = target.images[: self.config.max_images]
        caps = self.platform.media_limits()
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
                    results.append(self.anonymiser.anonymise(data, max_output_bytes=caps.max_bytes, max_output_pixels=caps.max_pixels))
                finally:
                    del data  # the original lives only as long as this call
            except (FetchError, AnonymiserError) as exc:
                failures.append(f"image {index}: {messages.failure_reason(exc)}")
                log.info("image_failed", extra={"post_id": target.id, "media_id": media.id, "error": type(exc).__name__, "s": timer()})
                continue
            copied.append(media.id)
            log.info("image_done", extra={"post_id": target.id, "media_id": media.id, "heads": results[-1].report.heads_covered, "s": timer()})
        if len(target.images) > self.config.max_images:
            failures.append(f"only the first {self.config.max_images} images were processed")
        others = len(target.media) - len(target.images)
        if others:
            # Say so: a reader must not take the copy for the whole post.
            failures.append(f"{others} video, audio or other attachment{'s' if others > 1 else ''} (only photos are anonymised)")
        return results, copied, failures
