"""The one interface every platform (Mastodon, X) implements, and the data it speaks in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Protocol

#: from the narrowest audience to the widest
VISIBILITIES = ("direct", "private", "unlisted", "public")
Visibility = Literal["direct", "private", "unlisted", "public"]


@dataclass(frozen=True)
class Account:
    id: str
    acct: str
    bot: bool = False
    note: str = ""
    #: protected/locked accounts (X protected, Mastodon locked)
    locked: bool = False


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
    url: str = ""
    uri: str = ""
    media: tuple[Media, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[Media, ...]:
        return tuple(m for m in self.media if m.type == "image")


@dataclass(frozen=True)
class Event:
    """Something the listener reacts to: a mention (or DM) of the bot, or a hashtag post."""

    kind: Literal["mention", "hashtag"]
    id: str  # notification id for mentions, status id for hashtag posts
    post: Post
    tag: str = ""


class PlatformError(Exception):
    """A platform call failed; ``retryable`` says whether trying later may help."""

    retryable = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(PlatformError):
    retryable = True

    def __init__(self, message: str, retry_after_s: float, status: int | None = 429) -> None:
        super().__init__(message, status)
        self.retry_after_s = retry_after_s


class ServerError(PlatformError):
    retryable = True


class NotFound(PlatformError):
    pass


class StreamUnavailable(PlatformError):
    """Streaming is refused or unsupported here; the listener falls back to polling."""


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
    """What the listener, the tasks and the takedown flow need from a social network."""

    name: str

    def me(self) -> Account: ...

    def get_post(self, post_id: str) -> Post: ...

    def mentions_since(self, since_id: str | None) -> list[Event]:
        """Mention events newer than ``since_id``, oldest first (all pages)."""
        ...

    def hashtag_since(self, tag: str, since_id: str | None) -> list[Event]:
        """Public posts with ``tag`` newer than ``since_id``, oldest first."""
        ...

    def stream(self, channel: str) -> Iterator[Event | None]:
        """Live events of ``"mentions"`` or ``"tag:<name>"``, and ``None`` for heartbeats (if the
        platform has them); raises ``StreamUnavailable`` or ``PlatformError`` when streaming is
        refused, fails or drops."""
        ...

    def upload_image(self, data: bytes, mime: str, description: str) -> str: ...

    def reply(self, draft: ReplyDraft) -> Post: ...

    def delete_post(self, post_id: str) -> None: ...

    def direct_message(self, to: Account, text: str, in_reply_to: Post | None = None, idempotency_key: str = "") -> Post: ...

    def post_id_from_reference(self, reference: str) -> str | None:
        """A post id from a URL or id in a message, if it names a post on this platform."""
        ...


def narrowest(*visibilities: Visibility) -> Visibility:
    """The most restrictive of the given visibilities."""
    return min(visibilities, key=VISIBILITIES.index)
