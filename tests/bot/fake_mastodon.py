"""A small local HTTP server shaped like the Mastodon API, for the bot's end-to-end tests.

It speaks plain HTTP/1.1 on 127.0.0.1 (a real socket, so the bot's ``requests`` sessions, the
Celery worker process and the listener thread all talk to it as they would to a real server) and
keeps its whole state in memory, where the tests set it up and inspect it:

* accounts, statuses (with their media), notifications, uploaded media (the exact bytes the bot
  uploaded), the statuses the bot posted, deleted ids and a log of every request;
* switches that make it misbehave the way real servers do: N x 429 (with ``X-RateLimit-Reset``
  a second or two ahead) or N x 503 on an endpoint, streaming refused (404/501) or dropped after
  N events, slow media downloads (held until released), oversized or endless media bodies,
  redirects, media processed asynchronously (202 then ``GET /api/v1/media/:id``);
* the ways servers publish themselves: streaming served from a second host (a second port
  here), as on mastodon.social, which the instance API names and the API host redirects to
  (``serve_streaming_apart``), and a server before Mastodon 4.0 with only the v1 instance API
  (``instance_api = "v1"``).

JSON shapes follow the Mastodon API documentation (Status, Account, MediaAttachment,
Notification, Tag, Mention entities; ids are strings; paging with ``max_id`` / ``since_id`` /
``min_id`` / ``limit``, newest first, with a ``Link`` header; ``Idempotency-Key`` on posting,
kept until ``forget_idempotency_keys`` (the server's hour passing); a status's ``context``;
``X-RateLimit-*`` headers on every API response; server-sent events with ``event:`` / ``data:``
lines and ``:thump`` heartbeats on the streaming endpoints, which want the user's token like
every streaming endpoint since Mastodon 4.2).
"""

from __future__ import annotations

import copy
import html
import io
import itertools
import json
import queue
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlparse

from PIL import Image

TOKEN = "test-access-token"
BOT_USERNAME = "ppbot"
#: what a real server answers when the text is too long
MAX_CHARS = 500
#: Mastodon counts every URL as 23 characters
URL_CHARS = 23
BLURHASH = "UEHLh[WB2yk8pyoJadR*.7kCMdnjS#M|%1%2"

_URL_RE = re.compile(r"https?://[^\s<>\"']+")
_MENTION_RE = re.compile(r"(?<![\w/@])@([A-Za-z0-9_]+)(?:@([A-Za-z0-9.\-]+[A-Za-z0-9]))?")
_TAG_RE = re.compile(r"(?<![\w/&#])#(\w+)")


def iso(ts: float) -> str:
    """ISO 8601 with milliseconds and ``Z``, as Mastodon writes every datetime."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def _id_key(value: str) -> tuple[int, str]:
    return (len(value), value)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """``predicate()``'s first truthy value; ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Injection:
    """Answer the next ``times`` requests matching ``method`` + ``path`` (a regex) with ``status``
    (0: answer normally, but with the rate-limit budget spent until ``reset_in_s`` from now)."""

    method: str
    path: str
    status: int
    times: int
    reset_in_s: float = 1.5
    hits: list[float] = field(default_factory=list)

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and re.fullmatch(self.path, path) is not None


@dataclass
class MediaFile:
    """A file served under ``/media/``. ``declared_length`` sends a larger Content-Length (and
    that many bytes), ``endless`` streams chunks forever, ``trickle_s`` sends ``data`` one byte
    per that many seconds (a slow or hostile server), ``redirect_to`` answers 302."""

    data: bytes = b""
    content_type: str = "image/jpeg"
    declared_length: int | None = None
    endless: bool = False
    trickle_s: float | None = None
    redirect_to: str | None = None
    hold: bool = True  # obey the global media gate


@dataclass
class Request:
    time: float
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0
    #: which of the fake's hosts answered: "api", or "streaming" (see ``serve_streaming_apart``)
    server: str = "api"


class _Subscriber:
    def __init__(self, kind: str, tag: str = "") -> None:
        self.kind = kind  # "notification" or "hashtag"
        self.tag = tag
        self.queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.sent = 0


