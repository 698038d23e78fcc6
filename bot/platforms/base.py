"""The one interface every platform (Mastodon, X) implements, and the data it speaks in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol
from urllib.parse import ParseResult, urlparse

#: from the narrowest audience to the widest
VISIBILITIES = ("direct", "private", "unlisted", "public")
Visibility = Literal["direct", "private", "unlisted", "public"]


@dataclass(frozen=True)
class Account:
    id: str
    acct: str
    bot: bool = False
    note: str = ""
    #: profile metadata as plain-text (name, value) pairs (Mastodon's "fields"): where people also
    #: write #nobot
    fields: tuple[tuple[str, str], ...] = ()
    #: protected/locked accounts (X protected, Mastodon locked)
    locked: bool = False
    #: an account of the bot's own server, whose replies that server lets through only to posts
    #: the account may see (Mastodon local accounts; every account on X)
    local: bool = True


@dataclass(frozen=True)
class Media:
    id: str
    type: str  # "image", "video", "gifv", "audio", "unknown"
    url: str
    description: str = ""


@dataclass(frozen=True)
class Post:
    id: str
    account: Account
    text: str
    visibility: Visibility = "public"
    sensitive: bool = False
    spoiler_text: str = ""
    in_reply_to_id: str | None = None
    in_reply_to_account_id: str | None = None
    quote_id: str | None = None
    #: where the platform has quote approvals (Mastodon 4.5+), the quote's state as the bot sees
    #: it: the quoted post is shown (``quote_id``) only once "accepted"; "" without a quote
    quote_state: str = ""
    url: str = ""
    uri: str = ""
    media: tuple[Media, ...] = ()
    tags: tuple[str, ...] = ()
    #: the accounts the post mentions (who, besides its author, may see a followers-only or direct
    #: post): account ids, or lower-case usernames where a platform gives only those (X)
    addressed: tuple[str, ...] = ()
    #: whether the accounts it mentions are in its audience: on Mastodon a followers-only post
    #: is delivered to them; on X a protected tweet reaches approved followers only, mentioned or not
    mentions_see: bool = True
    #: a post its server keeps from federating (glitch-soc, Hometown), or one X withholds in some
    #: countries: never repost it in public
    local_only: bool = False
    #: every id of the post's versions, oldest first, where an edit makes a new post (X's
    #: ``edit_history_tweet_ids``, when edited); empty where an edit keeps the id (Mastodon)
    versions: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[Media, ...]:
        return tuple(m for m in self.media if m.type == "image")

    @property
    def key(self) -> str:
        """The id the bot's records of this post use: its first version's, so that requests,
        copies and takedowns naming any version of an edited post meet in one record."""
        return self.versions[0] if self.versions else self.id

    def addresses(self, account: Account) -> bool:
        """Whether the post mentions ``account``."""
        return account.id in self.addressed or account.acct.lower() in self.addressed


@dataclass(frozen=True)
class Event:
    """Something the listener reacts to: a mention (or DM) of the bot, or a hashtag post."""

    kind: Literal["mention", "hashtag"]
    id: str  # notification id for mentions, status id for hashtag posts
    post: Post
    tag: str = ""
    #: nothing for the bot to answer, listed only so that the cursor moves past it (a message
    #: in a group conversation on X, a retweet of a mention)
    skip: bool = False


#: what a parser raises on a server's odd JSON: a key missing, or null, a number or a string
#: where an object or a list belongs
ODD_JSON = (KeyError, TypeError, AttributeError, ValueError, IndexError)


def read_event(item: Any, read: Callable[[Any], Event], kind: Literal["mention", "hashtag"],
               log: logging.Logger, tag: str = "") -> Event | None:
    """``read(item)``, for one item a server listed or streamed. An item whose JSON is odd
    becomes a ``skip`` event with the item's id: nothing is answered (the bot cannot tell who
    asked, nor who may see an answer), but the cursor moves past it. Raised instead, the parser's
    error would stop the channel at that item for good, since every poll lists it again, and no
    later request on the channel would be answered. None for an item without an id to move the
    cursor to."""
    try:
        return read(item)
    except ODD_JSON as exc:
        known = listed_id(item)
        log.warning("unreadable_item", extra={"kind": kind, "item_id": known, "error": type(exc).__name__})
        if known is None:
            return None
        return Event(kind, known, Post(id="", account=Account(id="", acct=""), text=""), tag=tag, skip=True)


def read_events(items: list[Any], read: Callable[[Any], Event], kind: Literal["mention", "hashtag"],
                log: logging.Logger, tag: str = "") -> list[Event]:
    """:func:`read_event` of each item, leaving out those without an id."""
    return [event for item in items if (event := read_event(item, read, kind, log, tag)) is not None]


def listed_id(item: Any) -> str | None:
    """A listed or streamed item's id, where it has one a cursor can move to."""
    value = item.get("id") if isinstance(item, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        return None
    return str(value)


class PlatformError(Exception):
    """A platform call failed; ``retryable`` says whether trying later may help."""

    retryable = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: the longest wait a rate limit is taken to ask for: X's 24-hour posting limits are the longest
#: windows either platform documents. A reset header from a broken or hostile server (a year
#: away, or digits that read as infinity) would otherwise park a job, or refuse a route, for ever.
MAX_RATE_LIMIT_WAIT_S = 25 * 3600.0


def bounded_reset(reset_epoch: float, now: float | None = None) -> float:
    """When a rate-limit window ends, at most :data:`MAX_RATE_LIMIT_WAIT_S` from ``now``."""
    return min(reset_epoch, (time.time() if now is None else now) + MAX_RATE_LIMIT_WAIT_S)


class RateLimited(PlatformError):
    retryable = True

    def __init__(self, message: str, retry_after_s: float, status: int | None = 429) -> None:
        super().__init__(message, status)
        self.retry_after_s = min(retry_after_s, MAX_RATE_LIMIT_WAIT_S)


class ServerError(PlatformError):
    retryable = True


class NotFound(PlatformError):
    pass


class MessagesRefused(PlatformError):
    """The account takes no direct messages from the bot (X): asking again will not help, and
    nothing may be sent more publicly instead."""


class RepliesClosed(PlatformError):
    """The platform refuses a reply in this conversation (X: its first post's author limits who
    may reply); the answer may still be sent privately."""


class StreamUnavailable(PlatformError):
    """Streaming is refused or unsupported here; the listener falls back to polling."""


@dataclass(frozen=True)
class MediaLimits:
    """What a platform accepts as one uploaded image; ``None``: no limit it publishes."""

    max_bytes: int | None = None
    max_pixels: int | None = None


@dataclass
class ReplyDraft:
    """A reply the bot wants to post."""

    in_reply_to: Post
    text: str
    visibility: Visibility
    media_ids: list[str] = field(default_factory=list)
    sensitive: bool = False
    spoiler_text: str = ""
    idempotency_key: str = ""


class Platform(Protocol):
    """What the listener, the tasks and the takedown flow need from a social network.

    Some members are optional, for what only some networks have, and are used where present:
    ``dms_since(since_id)``, direct messages that are not mentions (X);
    ``hashtag_late(tag, cursor, window_s, not_before)``, hashtag posts that reached the server
    after a poll had passed their place (Mastodon, whose ids follow publish time); and
    ``edits_make_new_ids = True`` where an edit is a new post (X), so that a takedown naming a
    version the bot has no record of reads the post to find its first version (``Post.key``);
    ``idempotency_window_s`` where the server forgets an ``Idempotency-Key`` after a while
    (Mastodon: an hour), so that a retry later than that looks for the reply an earlier attempt
    may have posted (``bot/earlier_post.py``) with ``own_reply(in_reply_to_id, with_media)``,
    which also finds a copy an earlier run posted but could not record (both platforms)."""

    name: str
    #: whether the bot may answer posts of a watched hashtag, whose authors never asked it
    watches_hashtags: bool
    #: whether the stream carries every event the polls list; where not (both platforms today:
    #: filtered notifications, protected accounts), only the polls move a channel's cursor
    stream_complete: bool

    def me(self) -> Account: ...

    def prepare(self) -> None:
        """Called once when a listener starts: make sure every request can reach the bot (e.g. a
        server's notification filters). Must not fail for lack of a feature or permission."""
        ...

    def get_post(self, post_id: str) -> Post: ...

    def mentions_since(self, since_id: str | None) -> list[Event]:
        """Mention events newer than ``since_id``, oldest first (all pages)."""
        ...

    def hashtag_since(self, tag: str, since_id: str | None) -> list[Event]:
        """Public posts with ``tag`` newer than ``since_id``, oldest first (only where
        ``watches_hashtags``)."""
        ...

    def stream(self, channel: str) -> Iterator[Event | None]:
        """Live events of ``"mentions"`` or ``"tag:<name>"``, and ``None`` for heartbeats (if the
        platform has them); raises ``StreamUnavailable`` or ``PlatformError`` when streaming is
        refused, fails or drops."""
        ...

    def media_limits(self) -> MediaLimits:
        """The largest image an upload may be (each Mastodon server publishes its own): the
        copy is made to fit it instead of being refused after all the work."""
        ...

    def upload_image(self, data: bytes, mime: str, description: str) -> str: ...

    def reply(self, draft: ReplyDraft) -> Post: ...

    def delete_post(self, post_id: str) -> bool:
        """Delete one of the bot's posts; False when it is gone only from the bot's side (X DMs)."""
        ...

    def direct_message(self, to: Account, text: str, in_reply_to: Post | None = None, idempotency_key: str = "") -> Post: ...

    def post_id_from_reference(self, reference: str) -> str | None:
        """A post id from a URL or id in a message, if it names a post on this platform."""
        ...


def web_link(reference: str) -> ParseResult | None:
    """``reference`` parsed as an http(s) link, or None: text from a message ("http://[oops")
    may be no URL at all, and one bad link must not stop the others in the same message."""
    try:
        parsed = urlparse(reference)
        parsed.port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError:
        return None
    return parsed if parsed.scheme in ("http", "https") else None


def narrowest(*visibilities: Visibility) -> Visibility:
    """The most restrictive of the given visibilities."""
    return min(visibilities, key=VISIBILITIES.index)


def known_visibility(value: object) -> Visibility:
    """A server's visibility word as one of ours; anything unknown (Akkoma's ``local``, Pleroma's
    ``list``, a future one) counts as the narrowest, so it can never widen an audience."""
    return value if value in VISIBILITIES else "direct"  # type: ignore[return-value]
