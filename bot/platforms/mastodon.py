"""Mastodon through its REST and streaming APIs (plain HTTP, so tests fake it at the boundary).

Rate limits: every response's ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset`` are honoured;
when a budget is spent the client refuses further calls of that budget until the reset instead
of hammering the server, and a 429 becomes ``RateLimited`` with the server's reset time. Mastodon
keeps separate budgets for media uploads and for deletions (30 each per 30 minutes) and for
posting (300 statuses per 3 hours) beside the general one, and its headers describe whichever
budget of the request is closest to running out, so the client keeps one block per budget: a
spent upload or posting budget must not stop takedowns or the polls.
Posting uses Mastodon's ``Idempotency-Key`` header, so a retried reply is never posted twice.
The server keeps a key for an hour; a retry later than that reads the thread below the post it
answers instead (``own_reply``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime
from html.parser import HTMLParser
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import requests

from anonymiser.int_settings import is_decimal

from .base import (
    VISIBILITIES,
    Account,
    Event,
    Media,
    MediaLimits,
    NotFound,
    PlatformError,
    Post,
    RateLimited,
    bounded_reset,
    ReplyDraft,
    ServerError,
    StreamUnavailable,
    listed_id,
    known_visibility,
    read_events,
    web_link,
)

log = logging.getLogger("bot.mastodon")

PAGE = 40
#: pages a late-arrivals scan reads at most per poll (the newest part of its window first)
LATE_PAGES = 3
#: a Mastodon status id is a snowflake: milliseconds since 1970 above 16 bits of sequence
#: (``lib/mastodon/snowflake.rb``); ids below this (before 2017) are not snowflakes
_SNOWFLAKE_SHIFT = 16
_SNOWFLAKE_MIN = 1_483_228_800_000 << _SNOWFLAKE_SHIFT
#: GoToSocial's ids are ULIDs: 26 characters of Crockford base32, the first 10 the milliseconds
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID = re.compile(f"^[{_CROCKFORD}]{{26}}$")
#: Mastodon's own throttles beside the general API budget (``config/initializers/rack_attack.rb``)
_MEDIA_UPLOAD = re.compile(r"^/api/v[12]/media$")
_STATUS_DELETE = re.compile(r"^/api/v1/statuses/[^/]+$")
#: posting (``RateLimiter`` family ``statuses``: 300 per 3 hours), whose headers a post carries
_STATUS_POST = re.compile(r"^/api/v1/statuses(?:/[^/]+)?$")
#: a post's path on a Mastodon server: the profile form, ActivityPub's, the old web UI's, the
#: advanced web interface's (``/deck/``, what its address bar shows) and Pleroma's ``notice``
_STATUS_PATH = re.compile(r"^/(?:@[^/]+|users/[^/]+/statuses|web/statuses|web/@[^/]+|deck/@[^/]+|notice)/(\d+)/?$")
#: a stock server's limit on a status: its text and its content warning together (a server
#: publishes its own in its instance API)
MAX_CHARS = 500
#: how long the server's published limits are trusted, and how soon a failed read is retried
INSTANCE_TTL_S = 3600.0
INSTANCE_RETRY_S = 60.0
#: how much of a long content warning a reply keeps at least, so a reader still sees what it warns of
CW_FLOOR = 60
_LEADING_MENTION = re.compile(r"@[\w.\-]+(?:@[\w.\-]+)?\s+")
_COUNTED_URL = re.compile(r"https?://[^\s<>\"']+")
_REMOTE_MENTION = re.compile(r"(?<![\w/@])(@\w+)@[\w.\-]+\w")
#: the streaming URL a server publishes is a WebSocket one; its HTTP server-sent events are
#: served at the same place
_STREAMING_SCHEMES = {"wss": "https", "ws": "http", "https": "https", "http": "http"}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "p") and self.parts:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Mastodon's HTML content as plain text (links keep their visible text, i.e. the URL)."""
    parser = _Text()
    parser.feed(html or "")
    return "".join(parser.parts).strip()