class FakeMastodon:
    """State and switches of the fake server; ``start()`` / ``stop()`` run it in threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        #: the streaming API's own host, used once ``serve_streaming_apart`` is called
        self.streaming_server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.streaming_server.daemon_threads = True
        self.streaming_server.fake = self  # type: ignore[attr-defined]
        self.streaming_url = f"http://127.0.0.1:{self.streaming_server.server_address[1]}"
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.media_gate = threading.Event()
        self.post_gate = threading.Event()
        #: every media file URL this server ever handed out (kept across resets, for log scans)
        self.all_file_urls: list[str] = []
        self.reset()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "FakeMastodon":
        for name, server in (("fake-mastodon", self.server), ("fake-mastodon-streaming", self.streaming_server)):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.media_gate.set()
        self.post_gate.set()
        self.drop_streams()
        for server in (self.server, self.streaming_server):
            server.shutdown()
            server.server_close()

    def reset(self) -> None:
        """Forget everything (between tests); the port stays the same."""
        with self.lock:
            self._ids = itertools.count(1)
            self._last_id = 0
            self._notification_ids = itertools.count(1)
            self.accounts: dict[str, dict[str, Any]] = {}
            self.statuses: dict[str, dict[str, Any]] = {}
            self.notifications: list[dict[str, Any]] = []
            self.filtered: set[str] = set()  # ids of the notifications the policy filtered
            self.media_files: dict[str, MediaFile] = {}
            self.attachments: dict[str, dict[str, Any]] = {}
            self.uploads: dict[str, dict[str, Any]] = {}
            self.posted: list[dict[str, Any]] = []
            self.source_texts: dict[str, str] = {}
            self.deleted: list[str] = []
            self.delete_attempts: list[str] = []
            self.requests: list[Request] = []
            self.idempotency: dict[tuple[str, str], str] = {}
            self.injections: list[Injection] = []
            self.followers: dict[str, set[str]] = {}
            #: links under which other servers show a status (see :meth:`seen_from`)
            self.remote_links: dict[str, str] = {}
            #: Mastodon 4.3+'s notification policy of the bot's account, with its defaults
            self.notification_policy = {"for_not_following": "accept", "for_not_followers": "accept",
                                        "for_new_accounts": "accept", "for_private_mentions": "filter",
                                        "for_limited_accounts": "filter"}
            #: ``configuration`` of ``GET /api/v2/instance``, as mastodon.social publishes it; tests
            #: change it to play a server with other limits (which uploads and statuses obey)
            self.configuration: dict[str, Any] = {
                "urls": {"streaming": self.base_url.replace("http", "ws", 1)},
                "accounts": {"max_featured_tags": 10, "max_pinned_statuses": 5},
                "statuses": {"max_characters": MAX_CHARS, "max_media_attachments": 4, "characters_reserved_per_url": URL_CHARS},
                "media_attachments": {
                    "supported_mime_types": ["image/jpeg", "image/png", "image/gif", "image/heic", "image/heif",
                                             "image/webp", "image/avif", "video/mp4"],
                    "description_limit": 1500, "image_size_limit": 16 * 1024 * 1024, "image_matrix_limit": 33_177_600,
                    "video_size_limit": 103_809_024, "video_frame_rate_limit": 120, "video_matrix_limit": 8_294_400,
                },
                "polls": {"max_options": 4, "max_characters_per_option": 50, "min_expiration": 300, "max_expiration": 2_629_746},
                "translation": {"enabled": False},
            }
            # switches
            #: "v1": a server before Mastodon 4.0, whose instance API has no v2 (404)
            self.instance_api = "v2"
            #: streaming is served by ``streaming_url`` only (see ``serve_streaming_apart``)
            self.streaming_apart = False
            self.stream_refuse: int | None = None  # 404 or 501: streaming endpoints refused
            self.stream_drop_after: int | None = None  # close each stream after N events
            self.stream_heartbeat_s = 0.5
            self.before_subscribe: list[Callable[[], None]] = []
            self.media_async = False
            self.rate_limit = 300
            self.rate_window_s = 300.0
            self._rate_window_start = time.time()
            self._rate_count = 0
            self._processing_polls: dict[str, int] = {}
            if hasattr(self, "_subscribers"):
                self.drop_streams()
            self._subscribers: list[_Subscriber] = []
            self.stream_connections: list[tuple[str, float]] = []
            self.media_gate.set()
            self.post_gate.set()
            self.bot = self.add_account(BOT_USERNAME, display_name="Protest privacy bot", bot=True,
                                        note="I cover every head in protest photos with a raised fist. Mention me under a post with photos.")

    def serve_streaming_apart(self) -> None:
        """Serve the streaming API from its own host, as mastodon.social does
        (streaming.mastodon.social): the instance API publishes it as ``urls.streaming``, and the
        API host answers every ``/api/v1/streaming`` path with a 301 there
        (``Api::V1::StreamingController``), so a client that follows the redirect arrives
        without its token."""
        with self.lock:
            self.streaming_apart = True
            self.configuration["urls"]["streaming"] = self.streaming_url.replace("http", "ws", 1)

    # -- ids and accounts ---------------------------------------------------------------------

    def _next_status_id(self, at: float | None = None) -> str:
        """A snowflake as Mastodon makes them: milliseconds since 1970 above 16 bits of
        sequence. Made now they only grow; ``at`` (a time in the past) backdates one, as the
        server does for a status from another server, dated by its publish time
        (``Mastodon::Snowflake``'s callback on create)."""
        sequence = next(self._ids) & 0xFFFF
        if at is not None:
            return str((int(at * 1000) << 16) | sequence)
        self._last_id = max(self._last_id + 1, (int(time.time() * 1000) << 16) | sequence)
        return str(self._last_id)

    def add_account(self, username: str, *, domain: str | None = None, display_name: str = "", bot: bool = False,
                    locked: bool = False, note: str = "", fields: list[tuple[str, str]] | tuple = ()) -> dict[str, Any]:
        """A local account (``domain=None``) or a remote one (``acct`` is ``user@domain``);
        ``fields`` are its profile metadata, (name, value) in plain text: the name stays plain
        text, the value is rendered as HTML, with links and hashtags, as Mastodon does."""
        with self.lock:
            account_id = str(109_000_000_000_000_000 + len(self.accounts) + 1)
            acct = username if domain is None else f"{username}@{domain}"
            url = f"{self.base_url}/@{username}" if domain is None else f"https://{domain}/@{username}"
            note_html = "<p>" + self._render_inline(note)[0] + "</p>" if note else ""
            created = iso(time.time() - 86400 * 30)
            account = {
                "id": account_id,
                "username": username,
                "acct": acct,
                "display_name": display_name or username.title(),
                "locked": locked,
                "bot": bot,
                "discoverable": True,
                "group": False,
                "created_at": created,
                "note": note_html,
                "url": url,
                "uri": url.replace("/@", "/users/"),
                "avatar": f"{self.base_url}/avatars/original/missing.png",
                "avatar_static": f"{self.base_url}/avatars/original/missing.png",
                "header": f"{self.base_url}/headers/original/missing.png",
                "header_static": f"{self.base_url}/headers/original/missing.png",
                "followers_count": 0,
                "following_count": 0,
                "statuses_count": 0,
                "last_status_at": None,
                "emojis": [],
                "fields": [{"name": name, "value": self._render_inline(value)[0], "verified_at": None} for name, value in fields],
            }
            self.accounts[account_id] = account
            self.followers[account_id] = set()
            return account

    def follow(self, follower: dict[str, Any], followed: dict[str, Any]) -> None:
        """``follower`` may now see ``followed``'s followers-only posts."""
        with self.lock:
            self.followers[followed["id"]].add(follower["id"])

    def _account_by_acct(self, username: str, domain: str | None) -> dict[str, Any] | None:
        for account in self.accounts.values():
            if account["username"].lower() != username.lower():
                continue
            own_domain = account["acct"].split("@", 1)[1] if "@" in account["acct"] else None
            if (domain.lower() if domain else None) == (own_domain.lower() if own_domain else None) or (own_domain is None and domain == "127.0.0.1"):
                return account
        return None

    # -- content ------------------------------------------------------------------------------

    def _render_inline(self, text: str) -> tuple[str, list[dict[str, Any]], list[str]]:
        """One paragraph of plain text as Mastodon's HTML; also the mentioned accounts and tags."""
        out: list[str] = []
        mentions: list[dict[str, Any]] = []
        tags: list[str] = []
        pattern = re.compile(f"(?P<url>{_URL_RE.pattern})|(?P<mention>{_MENTION_RE.pattern})|(?P<tag>{_TAG_RE.pattern})")
        pos = 0
        for match in pattern.finditer(text):
            out.append(html.escape(text[pos:match.start()], quote=False))
            pos = match.end()
            token = match.group(0)
            if match.group("url"):
                url = token.rstrip(".,;:!?)")
                pos -= len(token) - len(url)
                scheme, rest = url.split("://", 1)
                prefix = scheme + "://"
                if rest.startswith("www."):
                    prefix, rest = prefix + "www.", rest[4:]
                visible, hidden = rest[:30], rest[30:]
                out.append(
                    f'<a href="{html.escape(url)}" target="_blank" rel="nofollow noopener" translate="no">'
                    f'<span class="invisible">{html.escape(prefix)}</span>'
                    f'<span class="{"ellipsis" if hidden else ""}">{html.escape(visible)}</span>'
                    f'<span class="invisible">{html.escape(hidden)}</span></a>'
                )
            elif match.group("mention"):
                username, domain = match.group(3), match.group(4)
                account = self._account_by_acct(username, domain)
                if account is None:
                    out.append(html.escape(token))
                    continue
                if account not in mentions:
                    mentions.append(account)
                out.append(
                    f'<span class="h-card" translate="no"><a href="{account["url"]}" class="u-url mention">'
                    f'@<span>{html.escape(account["username"])}</span></a></span>'
                )
            else:
                tag = match.group(6)
                tags.append(tag.lower())
                out.append(f'<a href="{self.base_url}/tags/{tag.lower()}" class="mention hashtag" rel="tag">#<span>{html.escape(tag)}</span></a>')
        out.append(html.escape(text[pos:], quote=False))
        return "".join(out), mentions, tags

    def render(self, text: str) -> tuple[str, list[dict[str, Any]], list[str]]:
        """Plain text to Mastodon HTML: paragraphs on blank lines, ``<br />`` on line breaks."""
        paragraphs, mentions, tags = [], [], []
        for block in re.split(r"\n\s*\n", text.strip()) if text.strip() else []:
            lines = []
            for line in block.split("\n"):
                rendered, found, found_tags = self._render_inline(line)
                lines.append(rendered)
                mentions += [m for m in found if m not in mentions]
                tags += [t for t in found_tags if t not in tags]
            paragraphs.append("<p>" + "<br />".join(lines) + "</p>")
        return "".join(paragraphs), mentions, tags

    @staticmethod
    def count_chars(text: str) -> int:
        """Characters as Mastodon counts them: URLs 23, ``@user@domain`` as ``@user``."""
        counted = _URL_RE.sub("x" * URL_CHARS, text)
        counted = _MENTION_RE.sub(lambda m: "@" + m.group(1), counted)
        return len(counted)

    # -- media ---------------------------------------------------------------------------------

    def add_file(self, data: bytes = b"", content_type: str = "image/jpeg", ext: str = "jpg", **options: Any) -> str:
        """Serve ``data`` at a fresh unguessable URL under ``/media/``; returns the URL."""
        token = secrets.token_hex(12)
        path = f"/media/files/{token}.{ext}"
        with self.lock:
            self.media_files[path] = MediaFile(data=data, content_type=content_type, **options)
            self.all_file_urls.append(self.base_url + path)
        return self.base_url + path

    def media(self, data: bytes, content_type: str = "image/jpeg", *, description: str | None = None,
              kind: str = "image", remote: bool = False, **options: Any) -> dict[str, Any]:
        """A MediaAttachment whose file is ``data`` (served by this server)."""
        ext = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "video/mp4": "mp4"}.get(content_type, "bin")
        url = self.add_file(data, content_type, ext, **options)
        with self.lock:
            media_id = self._next_status_id()
            attachment = self._attachment(media_id, kind, url, data, description)
            if remote:
                attachment["remote_url"] = url
            self.attachments[media_id] = attachment
            return attachment

    def _attachment(self, media_id: str, kind: str, url: str | None, data: bytes, description: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        try:
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
            meta = {
                "original": {"width": w, "height": h, "size": f"{w}x{h}", "aspect": round(w / h, 6)},
                "small": {"width": min(w, 640), "height": round(min(w, 640) * h / w), "size": "small", "aspect": round(w / h, 6)},
            }
        except Exception:
            pass
        return {
            "id": media_id,
            "type": kind,
            "url": url,
            "preview_url": url,
            "remote_url": None,
            "preview_remote_url": None,
            "text_url": None,
            "meta": meta,
            "description": description,
            "blurhash": BLURHASH if meta else None,
        }

    def hold_media(self) -> None:
        """From now on, media downloads wait (until ``release_media``)."""
        self.media_gate.clear()

    def release_media(self) -> None:
        self.media_gate.set()

    def hold_posts(self) -> None:
        """From now on, ``POST /api/v1/statuses`` creates the status but holds the answer."""
        self.post_gate.clear()

    def release_posts(self) -> None:
        self.post_gate.set()

    def forget_idempotency_keys(self) -> None:
        """The hour Mastodon keeps an ``Idempotency-Key`` has passed: a repeat posts again."""
        with self.lock:
            self.idempotency.clear()

    def media_requests(self) -> list[Request]:
        return [r for r in self.log() if r.path.startswith("/media/")]

    # -- statuses -------------------------------------------------------------------------------

    def post(self, author: dict[str, Any], text: str, *, media: list[dict[str, Any]] | tuple = (), visibility: str = "public",
             in_reply_to: dict[str, Any] | None = None, sensitive: bool = False, spoiler_text: str = "",
             notify: bool = True, published: float | None = None, odd: dict[str, Any] | None = None) -> dict[str, Any]:
        """A status by ``author`` as the server would store it. Mentions of the bot in ``text``
        create a ``mention`` notification (pushed to live streams), public posts with tags are
        pushed to hashtag streams. ``published``: a remote status that reaches this server only
        now, published at that (earlier) time; its id and ``created_at`` are from then.
        ``odd``: fields its notification lists and streams in place of the status's own, as a
        server that does not quite follow Mastodon's API would (no author, null lists); the
        status itself stays as stored."""
        if published is not None and "@" not in author["acct"]:
            raise ValueError("only a status from another server arrives after it was published")
        with self.lock:
            if in_reply_to is not None and "@" not in author["acct"] and not self.visible_to(author, in_reply_to):
                # Mastodon's StatusesController authorises the thread: a local account cannot
                # reply to a post it may not see (404). Other servers' replies arrive regardless.
                raise ValueError(f"{author['acct']} may not see the post it replies to")
            status = self._make_status(author, text, list(media), visibility, in_reply_to["id"] if in_reply_to else None,
                                       sensitive or bool(spoiler_text), spoiler_text, published)
            if notify:
                self._deliver(status, odd)
            return status

    def _make_status(self, author: dict[str, Any], text: str, media: list[dict[str, Any]], visibility: str,
                     in_reply_to_id: str | None, sensitive: bool, spoiler_text: str,
                     published: float | None = None) -> dict[str, Any]:
        status_id = self._next_status_id(published)
        content, mentioned, tags = self.render(text)
        remote_domain = author["acct"].split("@", 1)[1] if "@" in author["acct"] else None
        if remote_domain:
            remote_id = str(int(status_id) // 1000)
            url = f"https://{remote_domain}/@{author['username']}/{remote_id}"
            uri = f"https://{remote_domain}/users/{author['username']}/statuses/{remote_id}"
        else:
            url = f"{self.base_url}/@{author['username']}/{status_id}"
            uri = f"{self.base_url}/users/{author['username']}/statuses/{status_id}"
        parent = self.statuses.get(in_reply_to_id) if in_reply_to_id else None
        now = time.time() if published is None else published
        status = {
            "id": status_id,
            "uri": uri,
            "url": url,
            "created_at": iso(now),
            "account": author,
            "content": content,
            "visibility": visibility,
            "sensitive": sensitive,
            "spoiler_text": spoiler_text,
            "media_attachments": media,
            "application": None,
            "mentions": [{"id": a["id"], "username": a["username"], "url": a["url"], "acct": a["acct"]} for a in mentioned],
            "tags": [{"name": t, "url": f"{self.base_url}/tags/{t}"} for t in tags],
            "emojis": [],
            "reblogs_count": 0,
            "favourites_count": 0,
            "replies_count": 0,
            "in_reply_to_id": in_reply_to_id,
            "in_reply_to_account_id": parent["account"]["id"] if parent else None,
            "reblog": None,
            "poll": None,
            "card": None,
            "language": "en",
            "edited_at": None,
            "favourited": False,
            "reblogged": False,
            "muted": False,
            "bookmarked": False,
            "pinned": False,
        }
        if parent:
            parent["replies_count"] += 1
        author["statuses_count"] += 1
        author["last_status_at"] = iso(now)[:10]
        self.statuses[status_id] = status
        return status

    def _filtered(self, status: dict[str, Any]) -> bool:
        """Mastodon 4.3+ (``NotifyService``): with ``for_private_mentions: filter`` (the default), a
        direct message from an account the bot does not follow is filtered unless it answers a
        thread in which the bot mentioned its sender. Filtered notifications are neither
        streamed nor listed without ``include_filtered``."""
        sender = status["account"]["id"]
        if self.notification_policy["for_private_mentions"] != "filter" or status["visibility"] != "direct":
            return False
        if self.bot["id"] in self.followers.get(sender, set()):
            return False
        parent = self.statuses.get(status["in_reply_to_id"] or "")
        for _ in range(100):
            if parent is None:
                return True
            if parent["account"]["id"] == self.bot["id"] and any(m["id"] == sender for m in parent["mentions"]):
                return False
            parent = self.statuses.get(parent["in_reply_to_id"] or "")
        return True

    def _deliver(self, status: dict[str, Any], odd: dict[str, Any] | None = None) -> None:
        author = status["account"]
        if author["id"] != self.bot["id"] and any(m["id"] == self.bot["id"] for m in status["mentions"]):
            notification = {
                "id": str(next(self._notification_ids) + 40_000),
                "type": "mention",
                "group_key": f"ungrouped-{len(self.notifications) + 1}",
                "created_at": status["created_at"],
                "account": author,
                "status": dict(status, **odd) if odd else status,
            }
            self.notifications.append(notification)
            if self._filtered(status):
                self.filtered.add(notification["id"])
            else:
                self._push("notification", "", "notification", notification)
        if status["visibility"] == "public":
            for tag in status["tags"]:
                self._push("hashtag", tag["name"], "update", status)

    def mention(self, author: dict[str, Any], text: str = "", **kwargs: Any) -> dict[str, Any]:
        """A status by ``author`` that mentions the bot (``@ppbot`` is prepended if missing)."""
        if not re.search(rf"(?<![\w/@])@{BOT_USERNAME}\b", text):
            text = f"@{BOT_USERNAME} {text}".strip()
        return self.post(author, text, **kwargs)

    def set_quote(self, status: dict[str, Any], quoted: dict[str, Any], state: str = "accepted") -> None:
        """Make ``status`` quote ``quoted`` (Mastodon 4.5's Quote entity). The quoted post is shown
        only once the quote is ``accepted``; before (``pending``, awaiting its author's server)
        or after (``rejected``, ``revoked``, ``deleted``, ...) ``quoted_status`` is null."""
        with self.lock:
            status["quote"] = {"state": state, "quoted_status": quoted if state == "accepted" else None}

    def status(self, status_id: str) -> dict[str, Any]:
        with self.lock:
            return self.statuses[status_id]

    def bot_posts(self, include_deleted: bool = True) -> list[dict[str, Any]]:
        """Statuses the bot posted through the API, oldest first."""
        with self.lock:
            return [s for s in self.posted if include_deleted or s["id"] not in self.deleted]

    def replies_to(self, status_id: str) -> list[dict[str, Any]]:
        return [s for s in self.bot_posts() if s["in_reply_to_id"] == status_id]

    def upload_of(self, attachment: dict[str, Any]) -> bytes:
        """The exact bytes the bot uploaded for a media attachment of one of its statuses."""
        with self.lock:
            return self.uploads[attachment["id"]]["data"]

    def log(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
        """:func:`wait_until`, reading the server's state under its lock."""

        def locked() -> Any:
            with self.lock:
                return predicate()

        return wait_until(locked, timeout, what, interval)

    def wait_for_posts(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until the bot has posted at least ``count`` statuses; returns them."""
        self.wait_for(lambda: len(self.posted) >= count, timeout, what=f"{count} post(s) by the bot (have {len(self.posted)})")
        return self.bot_posts()

    # -- failure injection --------------------------------------------------------------------

    def fail(self, method: str, path: str, status: int, times: int = 1, reset_in_s: float = 1.5) -> Injection:
        """Answer the next ``times`` ``method`` requests whose path fully matches the regex ``path``
        with ``status`` (429 carries ``X-RateLimit-Remaining: 0`` and a reset ``reset_in_s`` ahead)."""
        injection = Injection(method, path, status, times, reset_in_s)
        with self.lock:
            self.injections.append(injection)
        return injection

    def exhaust(self, method: str, path: str, reset_in_s: float = 2.0) -> Injection:
        """Answer the next matching request normally, but with ``X-RateLimit-Remaining: 0`` and
        a reset ``reset_in_s`` ahead (the budget is spent; a polite client now waits)."""
        return self.fail(method, path, 0, 1, reset_in_s)

    # -- streaming ------------------------------------------------------------------------------

    def _push(self, kind: str, tag: str, event: str, payload: dict[str, Any]) -> None:
        # Mastodon's payloads are Rails' JSON, passed on as they are: UTF-8 text, not \u escapes
        # (under a Content-Type that names no charset)
        data = json.dumps(payload, ensure_ascii=False)
        for subscriber in list(self._subscribers):
            if subscriber.kind == kind and (kind != "hashtag" or subscriber.tag == tag):
                subscriber.queue.put((event, data))

    def drop_streams(self) -> None:
        """Close every open streaming connection now (abruptly, as a dropped connection)."""
        with self.lock:
            for subscriber in self._subscribers:
                subscriber.queue.put(None)

    def subscribers(self, kind: str | None = None) -> int:
        with self.lock:
            return sum(1 for s in self._subscribers if kind is None or s.kind == kind)

    def wait_streaming(self, kind: str = "notification", count: int = 1, timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.subscribers(kind) >= count, timeout, what=f"{count} {kind} stream(s)")

    # -- HTTP plumbing helpers ----------------------------------------------------------------------

    def _rate_headers(self, blocked_for: float | None = None) -> dict[str, str]:
        now = time.time()
        if now - self._rate_window_start > self.rate_window_s:
            self._rate_window_start, self._rate_count = now, 0
        self._rate_count += 1
        if blocked_for is not None:
            return {"X-RateLimit-Limit": str(self.rate_limit), "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": iso(now + blocked_for)}
        remaining = max(1, self.rate_limit - self._rate_count)  # the fake never runs dry by itself
        return {
            "X-RateLimit-Limit": str(self.rate_limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": iso(self._rate_window_start + self.rate_window_s),
        }

    def visible_to(self, account: dict[str, Any], status: dict[str, Any]) -> bool:
        if status["id"] in self.deleted:
            return False
        if status["visibility"] in ("public", "unlisted"):
            return True
        if status["visibility"] == "local":  # Akkoma's: every account of this server
            return "@" not in account["acct"]
        if status["account"]["id"] == account["id"] or any(m["id"] == account["id"] for m in status["mentions"]):
            return True
        return status["visibility"] == "private" and account["id"] in self.followers.get(status["account"]["id"], set())

    def visible_to_bot(self, status: dict[str, Any]) -> bool:
        return self.visible_to(self.bot, status)

    def seen_from(self, status: dict[str, Any], server: str) -> str:
        """The link to ``status`` on another server's web page (``/@user@host/<that server's
        id>``), the one a person there copies; searching it with ``resolve`` finds the status,
        as Mastodon does by fetching that page."""
        host = self.base_url.split("://", 1)[1]
        acct = status["account"]["acct"]
        link = f"https://{server}/@{acct if '@' in acct else acct + '@' + host}/{int(status['id']) * 7 + 3}"
        with self.lock:
            self.remote_links[link] = status["id"]
        return link


def _page(items: list[dict[str, Any]], query: dict[str, list[str]], default_limit: int, max_limit: int) -> list[dict[str, Any]]:
    """Mastodon's id paging over ``items`` (any order): newest first; ``max_id`` older than,
    ``since_id`` newest newer than, ``min_id`` the page immediately newer than."""

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values and values[0] else None

    try:
        limit = min(max(int(one("limit") or default_limit), 1), max_limit)
    except ValueError:
        limit = default_limit
    ordered = sorted(items, key=lambda item: _id_key(item["id"]), reverse=True)
    if one("max_id"):
        ordered = [i for i in ordered if _id_key(i["id"]) < _id_key(one("max_id"))]  # type: ignore[arg-type]
    if one("since_id"):
        ordered = [i for i in ordered if _id_key(i["id"]) > _id_key(one("since_id"))]  # type: ignore[arg-type]
    if one("min_id"):
        newer = [i for i in ordered if _id_key(i["id"]) > _id_key(one("min_id"))]  # type: ignore[arg-type]
        return list(reversed(list(reversed(newer))[:limit]))
    return ordered[:limit]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Mastodon"
    sys_version = ""

    @property
    def fake(self) -> FakeMastodon:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    # -- plumbing -----------------------------------------------------------------------------

    def _body(self) -> bytes:
        """The request body, read once (before the fake's lock is taken)."""
        if not hasattr(self, "_raw_body"):
            length = int(self.headers.get("Content-Length") or 0)
            self._raw_body = self.rfile.read(length) if length else b""
        return self._raw_body

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record.status = status

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": message}, headers)

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        header = self.headers.get("Authorization", "")
        return header == f"Bearer {TOKEN}" or query.get("access_token") == [TOKEN]

    def _dispatch(self) -> None:
        parsed = urlparse(self.path)
        path, query = parsed.path, parse_qs(parsed.query, keep_blank_values=True)
        fake = self.fake
        if hasattr(self, "_raw_body"):
            del self._raw_body  # keep-alive: one handler object serves many requests
        self._body()
        on_streaming_host = self.server is fake.streaming_server
        self._record = Request(time.time(), self.command, path, query,
                               {k: v for k, v in self.headers.items() if k.lower() in ("idempotency-key", "content-type", "accept", "user-agent", "host")},
                               server="streaming" if on_streaming_host else "api")
        with fake.lock:
            fake.requests.append(self._record)
        if on_streaming_host and not (fake.streaming_apart and path.startswith("/api/v1/streaming")):
            return self._error(404, "Not found")  # the streaming server serves nothing else
        if path.startswith("/media/"):
            return self._media(path)
        if not path.startswith("/api/"):
            return self._error(404, "Record not found")
        with fake.lock:
            injection = next((i for i in fake.injections if i.matches(self.command, path)), None)
            if injection:
                injection.times -= 1
                injection.hits.append(time.time())
        exhausted = injection is not None and injection.status == 0
        if injection and not exhausted:
            with fake.lock:
                headers = fake._rate_headers(blocked_for=injection.reset_in_s if injection.status == 429 else None)
            if injection.status == 429:
                return self._error(429, "Too many requests", headers)
            return self._send(injection.status, raw=f"<html><body><h1>{injection.status}</h1></body></html>".encode(),
                              headers=headers, content_type="text/html")
        if path.startswith("/api/v1/streaming"):
            return self._stream(path, query)
        if not self._authorised(query):
            return self._error(401, "The access token is invalid")
        with fake.lock:
            headers = fake._rate_headers(blocked_for=injection.reset_in_s if exhausted else None)  # type: ignore[union-attr]
            routes: list[tuple[str, str, Callable[..., tuple[int, Any] | tuple[int, Any, dict[str, str]]]]] = [
                ("GET", r"/api/v1/accounts/verify_credentials", self._verify_credentials),
                ("GET", r"/api/v1/statuses/(\d+)", self._get_status),
                ("GET", r"/api/v1/statuses/(\d+)/context", self._context),
                ("DELETE", r"/api/v1/statuses/(\d+)", self._delete_status),
                ("POST", r"/api/v1/statuses", self._post_status),
                ("GET", r"/api/v1/notifications", self._notifications),
                ("GET", r"/api/v1/timelines/tag/([^/]+)", self._tag_timeline),
                ("POST", r"/api/v2/media", self._upload),
                ("GET", r"/api/v1/media/(\d+)", self._get_media),
                ("GET", r"/api/v2/search", self._search),
                ("GET", r"/api/v2/instance", self._instance),
                ("GET", r"/api/v1/instance", self._instance_v1),
                ("PATCH", r"/api/v2/notifications/policy", self._update_policy),
            ]
            for method, pattern, route in routes:
                match = re.fullmatch(pattern, path)
                if match and method == self.command:
                    result = route(query, *match.groups())
                    break
            else:
                result = (404, {"error": "Record not found"})
            status, payload, *extra = result
            body = json.dumps(payload).encode()  # under the lock: the state may change meanwhile
        if self.command == "POST" and path == "/api/v1/statuses" and not fake.post_gate.is_set():
            # The status exists now, but its answer is held (the client may die waiting for it).
            fake.post_gate.wait(timeout=120)
        try:
            self._send(status, raw=body, headers=headers | (extra[0] if extra else {}))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    # -- REST endpoints (called with the fake's lock held) ----------------------------------------

    def _instance(self, query: Any) -> tuple[int, Any]:
        fake = self.fake
        if fake.instance_api == "v1":
            return 404, {"error": "Record not found"}
        return 200, {"domain": urlparse(fake.base_url).netloc, "title": "Fake Mastodon", "version": "4.3.0",
                     "source_url": "https://github.com/mastodon/mastodon", "description": "",
                     "usage": {"users": {"active_month": len(fake.accounts)}},
                     "configuration": copy.deepcopy(fake.configuration),
                     "registrations": {"enabled": False, "approval_required": False, "message": None},
                     "contact": {"email": "", "account": None}, "rules": []}

    def _instance_v1(self, query: Any) -> tuple[int, Any]:
        """``GET /api/v1/instance`` (V1::Instance): the streaming URL beside the configuration,
        as ``urls.streaming_api``, and no ``urls`` inside the configuration."""
        fake = self.fake
        configuration = {k: copy.deepcopy(v) for k, v in fake.configuration.items() if k != "urls"}
        return 200, {"uri": urlparse(fake.base_url).netloc, "title": "Fake Mastodon", "version": "3.5.3",
                     "short_description": "", "description": "", "email": "",
                     "urls": {"streaming_api": fake.configuration["urls"]["streaming"]},
                     "stats": {"user_count": len(fake.accounts), "status_count": len(fake.statuses), "domain_count": 1},
                     "thumbnail": None, "languages": ["en"], "registrations": False, "approval_required": False,
                     "invites_enabled": False, "configuration": configuration, "contact_account": None, "rules": []}

    def _update_policy(self, query: Any) -> tuple[int, Any]:
        params = self._params()
        policy = self.fake.notification_policy
        for key, value in params.items():
            if key in policy:
                if value not in ("accept", "filter", "drop"):
                    return 422, {"error": f"Validation failed: {key} is not included in the list"}
                policy[key] = value
        return 200, dict(policy, summary={"pending_requests_count": 0, "pending_notifications_count": 0})

    def _verify_credentials(self, query: Any) -> tuple[int, Any]:
        bot = dict(self.fake.bot)
        bot["source"] = {"privacy": "public", "sensitive": False, "language": "en", "note": "", "fields": [], "follow_requests_count": 0}
        return 200, bot

    def _get_status(self, query: Any, status_id: str) -> tuple[int, Any]:
        status = self.fake.statuses.get(status_id)
        if status is None or not self.fake.visible_to_bot(status):
            return 404, {"error": "Record not found"}
        return 200, status

    def _context(self, query: Any, status_id: str) -> tuple[int, Any]:
        """``GET /api/v1/statuses/:id/context``: the Context entity, ``ancestors`` (oldest first)
        and ``descendants`` (the thread below, depth first), each only what the token's account
        may see."""
        fake = self.fake
        status = fake.statuses.get(status_id)
        if status is None or not fake.visible_to_bot(status):
            return 404, {"error": "Record not found"}
        ancestors = []
        parent = fake.statuses.get(str(status.get("in_reply_to_id")))
        while parent is not None:
            if fake.visible_to_bot(parent):
                ancestors.insert(0, parent)
            parent = fake.statuses.get(str(parent.get("in_reply_to_id")))
        children: dict[str, list[dict[str, Any]]] = {}
        for candidate in sorted(fake.statuses.values(), key=lambda s: int(s["id"])):
            if candidate.get("in_reply_to_id") is not None:
                children.setdefault(str(candidate["in_reply_to_id"]), []).append(candidate)
        descendants: list[dict[str, Any]] = []

        def below(parent_id: str) -> None:
            for child in children.get(parent_id, []):
                if fake.visible_to_bot(child):
                    descendants.append(child)
                below(child["id"])  # what the bot may see below a post it may not, it sees

        below(status_id)
        return 200, {"ancestors": ancestors, "descendants": descendants}

    def _delete_status(self, query: Any, status_id: str) -> tuple[int, Any]:
        fake = self.fake
        fake.delete_attempts.append(status_id)
        status = fake.statuses.get(status_id)
        # Mastodon looks the status up among the token owner's own statuses only.
        if status is None or status_id in fake.deleted or status["account"]["id"] != fake.bot["id"]:
            return 404, {"error": "Record not found"}
        fake.deleted.append(status_id)
        # Mastodon 4.4+: without delete_media the attachments stay, still served at their URLs,
        # for about 24 hours so that a redraft can re-use them; with it they go at once.
        if self._truthy((query.get("delete_media") or [""])[-1]):
            for attachment in status["media_attachments"]:
                for key in ("url", "preview_url"):
                    fake.media_files.pop(urlparse(attachment.get(key) or "").path, None)
        return 200, dict(status, text=fake.source_texts.get(status_id, ""))

    def _params(self) -> dict[str, Any]:
        body = self._body()
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            return json.loads(body or b"{}")
        form = parse_qs(body.decode(), keep_blank_values=True)
        params: dict[str, Any] = {}
        for key, values in form.items():
            if key.endswith("[]"):
                params[key[:-2]] = values
            else:
                params[key] = values[-1]
        return params

    @staticmethod
    def _truthy(value: Any) -> bool:
        return value is True or (isinstance(value, str) and value.lower() in ("true", "1", "on"))

    def _post_status(self, query: Any) -> tuple[int, Any]:
        fake = self.fake
        params = self._params()
        key = self.headers.get("Idempotency-Key")
        if key and (TOKEN, key) in fake.idempotency:
            return 200, fake.statuses[fake.idempotency[(TOKEN, key)]]
        text = str(params.get("status") or "")
        media_ids = [str(m) for m in params.get("media_ids") or []]
        if not text.strip() and not media_ids:
            return 422, {"error": "Validation failed: Text can't be blank"}
        # The server counts the content warning and the text together against its limit.
        max_chars = fake.configuration["statuses"]["max_characters"]
        if fake.count_chars(text) + len(str(params.get("spoiler_text") or "")) > max_chars:
            return 422, {"error": f"Validation failed: Text character limit of {max_chars} exceeded"}
        if len(media_ids) > 4:
            return 422, {"error": "Validation failed: Cannot attach more than 4 files"}
        media = []
        for media_id in media_ids:
            upload = fake.uploads.get(media_id)
            if upload is None or upload["status_id"] is not None:
                continue  # Mastodon silently ignores media that are not the caller's unattached uploads
            if upload["attachment"]["url"] is None:
                return 422, {"error": "Cannot attach files that have not finished processing. Try again in a moment!"}
            media.append(upload["attachment"])
        in_reply_to_id = params.get("in_reply_to_id")
        if in_reply_to_id is not None:
            in_reply_to_id = str(in_reply_to_id)
            if in_reply_to_id not in fake.statuses or not fake.visible_to_bot(fake.statuses[in_reply_to_id]):
                return 404, {"error": "The post you are trying to reply to does not appear to exist."}
        visibility = params.get("visibility") or "public"
        if visibility not in ("public", "unlisted", "private", "direct"):
            return 422, {"error": "Validation failed: Visibility is not included in the list"}
        spoiler_text = str(params.get("spoiler_text") or "")
        sensitive = self._truthy(params.get("sensitive")) or bool(spoiler_text)
        # Mastodon 4.5+: who may quote it, the account's default (here "public") when not given
        policy = str(params.get("quote_approval_policy") or "public")
        if policy not in ("public", "followers", "nobody"):
            return 422, {"error": "Validation failed: Quote approval policy is not included in the list"}
        status = fake._make_status(fake.bot, text, media, visibility, in_reply_to_id, sensitive, spoiler_text)
        status["quote_approval"] = {"automatic": [] if policy == "nobody" else [policy], "manual": [],
                                    "current_user": "automatic"}  # its author may always quote it
        fake.source_texts[status["id"]] = text
        for media_id in (m["id"] for m in media):
            fake.uploads[media_id]["status_id"] = status["id"]
        fake.posted.append(status)
        if key:
            fake.idempotency[(TOKEN, key)] = status["id"]
        fake._deliver(status)
        return 200, status

    def _notifications(self, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        fake = self.fake
        items = list(fake.notifications)
        types = query.get("types[]") or query.get("types")
        if types:
            items = [n for n in items if n["type"] in types]
        exclude = query.get("exclude_types[]") or []
        items = [n for n in items if n["type"] not in exclude and n["status"]["id"] not in fake.deleted]
        if not self._truthy((query.get("include_filtered") or ["false"])[0]):
            items = [n for n in items if n["id"] not in fake.filtered]
        page = _page(items, query, 40, 80)
        return 200, page, self._link("/api/v1/notifications", query, page)

    def _tag_timeline(self, query: dict[str, list[str]], tag: str) -> tuple[int, Any, dict[str, str]]:
        fake = self.fake
        tag = tag.lower()
        items = [s for s in fake.statuses.values()
                 if s["visibility"] == "public" and s["id"] not in fake.deleted and any(t["name"] == tag for t in s["tags"])]
        # ``local`` / ``remote``: only this server's statuses / only other servers'; both, or
        # neither, filter nothing (``PublicFeed#local_only?`` / ``#remote_only?``)
        local, remote = (self._truthy((query.get(name) or ["false"])[0]) for name in ("local", "remote"))
        if local != remote:
            items = [s for s in items if ("@" in s["account"]["acct"]) == remote]
        page = _page(items, query, 20, 40)
        return 200, page, self._link(f"/api/v1/timelines/tag/{tag}", query, page)

    def _link(self, path: str, query: dict[str, list[str]], page: list[dict[str, Any]]) -> dict[str, str]:
        if not page:
            return {}
        keep = {k: v for k, v in query.items() if k not in ("max_id", "min_id", "since_id")}
        older = urlencode(list(keep.items()) + [("max_id", page[-1]["id"])], doseq=True)
        newer = urlencode(list(keep.items()) + [("min_id", page[0]["id"])], doseq=True)
        base = self.fake.base_url + path
        return {"Link": f'<{base}?{older}>; rel="next", <{base}?{newer}>; rel="prev"'}

    def _upload(self, query: Any) -> tuple[int, Any]:
        fake = self.fake
        body = self._body()
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            return 422, {"error": "Validation failed: File can't be blank"}
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            fields[name] = (part.get_filename(), part.get_content_type(), payload) if part.get_filename() else payload.decode()
        if "file" not in fields:
            return 422, {"error": "Validation failed: File can't be blank"}
        filename, mime, data = fields["file"]
        limits = fake.configuration["media_attachments"]
        if len(data) > limits["image_size_limit"]:
            return 422, {"error": f"Validation failed: File file size must be less than {limits['image_size_limit'] // 2**20} MB"}
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
                detected = Image.MIME.get(image.format or "", "")
                width, height = image.size
        except Exception:
            return 422, {"error": "Validation failed: File content type is invalid"}
        if width * height > limits["image_matrix_limit"]:
            return 422, {"error": f"{width}x{height} images are not supported"}
        media_id = fake._next_status_id()
        ext = "png" if detected == "image/png" else "jpeg"
        url = fake.add_file(data, detected, ext)
        attachment = fake._attachment(media_id, "image", url, data, fields.get("description"))
        fake.uploads[media_id] = {"data": data, "mime": mime, "detected": detected, "filename": filename,
                                  "description": fields.get("description"), "attachment": attachment, "status_id": None}
        if fake.media_async:
            attachment["url"] = None
            fake._processing_polls[media_id] = 1
            return 202, dict(attachment, url=None)
        return 200, attachment

    def _get_media(self, query: Any, media_id: str) -> tuple[int, Any]:
        fake = self.fake
        upload = fake.uploads.get(media_id)
        if upload is None:
            return 404, {"error": "Record not found"}
        if fake._processing_polls.get(media_id, 0) > 0:
            fake._processing_polls[media_id] -= 1
            return 206, upload["attachment"]
        if upload["attachment"]["url"] is None:
            upload["attachment"]["url"] = upload["attachment"]["preview_url"]
        return 200, upload["attachment"]

    def _search(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        fake = self.fake
        q = (query.get("q") or [""])[0].strip()
        kind = (query.get("type") or [""])[0]
        resolve = (query.get("resolve") or ["false"])[0] == "true"
        statuses = []
        if kind in ("", "statuses") and q.startswith(("http://", "https://")):
            for status in fake.statuses.values():
                seen_as = q in (status["url"], status["uri"]) or (resolve and fake.remote_links.get(q) == status["id"])
                if seen_as and fake.visible_to_bot(status):
                    local = not ("@" in status["account"]["acct"])
                    if local or resolve:
                        statuses.append(status)
        return 200, {"accounts": [], "statuses": statuses, "hashtags": []}

    # -- media files --------------------------------------------------------------------------------

    def _media(self, path: str) -> None:
        fake = self.fake
        with fake.lock:
            media = fake.media_files.get(path)
        if media is None:
            return self._send(404, raw=b"Not Found", content_type="text/plain")
        if media.hold:
            fake.media_gate.wait(timeout=120)
        if media.redirect_to:
            self.send_response(302)
            self.send_header("Location", media.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record.status = 302
            return
        self._record.status = 200
        try:
            if media.endless:
                self.send_response(200)
                self.send_header("Content-Type", media.content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = (media.data or b"\x00") * (65536 // max(1, len(media.data or b"\x00")))
                while not fake._stopping.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif media.trickle_s is not None:
                self.send_response(200)
                self.send_header("Content-Type", media.content_type)
                self.send_header("Content-Length", str(len(media.data)))
                self.end_headers()
                for byte in media.data:
                    if fake._stopping.wait(media.trickle_s):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            elif media.declared_length is not None:
                self.send_response(200)
                self.send_header("Content-Type", media.content_type)
                self.send_header("Content-Length", str(media.declared_length))
                self.end_headers()
                self.wfile.write(media.data)
                left = media.declared_length - len(media.data)
                while left > 0 and not fake._stopping.is_set():
                    part = min(left, 65536)
                    self.wfile.write(b"\x00" * part)
                    left -= part
            else:
                self._send(200, raw=media.data, content_type=media.content_type,
                           headers={"Cache-Control": "public, max-age=315576000, immutable"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- streaming ----------------------------------------------------------------------------------

    def _stream(self, path: str, query: dict[str, list[str]]) -> None:
        fake = self.fake
        if fake.streaming_apart and self._record.server == "api":
            # Api::V1::StreamingController: every streaming path, to the same path there
            self.send_response(301)
            self.send_header("Location", fake.streaming_url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record.status = 301
            return
        if path == "/api/v1/streaming/health":
            return self._send(200, raw=b"OK", content_type="text/plain")
        if fake.stream_refuse is not None:
            self._body()
            return self._error(fake.stream_refuse, "Streaming is not available here" if fake.stream_refuse == 501 else "Not found")
        if not self._authorised(query):
            # every channel since Mastodon 4.2, public ones too (mastodon/mastodon#23989)
            return self._error(401, "Error: Missing access token")
        if path == "/api/v1/streaming/user/notification":
            subscriber = _Subscriber("notification")
        elif path == "/api/v1/streaming/hashtag":
            tag = (query.get("tag") or [""])[0].lower()
            if not tag:
                return self._error(400, "Error: Missing tag name parameter")
            subscriber = _Subscriber("hashtag", tag)
        else:
            return self._error(404, "Not found")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "private, no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._record.status = 200
        with fake.lock:
            hooks, fake.before_subscribe = fake.before_subscribe, []
        for hook in hooks:  # e.g. a mention that lands between the client's catch-up and this stream
            hook()
        with fake.lock:
            fake._subscribers.append(subscriber)
            fake.stream_connections.append((subscriber.kind, time.time()))
            drop_after = fake.stream_drop_after
        try:
            self._chunk(b":)\n")
            while not fake._stopping.is_set():
                try:
                    item = subscriber.queue.get(timeout=fake.stream_heartbeat_s)
                except queue.Empty:
                    self._chunk(b":thump\n")
                    continue
                if item is None:
                    break
                event, data = item
                self._chunk(f"event: {event}\ndata: {data}\n\n".encode())
                subscriber.sent += 1
                if drop_after is not None and subscriber.sent >= drop_after:
                    break
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with fake.lock:
                if subscriber in fake._subscribers:
                    fake._subscribers.remove(subscriber)
            # A dropped connection, not a clean end of stream: no terminating chunk.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