def countable_length(text: str) -> int:
    """Characters of ``text`` as a Mastodon server counts them against its limit: every URL
    as 23, a remote mention as its local part. Code points, never fewer than the server's
    grapheme clusters, so a text that fits here fits there."""
    return len(_REMOTE_MENTION.sub(r"\1", _COUNTED_URL.sub("x" * 23, text)))


def _shorten(text: str, room: int, length: Callable[[str], int]) -> str:
    """``text`` cut at the end, with an ellipsis, to count at most ``room`` by ``length``."""
    if length(text) <= room:
        return text
    cut = min(len(text), max(room - 1, 0))
    while cut > 0 and length(text[:cut].rstrip() + "…") > room:
        cut -= 1
    return text[:cut].rstrip() + "…" if cut else ""


def fit_status(text: str, spoiler_text: str, limit: int = MAX_CHARS) -> tuple[str, str]:
    """A status's text and content warning cut to fit ``limit`` together, as the server counts
    them: the CW as it is, plus the text by ``countable_length`` (a copied long CW would
    otherwise make the reply a 422). The CW gives way first, down to ``CW_FLOOR`` characters,
    because the text carries the caveat and how to take the copy down; then the text's end,
    where the list of failures is."""
    if countable_length(text) + len(spoiler_text) <= limit:
        return text, spoiler_text
    spoiler_text = _shorten(spoiler_text, max(limit - countable_length(text), min(CW_FLOOR, limit // 2)), len)
    # The leading mention says who the reply goes to: cut into it, "@bob@remote.example" could
    # become another account, which would receive the copy.
    mention = _LEADING_MENTION.match(text)
    head = mention.group(0) if mention else ""
    return head + _shorten(text[len(head):], limit - len(spoiler_text) - countable_length(head), countable_length), spoiler_text


def id_time_ms(item_id: str) -> int | None:
    """When a status with this id was made (or, from another server, published), in Unix
    milliseconds: from a snowflake (Mastodon) or a ULID (GoToSocial); None for other ids."""
    if item_id.isdigit():
        value = int(item_id)
        return value >> _SNOWFLAKE_SHIFT if value >= _SNOWFLAKE_MIN else None
    if _ULID.match(item_id):
        return sum(_CROCKFORD.index(c) << (5 * (9 - i)) for i, c in enumerate(item_id[:10]))
    return None


def id_at(ms: int, like: str) -> str:
    """The lowest id of ``like``'s kind made at ``ms``: every status made later sorts above it."""
    if like.isdigit():
        return str(ms << _SNOWFLAKE_SHIFT)
    return "".join(_CROCKFORD[(ms >> (5 * (9 - i))) & 31] for i in range(10)) + "0" * 16


def _objects(value: Any) -> list[dict[str, Any]]:
    """The objects of a list in a server's JSON: null (some servers' "none") is an empty list,
    and an entry that is not an object is no entry."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _sort_key(item_id: str) -> tuple[int, str]:
    # Mastodon ids are numeric strings of varying length: compare as numbers.
    return (len(item_id), item_id)


def _parse_reset(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _body(method: str, path: str, response: requests.Response) -> Any:
    """The answer's JSON. A proxy's maintenance or login page in its place means the server is
    not answering as Mastodon for now: a ServerError, retried like a 5xx (not taken for a bug)."""
    try:
        return response.json()
    except ValueError:
        raise ServerError(f"{method} {path}: the answer is not JSON", response.status_code) from None


class MastodonPlatform:
    """A Mastodon account the bot acts as."""

    name = "mastodon"
    watches_hashtags = True
    #: what a notification policy filters (Mastodon 4.3+: a stranger's direct message where
    #: ``prepare`` could not change the policy, a mention from an account a moderator limited)
    #: is never streamed, only listed with ``include_filtered``: a streamed mention must not
    #: move the cursor past it (the listener's catch-ups move it)
    stream_complete = False
    #: Mastodon keeps an ``Idempotency-Key`` for 3,600 s from when the server stored it, which
    #: is after the attempt's own start: a retry this long after the first attempt no longer
    #: trusts the key alone (the margin covers forks that keep it a little less)
    idempotency_window_s = 3000.0

    def __init__(self, base_url: str, token: str, timeout_s: float = 20.0, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = urlparse(self.base_url).netloc.lower()
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "User-Agent": "protest-privacy-bot"})
        self._blocked_until: dict[str, float] = {}
        self._me: Account | None = None
        self._configuration: dict[str, Any] = {}
        self._configuration_until = 0.0

    # -- HTTP -------------------------------------------------------------------------------

    @staticmethod
    def _budget(method: str, path: str) -> str:
        """Which of the server's rate budgets a request draws on."""
        if method == "POST" and _MEDIA_UPLOAD.match(path):
            return "media"
        if method == "DELETE" and _STATUS_DELETE.match(path):
            return "delete"
        if method in ("POST", "PUT") and _STATUS_POST.match(path):
            # A spent posting budget is announced for hours: it must not stop the polls that
            # read mentions and takedown requests, nor the look-ups a takedown needs.
            return "statuses"
        return "api"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        budget = self._budget(method, path)
        wait = self._blocked_until.get(budget, 0.0) - time.time()
        if wait > 0:
            raise RateLimited(f"rate limit reached, resets in {wait:.0f}s", wait, status=None)
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            response = self.session.request(method, self.base_url + path, **kwargs)
        except requests.RequestException as exc:
            raise ServerError(f"{method} {path}: {type(exc).__name__}") from None
        self._note_rate_limit(budget, response)
        if response.status_code == 429:
            reset = _parse_reset(response.headers.get("X-RateLimit-Reset"))
            retry_after = response.headers.get("Retry-After")
            wait = float(retry_after) if retry_after and is_decimal(retry_after) else (reset - time.time() if reset else 60.0)
            raise RateLimited(f"{method} {path}: 429 rate limited", max(1.0, wait))
        if response.status_code == 404:
            raise NotFound(f"{method} {path}: not found", 404)
        if response.status_code >= 500:
            raise ServerError(f"{method} {path}: server error {response.status_code}", response.status_code)
        if response.status_code >= 400:
            raise PlatformError(f"{method} {path}: {response.status_code} {self._error_text(response)}", response.status_code)
        return response

    @staticmethod
    def _error_text(response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return ""
        return str(body.get("error", ""))[:200] if isinstance(body, dict) else ""

    def _note_rate_limit(self, budget: str, response: requests.Response) -> None:
        remaining = response.headers.get("X-RateLimit-Remaining")
        reset = _parse_reset(response.headers.get("X-RateLimit-Reset"))
        if remaining is not None and remaining.strip() == "0" and reset:
            self._blocked_until[budget] = bounded_reset(reset)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _body(method, path, self._request(method, path, **kwargs))

    # -- parsing ----------------------------------------------------------------------------

    @staticmethod
    def parse_account(data: dict[str, Any]) -> Account:
        """An Account entity; its ``fields`` are name/value pairs, the name plain text and the
        value HTML (https://docs.joinmastodon.org/entities/Account/#fields)."""
        acct = str(data.get("acct") or "")
        return Account(
            id=str(data["id"]),
            acct=acct,
            bot=bool(data.get("bot")),
            note=html_to_text(str(data.get("note") or "")),
            fields=tuple((str(f.get("name") or ""), html_to_text(str(f.get("value") or "")))
                         for f in _objects(data.get("fields"))),
            locked=bool(data.get("locked")),
            local="@" not in acct,
        )

    @classmethod
    def parse_post(cls, data: dict[str, Any]) -> Post:
        media = tuple(
            Media(id=str(m["id"]), type=str(m.get("type") or "unknown"), url=str(m.get("url") or m.get("remote_url") or ""),
                  description=str(m.get("description") or ""))
            for m in _objects(data.get("media_attachments"))
        )
        quote = data.get("quote") or {}
        quoted = quote.get("quoted_status") if isinstance(quote, dict) else None
        return Post(
            id=str(data["id"]),
            account=cls.parse_account(data["account"]),
            text=html_to_text(str(data.get("content") or "")),
            # Missing counts as the narrowest, like an unknown word: it must never widen an audience.
            visibility=known_visibility(data.get("visibility")),
            sensitive=bool(data.get("sensitive")),
            spoiler_text=str(data.get("spoiler_text") or ""),
            in_reply_to_id=str(data["in_reply_to_id"]) if data.get("in_reply_to_id") else None,
            in_reply_to_account_id=str(data["in_reply_to_account_id"]) if data.get("in_reply_to_account_id") else None,
            quote_id=str(quoted["id"]) if isinstance(quoted, dict) and quoted.get("id") else None,
            quote_state=str(quote.get("state") or "") if isinstance(quote, dict) else "",
            url=str(data.get("url") or ""),
            uri=str(data.get("uri") or ""),
            media=media,
            tags=tuple(str(t.get("name") or "").lower() for t in _objects(data.get("tags"))),
            addressed=tuple(str(m["id"]) for m in _objects(data.get("mentions")) if m.get("id")),
            # Akkoma's "local" visibility is glitch-soc's local-only flag under another name.
            local_only=bool(data.get("local_only")) or data.get("visibility") == "local",
            # Who sees a post of a visibility the bot does not know ("list", "local") is not
            # known either: being mentioned in it proves nothing.
            mentions_see=data.get("visibility") in VISIBILITIES,
        )

    # -- the Platform interface -------------------------------------------------------------

    def me(self) -> Account:
        if self._me is None:
            self._me = self.parse_account(self._json("GET", "/api/v1/accounts/verify_credentials"))
        return self._me

    def prepare(self) -> None:
        """Accept private mentions from strangers. Since Mastodon 4.3 a server files a direct
        message from an account the bot does not follow under "filtered notifications" by
        default: neither listed nor streamed, so a stranger's takedown request would never
        arrive. Older servers have no policy (404); a token without ``write:notifications``
        is refused (403): the poll's ``include_filtered`` still finds those messages."""
        try:
            self._request("PATCH", "/api/v2/notifications/policy", json={"for_private_mentions": "accept"})
        except PlatformError as exc:
            log.warning("notification_policy_unchanged", extra={"status": exc.status, "error": type(exc).__name__})

    def get_post(self, post_id: str) -> Post:
        return self.parse_post(self._json("GET", f"/api/v1/statuses/{post_id}"))

    def _pages(self, path: str, params: dict[str, Any], since_id: str | None) -> list[dict[str, Any]]:
        """Every item newer than ``since_id``, oldest first, following ``min_id`` pages."""
        items: list[dict[str, Any]] = []
        cursor = since_id
        while True:
            query = dict(params, limit=PAGE)
            if cursor:
                query["min_id"] = cursor
            page = self._listing(path, query)
            if not page:
                break
            page.sort(key=lambda item: _sort_key(str(item["id"])))
            items.extend(page)
            cursor = str(page[-1]["id"])
            if not since_id:
                break  # first start: only the newest page, never the whole history
        return items

    def _listing(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """One page of a list: the items a cursor can move to (each an object with an id)."""
        page = self._json("GET", path, params=params)
        if not isinstance(page, list):
            raise ServerError(f"GET {path}: the answer is not a list", 200)
        kept = [item for item in page if listed_id(item) is not None]
        if len(kept) < len(page):
            log.warning("unreadable_item", extra={"path": path, "items": len(page) - len(kept), "error": "no id"})
        return kept

    def _mentions(self, items: list[dict[str, Any]]) -> list[Event]:
        def read(notification: dict[str, Any]) -> Event:
            return Event("mention", str(notification["id"]), self.parse_post(notification["status"]))
        return read_events([n for n in items if n.get("type") == "mention" and n.get("status")], read, "mention", log)

    def _tagged(self, tag: str, items: list[dict[str, Any]]) -> list[Event]:
        def read(status: dict[str, Any]) -> Event:
            return Event("hashtag", str(status["id"]), self.parse_post(status), tag=tag)
        return read_events(items, read, "hashtag", log, tag)

    def mentions_since(self, since_id: str | None) -> list[Event]:
        # include_filtered: also what the notification policy filtered (see ``prepare``).
        return self._mentions(self._pages("/api/v1/notifications", {"types[]": "mention", "include_filtered": "true"}, since_id))

    def hashtag_since(self, tag: str, since_id: str | None) -> list[Event]:
        return self._tagged(tag, self._pages(f"/api/v1/timelines/tag/{tag}", {}, since_id))

    @staticmethod
    def published_ms(post_id: str) -> int | None:
        """When the post ``post_id`` was published (from another server: there), in Unix
        milliseconds, read from its id; None where the id tells no time."""
        return id_time_ms(post_id)

    def hashtag_late(self, tag: str, cursor: str, window_s: float, not_before: float) -> list[Event]:
        """Public posts with ``tag`` that a poll from ``cursor`` no longer lists because they
        arrived after it: oldest first, published at most ``window_s`` before the cursor's post
        and not before the Unix time ``not_before``.

        A server gives a status from another server an id made from its publish time, not its
        arrival (a backdated snowflake or ULID), so a post that federates late sorts below
        posts already polled. Only remote posts can arrive late (``remote=true``), and the scan
        reads back from the cursor, newest first, at most ``LATE_PAGES`` pages: on a busy tag it
        covers the most recent part of the window, where most late posts land, and costs no
        more."""
        top_ms = id_time_ms(cursor)
        if top_ms is None:
            return []  # "0" (a channel that started empty) or an id that tells no time
        since = id_at(max(top_ms - int(window_s * 1000), int(not_before * 1000)), cursor)
        if _sort_key(since) >= _sort_key(cursor):
            return []
        found: list[dict[str, Any]] = []
        upper = cursor
        for _ in range(LATE_PAGES):
            page = self._listing(f"/api/v1/timelines/tag/{tag}",
                                 {"remote": "true", "max_id": upper, "since_id": since, "limit": PAGE})
            if not page:
                break
            found.extend(page)
            # A short page is no sign of the end: the server drops what the bot may not see
            # (blocked, muted) after reading a page, so only an empty one ends the scan.
            upper = min((str(item["id"]) for item in page), key=_sort_key)
        found.sort(key=lambda item: _sort_key(str(item["id"])))
        return self._tagged(tag, found)

    def stream(self, channel: str) -> Iterator[Event | None]:
        """Server-sent events of one channel: ``"mentions"`` or ``"tag:<name>"``; ``None`` for
        each heartbeat.

        Raises ``StreamUnavailable`` when the server refuses HTTP streaming (some servers offer
        only WebSocket streaming, or none) or when the stream drops; the listener then polls.
        """
        if channel == "mentions":
            path, params, wanted = "/api/v1/streaming/user/notification", {}, "notification"
        elif channel.startswith("tag:"):
            path, params, wanted = "/api/v1/streaming/hashtag", {"tag": channel[4:]}, "update"
        else:
            raise ValueError(f"unknown channel {channel!r}")
        for name, payload in self._sse(path, params):
            if name == "":
                yield None  # a heartbeat: lets the listener check its stop flag and resync
                continue
            if name != wanted:
                continue
            items = [payload] if listed_id(payload) is not None else []
            events = self._mentions(items) if wanted == "notification" else self._tagged(channel[4:], items)
            yield from events

    def _streaming_base(self) -> str:
        """Where the server's streaming API lives.

        A server may serve it from another host (mastodon.social: streaming.mastodon.social) and
        answer ``/api/v1/streaming`` on its own host only with a redirect there, which
        ``requests`` follows without the ``Authorization`` header (it never sends credentials
        to another host), so the stream would be refused. The documented way to find the host
        is ``configuration.urls.streaming`` of the instance API (``urls.streaming_api`` in v1),
        a ``wss://`` URL whose HTTP streaming is served over ``https://`` at the same place
        (https://docs.joinmastodon.org/methods/streaming/#hostname-discovery). The server's own
        address when it publishes none, or one that would send the token unencrypted from an
        https server.
        """
        urls = self._server_configuration().get("urls")
        published = urls.get("streaming") if isinstance(urls, dict) else None
        if not isinstance(published, str) or not published.strip():
            return self.base_url
        parsed = urlparse(published.strip())
        scheme = _STREAMING_SCHEMES.get(parsed.scheme.lower())
        if scheme is None or not parsed.netloc or (scheme == "http" and self.base_url.startswith("https:")):
            log.warning("streaming_url_unusable", extra={"scheme": parsed.scheme[:10]})
            return self.base_url
        return f"{scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"

    def _sse(self, path: str, params: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            response = self.session.get(
                self._streaming_base() + path,
                params=params,
                stream=True,
                timeout=(self.timeout_s, 120),  # Mastodon sends a heartbeat every few seconds
                headers={"Accept": "text/event-stream"},
            )
        except requests.RequestException as exc:
            raise StreamUnavailable(f"streaming connection failed: {type(exc).__name__}") from None
        if response.status_code != 200 or "text/event-stream" not in response.headers.get("Content-Type", ""):
            response.close()
            raise StreamUnavailable(f"streaming refused: HTTP {response.status_code}", response.status_code)
        # Server-sent events are UTF-8 whatever the headers say; Mastodon names no charset, and
        # requests would read "text/..." as ISO-8859-1 ("löschen" as "lÃ¶schen").
        response.encoding = "utf-8"
        name, data = "", []
        try:
            for line in response.iter_lines(decode_unicode=True):
                if line is None:
                    continue
                if line.startswith(":"):
                    yield "", {}  # heartbeat comment
                    continue
                if line == "":
                    if name and data:
                        yield name, json.loads("\n".join(data))
                    name, data = "", []
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
        except (requests.RequestException, ValueError) as exc:
            raise StreamUnavailable(f"stream dropped: {type(exc).__name__}") from None
        finally:
            response.close()
        raise StreamUnavailable("stream ended")

    def upload_image(self, data: bytes, mime: str, description: str) -> str:
        extension = "png" if mime == "image/png" else "jpg"
        response = self._request(
            "POST",
            "/api/v2/media",
            files={"file": (f"anonymised.{extension}", data, mime)},
            data={"description": description},
            timeout=max(self.timeout_s, 60),
        )
        media = _body("POST", "/api/v2/media", response)
        media_id = str(media["id"])
        # 202 means the server is still processing; the status cannot be posted before it is done.
        deadline = time.time() + 60
        while response.status_code == 202 or not media.get("url"):
            if time.time() > deadline:
                raise ServerError("media processing did not finish in 60 s")
            time.sleep(0.5)
            response = self._request("GET", f"/api/v1/media/{media_id}")
            media = _body("GET", "/api/v1/media/:id", response)
        return media_id

    def _server_configuration(self) -> dict[str, Any]:
        """The ``configuration`` of the server's instance API (v2, else v1 before Mastodon 4.0;
        its limits and ``urls.streaming``), cached; ``{}`` when the server publishes none or
        cannot be asked now (stock limits, streaming from the server's own host)."""
        now = time.monotonic()
        if now < self._configuration_until:
            return self._configuration
        found: Any = None
        for path in ("/api/v2/instance", "/api/v1/instance"):
            try:
                body = self._json("GET", path)
            except NotFound:
                continue
            except (PlatformError, ValueError) as exc:  # ValueError: a 200 that is not JSON (a proxy's page)
                log.warning("instance_unreadable", extra={"status": getattr(exc, "status", None), "error": type(exc).__name__})
                self._configuration_until = now + INSTANCE_RETRY_S
                return self._configuration
            found = body.get("configuration") if isinstance(body, dict) else None
            v1_urls = body.get("urls") if isinstance(body, dict) and path.startswith("/api/v1/") else None
            if isinstance(v1_urls, dict) and v1_urls.get("streaming_api"):
                # v1 publishes its streaming URL beside its configuration: kept where v2 has it
                found = dict(found if isinstance(found, dict) else {}, urls={"streaming": v1_urls["streaming_api"]})
            break
        self._configuration = found if isinstance(found, dict) else {}
        self._configuration_until = now + INSTANCE_TTL_S
        return self._configuration

    def _limit(self, section: str, key: str) -> int | None:
        part = self._server_configuration().get(section)
        value = part.get(key) if isinstance(part, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def media_limits(self) -> MediaLimits:
        return MediaLimits(self._limit("media_attachments", "image_size_limit"),
                           self._limit("media_attachments", "image_matrix_limit"))

    def reply(self, draft: ReplyDraft) -> Post:
        text, spoiler_text = fit_status(draft.text, draft.spoiler_text, self._limit("statuses", "max_characters") or MAX_CHARS)
        body: dict[str, Any] = {
            "status": text,
            "in_reply_to_id": draft.in_reply_to.id,
            "visibility": draft.visibility,
            "sensitive": draft.sensitive or bool(draft.spoiler_text),
            # Mastodon 4.5+ lets anyone quote a post by default (the account's setting): a quote
            # carries the copy into its quoter's audience, which the original's author may have
            # closed to quotes. Older servers ignore it.
            "quote_approval_policy": "nobody",
        }
        if draft.media_ids:
            body["media_ids"] = draft.media_ids
        if spoiler_text:
            body["spoiler_text"] = spoiler_text
        headers = {"Idempotency-Key": draft.idempotency_key} if draft.idempotency_key else {}
        return self.parse_post(self._json("POST", "/api/v1/statuses", json=body, headers=headers))

    def own_reply(self, in_reply_to_id: str, with_media: bool) -> Post | None:
        """The bot's reply to ``in_reply_to_id`` (with images or without), if it posted one: the
        thread below that post, one request, whatever the bot posted since."""
        me = self.me()
        context = self._json("GET", f"/api/v1/statuses/{in_reply_to_id}/context")
        descendants = context.get("descendants") if isinstance(context, dict) else None
        for item in _objects(descendants):
            author = item.get("account")
            if (isinstance(author, dict) and str(author.get("id")) == me.id
                    and str(item.get("in_reply_to_id")) == in_reply_to_id
                    and bool(_objects(item.get("media_attachments"))) == with_media):
                return self.parse_post(item)
        return None

    def delete_post(self, post_id: str) -> bool:
        # Without delete_media (Mastodon 4.4+) the server keeps a deleted post's attachments,
        # still served at their URLs, for about a day "so they can be re-used" in a redraft: a
        # taken-down copy would stay online for anyone who had its link. Older servers ignore it.
        self._request("DELETE", f"/api/v1/statuses/{post_id}", params={"delete_media": "true"})
        return True

    def direct_message(self, to: Account, text: str, in_reply_to: Post | None = None, idempotency_key: str = "") -> Post:
        body: dict[str, Any] = {"status": f"@{to.acct} {text}", "visibility": "direct"}
        if in_reply_to is not None:
            body["in_reply_to_id"] = in_reply_to.id
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.parse_post(self._json("POST", "/api/v1/statuses", json=body, headers=headers))

    def post_id_from_reference(self, reference: str) -> str | None:
        reference = reference.strip().rstrip(".,;:!?)>")
        if is_decimal(reference):
            return reference
        parsed = web_link(reference)
        if parsed is None:
            return None
        if parsed.netloc.lower() == self.host:
            match = _STATUS_PATH.match(parsed.path)
            return match.group(1) if match else None
        # A post on another server: ask ours to resolve it to a local id.
        try:
            found = self._json("GET", "/api/v2/search", params={"q": reference, "type": "statuses", "resolve": "true", "limit": 1})
        except (RateLimited, ServerError):
            raise  # the lookup failed, not the link: "not a copy of mine" would be untrue
        except PlatformError:
            return None
        # A server's answer of another shape names no post: one odd reference must not fail
        # the takedown of the others.
        statuses = _objects(found.get("statuses") if isinstance(found, dict) else None)
        first = statuses[0].get("id") if statuses else None
        return str(first) if isinstance(first, (str, int)) and str(first) else None
