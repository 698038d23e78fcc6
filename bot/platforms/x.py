"""X (Twitter) through API v2: tweepy 4.17 for the endpoints it wraps, plain HTTP for the rest.

What maps how (see README, "X"):

- Every tweet is public on X; a tweet by a **protected** account becomes ``Post.visibility =
  "private"`` and ``Account.locked = True``, so the handler's rules answer it by **direct
  message** and never repost its images in public. ``reply()`` with ``visibility="direct"``
  sends DMs (one image per DM: X allows one attachment per message).
- **Direct messages** are not mentions on X: ``dms_since()`` polls ``GET /2/dm_events`` for the
  listener's ``"dms"`` channel. A DM's ``Post.id`` is ``"dm:<event id>"`` so that ``get_post``
  and ``delete_post`` know which API to use; DM attachments are not exposed (X serves them
  only to OAuth-signed requests, which the address-checked downloader does not make).
- **Media** goes through ``POST /2/media/upload`` (tweepy only wraps the deprecated v1.1
  upload, tweepy issue #2217) and ``POST /2/media/metadata`` (alt text, sensitive warning).
  The upload is deferred to ``reply()``: DM media needs ``media_category=dm_image`` and tweet
  media ``tweet_image``, and only ``reply()`` knows which. Until then ``upload_image`` keeps
  the anonymised bytes (never an original) in memory under a local handle.
- **Reply settings**: a conversation whose first tweet limits who may reply (mentioned accounts,
  accounts its author follows, verified accounts) refuses the bot's reply with 403 ("Reply to
  this conversation is not allowed ..."): ``RepliesClosed``, after which ``reply()`` keeps the
  draft's images pending, so the handler can send the same draft as a DM.
- **Idempotency**: X has no Idempotency-Key. Every post ends with a short marker derived from
  the job's key (``ref 1a2b3c4d5e``); before posting, the bot's own tweets newer than the
  tweet it answers (or its DMs with that person) are searched for the marker, and a found post
  is returned instead of posting again. X's own refusal of duplicate text is the backstop.
- **Rate limits** are per endpoint on X: ``x-rate-limit-remaining``/``x-rate-limit-reset``
  (epoch seconds, plus the 24-hour posting limits) are tracked per route; a route whose budget
  is spent is refused locally until its reset, and a 429 becomes ``RateLimited`` with that wait.
- **No hashtags**: the bot answers mentions only (``watches_hashtags``); X's rules and, since
  23 Feb 2026, its API refuse automated replies to authors who did not mention the bot.
- **Streaming** uses the filtered stream (``GET /2/tweets/search/stream``, app-only bearer
  token) with one rule per channel; lower access tiers get 403 there, which raises
  ``StreamUnavailable`` so that the listener polls.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import requests
import tweepy
from requests_oauthlib import OAuth1

from anonymiser.int_settings import is_decimal

from .base import (
    Account,
    Event,
    Media,
    MediaLimits,
    MessagesRefused,
    NotFound,
    PlatformError,
    Post,
    MAX_RATE_LIMIT_WAIT_S,
    RateLimited,
    bounded_reset,
    RepliesClosed,
    ReplyDraft,
    ServerError,
    StreamUnavailable,
    listed_id,
    read_event,
    read_events,
    web_link,
)
from .x_text import HOSTS, dm_text, expand_links, fit, marker, marker_line, with_cw

log = logging.getLogger("bot.platforms.x")

API = "https://api.x.com"
PAGE = 100
FIRST_PAGE = 10  # first start: only the newest id is needed
MAX_PAGES = 20
OWN_TWEET_PAGES = 10  # idempotency look-up: at most 1,000 of the bot's tweets
TWEET_LIMIT = 280
DM_LIMIT = 10_000
#: between the event ids of a copy sent as several DMs, in its ``Post.id`` (``dm:<id>+<id>``)
DM_JOIN = "+"
ALT_TEXT_LIMIT = 1000
#: X refuses a photo over 5 MB (tweets and DMs alike)
IMAGE_BYTES = 5 * 1024 * 1024
PENDING_TTL_S = 900

TWEET_FIELDS = [
    "attachments", "author_id", "conversation_id", "created_at", "entities", "in_reply_to_user_id",
    "note_tweet", "possibly_sensitive", "referenced_tweets", "withheld",
]
EXPANSIONS = ["author_id", "attachments.media_keys"]
MEDIA_FIELDS = ["media_key", "type", "url", "alt_text"]
USER_FIELDS = ["description", "name", "protected", "username", "withheld"]
DM_FIELDS = ["id", "event_type", "text", "sender_id", "dm_conversation_id", "created_at", "entities", "attachments",
             "referenced_tweets"]

#: a tweet id as X's API takes it (its OpenAPI schema's TweetID): anything else is a 400, not a
#: "not found", and would fail the whole takedown that named it
_TWEET_ID = r"[0-9]{1,19}"
_STATUS_PATH = re.compile(rf"^/(?:[A-Za-z0-9_]{{1,15}}|i/web|i)/status(?:es)?/({_TWEET_ID})(?:/.*)?$")
_MEDIA_TYPES = {"photo": "image", "animated_gif": "gifv", "video": "video"}
_NUMERIC = re.compile(r"/\d{3,}(?=/|$)")  # ids, not the API version


# ---------------------------------------------------------------------------------- helpers


def _by_id(item_id: str) -> tuple[int, str]:
    return (len(item_id), item_id)


def _route(method: str, path: str) -> str:
    """The rate-limit bucket of a request: X counts per endpoint, ids do not matter."""
    return f"{method} {_NUMERIC.sub('/:id', path)}"


def _since(since_id: str | None) -> str | None:
    """``since_id`` as X accepts it: "0" (a channel started with no history) means none."""
    return since_id if since_id and since_id.strip("0") else None


def _one_to_one(event: dict[str, Any], my_id: str) -> bool:
    """Whether a DM event belongs to the bot's one-to-one conversation with its sender.

    X names a one-to-one conversation by its two user ids joined by "-" (the smaller first), a
    group conversation by an id of its own. Group messages are talk among the group, not requests
    to the bot: answering each of them by direct message would flood every member. An event
    without the field (it is always requested) counts as one-to-one, so that no takedown request
    is ever dropped for its lack.
    """
    conversation = str(event.get("dm_conversation_id") or "")
    if not conversation:
        return True
    return sorted(conversation.split("-")) == sorted((str(event.get("sender_id", "")), my_id))


def _photo_url(url: str) -> str:
    # pbs.twimg.com serves a reduced size by default; "large" is at most 2048 px on a side.
    if url.startswith("https://pbs.twimg.com/media/") and "?" not in url:
        return url + "?name=large"
    return url


@dataclass
class _Pending:
    data: bytes
    mime: str
    description: str
    created: float


class _Session(requests.Session):
    """tweepy passes no timeout; this session adds one to every request that has none."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, *args, **kwargs)


class _Includes:
    """The ``includes`` of one or more v2 responses, by id / media key."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.media: dict[str, dict[str, Any]] = {}

    def add(self, includes: dict[str, Any] | None) -> "_Includes":
        """Adds what ``includes`` holds; an entry without its id is no entry (a tweet whose
        author is not included is read as a protected account's)."""
        found = includes if isinstance(includes, dict) else {}
        for key, into, name in (("users", self.users, "id"), ("media", self.media, "media_key")):
            entries = found.get(key)
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get(name) is not None:
                    into[str(entry[name])] = entry
        return self


# ---------------------------------------------------------------------------------- platform


class XPlatform:
    """An X account the bot acts as (OAuth 1.0a user context; app-only bearer for the stream)."""

    name = "x"
    #: X's developer rules forbid automated replies to people who did not ask ("auto-replies to
    #: anyone mentioning a keyword"), and since 23 Feb 2026 its API refuses a reply unless the
    #: author mentioned or quoted the replying account: on X the bot answers mentions only.
    watches_hashtags = False
    #: the filtered stream never carries a protected account's tweets, which the mentions
    #: timeline lists: a streamed mention must not move the cursor past them (the listener's
    #: catch-ups move it)
    stream_complete = False
    #: an edit is a new tweet with an id of its own (``Post.versions``)
    edits_make_new_ids = True

    def __init__(
        self,
        bearer_token: str,
        api_key: str,
        api_secret: str,
        access_token: str,
        access_token_secret: str,
        timeout_s: float = 20.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.bearer_token = bearer_token
        self.client = tweepy.Client(
            bearer_token=bearer_token,
            consumer_key=api_key,
            consumer_secret=api_secret,
            access_token=access_token,
            access_token_secret=access_token_secret,
            return_type=requests.Response,  # keeps the rate-limit headers of successful calls
        )
        self.session = _Session(timeout_s)
        self.session.headers["User-Agent"] = "protest-privacy-bot"
        self.client.session = self.session
        self.auth = OAuth1(api_key, api_secret, access_token, access_token_secret)
        self._blocked: dict[str, float] = {}
        self._me: Account | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # -- HTTP -------------------------------------------------------------------------------

    def _check_budget(self, route: str) -> None:
        wait = self._blocked.get(route, 0.0) - time.time()
        if wait > 0:
            raise RateLimited(f"{route}: rate limit reached, resets in {wait:.0f}s", wait, status=None)

    def _note_rate_limit(self, route: str, response: requests.Response) -> None:
        """Remember when a spent budget (15-minute window or 24-hour posting limit) resets."""
        until = 0.0
        headers = response.headers
        for prefix in ("x-rate-limit", "x-user-limit-24hour", "x-app-limit-24hour"):
            remaining = headers.get(f"{prefix}-remaining")
            reset = headers.get(f"{prefix}-reset")
            if remaining is not None and remaining.strip() == "0" and reset and is_decimal(reset.strip()):
                until = max(until, float(reset))
        if until:
            self._blocked[route] = bounded_reset(until)

    def _wait_after_429(self, route: str, response: requests.Response) -> float:
        self._note_rate_limit(route, response)
        now = time.time()
        reset = response.headers.get("x-rate-limit-reset", "")
        resets = [self._blocked.get(route, 0.0)] + ([float(reset)] if is_decimal(reset.strip()) else [])
        future = [r for r in resets if r > now]
        wait = max(1.0, max(future) - now) if future else 60.0  # no usable header: a minute
        self._blocked[route] = bounded_reset(now + wait, now)
        return min(wait, MAX_RATE_LIMIT_WAIT_S)

    @staticmethod
    def _problem(response: requests.Response) -> str:
        """The most telling part of an X error body (v2 problem or v1.1-style errors)."""
        try:
            body = response.json()
        except ValueError:
            return response.reason or ""
        if not isinstance(body, dict):
            return ""
        parts = [str(body.get(k)) for k in ("detail", "title", "reason") if body.get(k)]
        for error in body.get("errors", []) or []:
            if isinstance(error, dict):
                parts.append(str(error.get("detail") or error.get("message") or error.get("title") or ""))
        return "; ".join(p for p in parts if p)[:300]

    def _raise_for(self, route: str, response: requests.Response) -> None:
        status = response.status_code
        if status == 429:
            raise RateLimited(f"{route}: 429 rate limited", self._wait_after_429(route, response))
        self._note_rate_limit(route, response)
        if 200 <= status < 300:
            return
        if status == 404:
            raise NotFound(f"{route}: not found", 404)
        if status >= 500:
            raise ServerError(f"{route}: server error {status}", status)
        raise PlatformError(f"{route}: {status} {self._problem(response)}", status)

    def _call(self, route: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A tweepy ``Client`` method, its exceptions mapped onto the platform's errors."""
        self._check_budget(route)
        try:
            response = method(*args, **kwargs)
        except tweepy.errors.HTTPException as exc:
            self._raise_for(route, exc.response)
            raise PlatformError(f"{route}: {exc}") from None  # not reached: always an error status
        except requests.RequestException as exc:
            raise ServerError(f"{route}: {type(exc).__name__}") from None
        self._raise_for(route, response)
        return self._body(response)

    def _http(self, method: str, path: str, *, bearer: bool = False, **kwargs: Any) -> dict[str, Any]:
        """An endpoint tweepy does not wrap (media upload, DM lookup/delete, stream rules)."""
        route = _route(method, path)
        self._check_budget(route)
        if bearer:
            kwargs["headers"] = {"Authorization": f"Bearer {self.bearer_token}", **kwargs.get("headers", {})}
        else:
            kwargs["auth"] = self.auth
        try:
            response = self.session.request(method, API + path, **kwargs)
        except requests.RequestException as exc:
            raise ServerError(f"{route}: {type(exc).__name__}") from None
        self._raise_for(route, response)
        return self._body(response)

    @staticmethod
    def _body(response: requests.Response) -> dict[str, Any]:
        if response.status_code == 204 or not response.content:
            return {}
        try:
            body = response.json()
        except ValueError:
            raise ServerError("X answered with something that is not JSON", response.status_code) from None
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _data(route: str, body: dict[str, Any]) -> Any:
        """``data`` of a lookup; X answers 200 with only ``errors`` for missing resources."""
        if body.get("data") is not None:
            return body["data"]
        errors = body.get("errors") or []
        kinds = " ".join(str(e.get("type", "")) + " " + str(e.get("title", "")) for e in errors if isinstance(e, dict))
        if "resource-not-found" in kinds or "Not Found" in kinds:
            raise NotFound(f"{route}: not found", 404)
        if "not-authorized" in kinds or "Authorization Error" in kinds:
            # A protected account's post the bot does not follow: hidden from the bot, which is
            # what NotFound means to the handlers (retrying cannot change it).
            raise NotFound(f"{route}: not authorized (a protected account's post)", 403)
        raise PlatformError(f"{route}: no data in the answer")

    # -- parsing ----------------------------------------------------------------------------

    @staticmethod
    def parse_account(user: dict[str, Any]) -> Account:
        return Account(
            id=str(user["id"]),
            acct=str(user.get("username") or user["id"]),
            bot=False,  # API v2 does not say whether an account is automated
            note=user.get("description") or "",
            locked=bool(user.get("protected")),
        )

    @classmethod
    def parse_tweet(cls, tweet: dict[str, Any], includes: _Includes) -> Post:
        author_id = str(tweet.get("author_id", ""))
        # An author the response did not include may be protected: assume so, never the reverse.
        user = includes.users.get(author_id) or {"id": author_id, "username": author_id, "protected": True}
        account = cls.parse_account(user)
        note = tweet.get("note_tweet") or {}
        text = expand_links(note.get("text") or tweet.get("text", ""), note.get("entities") if note.get("text") else tweet.get("entities"))
        media = []
        for key in (tweet.get("attachments") or {}).get("media_keys", []) or []:
            item = includes.media.get(str(key))
            if item is None:
                continue
            kind = _MEDIA_TYPES.get(item.get("type", ""), "unknown")
            url = _photo_url(item.get("url") or "") if kind == "image" else (item.get("url") or "")
            media.append(Media(id=str(key), type=kind, url=url, description=item.get("alt_text") or ""))
        referenced = {r.get("type"): str(r.get("id")) for r in tweet.get("referenced_tweets", []) or []}
        entities = (note.get("entities") if note.get("text") else None) or tweet.get("entities") or {}
        tags = [h.get("tag", "").lower() for h in entities.get("hashtags", []) or []]
        url = f"https://x.com/{account.acct}/status/{tweet['id']}"
        versions = tuple(str(v) for v in tweet.get("edit_history_tweet_ids") or [])
        return Post(
            id=str(tweet["id"]),
            account=account,
            text=text,
            # No audiences on X: a protected account's tweet is for its approved followers only.
            visibility="private" if account.locked else "public",
            sensitive=bool(tweet.get("possibly_sensitive")),
            in_reply_to_id=referenced.get("replied_to"),
            in_reply_to_account_id=str(tweet["in_reply_to_user_id"]) if tweet.get("in_reply_to_user_id") else None,
            quote_id=referenced.get("quoted"),
            url=url,
            uri=url,
            media=tuple(media),
            tags=tuple(tags),
            # X's mention entities name users by username only.
            addressed=tuple(str(m.get("username", "")).lower() for m in (entities.get("mentions") or []) if m.get("username")),
            mentions_see=False,
            # X withholds a tweet, or a whole account, in some countries (a legal demand, a
            # copyright claim) and still serves it to the API: a public copy would show the photo
            # exactly where X hides it, so it is never reposted in public.
            local_only=bool(tweet.get("withheld") or user.get("withheld")),
            versions=versions if len(versions) > 1 else (),
        )

    @classmethod
    def parse_dm(cls, event: dict[str, Any], includes: _Includes) -> Post:
        sender = str(event.get("sender_id", ""))
        user = includes.users.get(sender) or {"id": sender, "username": sender}
        # A DM's photos download only with OAuth-signed requests, which the media fetcher never
        # makes: they are kept as "unknown" media so the bot can say so instead of fetching them.
        keys = (event.get("attachments") or {}).get("media_keys") or []
        return Post(
            id=f"dm:{event['id']}",
            account=cls.parse_account(user),
            text=dm_text(event),
            visibility="direct",
            media=tuple(Media(id=str(key), type="unknown", url="") for key in keys),
        )

    @staticmethod
    def _retweet(tweet: dict[str, Any]) -> bool:
        return any(r.get("type") == "retweeted" for r in tweet.get("referenced_tweets", []) or [])

    # -- reading ----------------------------------------------------------------------------

    def me(self) -> Account:
        if self._me is None:
            body = self._call("GET /2/users/me", self.client.get_me, user_fields=USER_FIELDS, user_auth=True)
            self._me = self.parse_account(self._data("GET /2/users/me", body))
        return self._me

    def prepare(self) -> None:
        """Nothing to set up: X has no filter that could hide mentions or DMs from the bot."""

    def get_post(self, post_id: str) -> Post:
        """The post ``post_id`` names, as its author shows it now.

        An edit on X is a new tweet, and a lookup of an earlier version answers that version,
        photos and all: a photo the author edited out would still be copied, and its copy never
        withdrawn. So where the tweet's ``edit_history_tweet_ids`` (oldest first, every version)
        ends in another id, the latest version's text and media are read, under the id asked
        for (a reply still goes to that version; the bot's records use ``Post.key``, the first
        version's id, whichever version was asked for)."""
        if post_id.startswith("dm:"):
            # a copy sent as several messages is read by the first still there, named by all
            for event_id in post_id[3:].split(DM_JOIN):
                try:
                    return replace(self._get_dm(event_id), id=post_id)
                except NotFound:
                    continue
            raise NotFound(f"direct messages {post_id} not found", 404)
        tweet, includes = self._tweet(post_id)
        versions = [str(v) for v in tweet.get("edit_history_tweet_ids") or []]
        if versions and versions[-1] != str(tweet["id"]):
            latest, includes = self._tweet(versions[-1])
            log.info("tweet_edited", extra={"post_id": post_id, "versions": len(versions)})
            tweet = dict(latest, id=tweet["id"])
        return self.parse_tweet(tweet, includes)

    def _tweet(self, tweet_id: str) -> tuple[dict[str, Any], _Includes]:
        route = "GET /2/tweets/:id"
        body = self._call(
            route, self.client.get_tweet, tweet_id, expansions=EXPANSIONS, tweet_fields=TWEET_FIELDS,
            media_fields=MEDIA_FIELDS, user_fields=USER_FIELDS, user_auth=True,
        )
        return self._data(route, body), _Includes().add(body.get("includes"))

    def _pages(self, route: str, method: Callable[..., Any], since_id: str | None, *args: Any,
               stop_at: str | None = None, **params: Any) -> tuple[list[dict[str, Any]], _Includes]:
        """Every item newer than ``since_id`` (newest first on X), oldest first.

        ``since_id is None`` (first start): the newest page only, never the whole history.
        ``stop_at``: for endpoints without ``since_id`` (DM events), page until that id.
        """
        items: list[dict[str, Any]] = []
        includes = _Includes()
        token = None
        since = _since(since_id)
        for _ in range(MAX_PAGES):
            query = dict(params, max_results=PAGE if since_id is not None else FIRST_PAGE)
            if since and stop_at is None:
                query["since_id"] = since
            if token:
                query["pagination_token"] = token
            body = self._call(route, method, *args, **query)
            # An item without an id could not move a cursor: none of X's, but it must not stop a poll.
            page = [item for item in body.get("data") or [] if listed_id(item) is not None]
            includes.add(body.get("includes"))
            if stop_at is not None and since:
                fresh = [item for item in page if _by_id(str(item["id"])) > _by_id(since)]
                items.extend(fresh)
                if len(fresh) < len(page):
                    break
            else:
                items.extend(page)
            token = (body.get("meta") or {}).get("next_token")
            if not token or since_id is None or not page:
                break
        else:
            # Newest first: what lies beyond the last page is older than everything listed, and
            # the cursor moves past it. After a long outage that can be requests (a takedown by
            # DM): say so, where an operator looks.
            log.warning("backlog_truncated", extra={"route": route, "listed": len(items), "pages": MAX_PAGES})
        items.sort(key=lambda item: _by_id(str(item["id"])))
        return items, includes

    def mentions_since(self, since_id: str | None) -> list[Event]:
        """Mentions of the bot newer than ``since_id``, oldest first.

        Retweets of a tweet that mentions the bot are listed too, marked ``skip``: nobody asked
        anything, but the cursor must move past them, or a first page of nothing but retweets
        would start the channel at "0" and have the next poll answer the whole history.
        """
        me = self.me()
        tweets, includes = self._pages(
            "GET /2/users/:id/mentions", self.client.get_users_mentions, since_id, me.id,
            expansions=EXPANSIONS, tweet_fields=TWEET_FIELDS, media_fields=MEDIA_FIELDS,
            user_fields=USER_FIELDS, user_auth=True,
        )
        def read(tweet: dict[str, Any]) -> Event:
            return Event("mention", str(tweet["id"]), self.parse_tweet(tweet, includes), skip=self._retweet(tweet))
        return read_events(tweets, read, "mention", log)

    def dms_since(self, since_id: str | None) -> list[Event]:
        """Direct messages to (and from) the bot newer than ``since_id``, oldest first.

        The bot's own messages, and messages in group conversations the bot was added to, are
        returned too, the latter marked ``skip``: the listener answers neither and moves its
        cursor past both, so they are not fetched again on every poll.
        """
        me = self.me().id
        events, includes = self._pages(
            "GET /2/dm_events", self.client.get_direct_message_events, since_id, stop_at=since_id,
            event_types="MessageCreate", dm_event_fields=DM_FIELDS, expansions=["sender_id"],
            user_fields=USER_FIELDS, user_auth=True,
        )
        def read(message: dict[str, Any]) -> Event:
            return Event("mention", str(message["id"]), self.parse_dm(message, includes), skip=not _one_to_one(message, me))
        return read_events([e for e in events if e.get("event_type", "MessageCreate") == "MessageCreate"], read, "mention", log)

    def _get_dm(self, event_id: str) -> Post:
        params = {"dm_event.fields": ",".join(DM_FIELDS), "expansions": "sender_id", "user.fields": ",".join(USER_FIELDS)}
        body = None
        try:
            body = self._http("GET", f"/2/dm_events/{event_id}", params=params)
        except (RateLimited, ServerError):
            raise
        except PlatformError:
            pass  # lookup by id refused or unknown here: look through the recent events instead
        if body is not None:
            # X's answer that the event does not exist is final (NotFound): paging through the
            # inbox for it spent the budget the DM poll, which brings takedowns, lives on.
            return self.parse_dm(self._data("GET /2/dm_events/:id", body), _Includes().add(body.get("includes")))
        token = None
        for _ in range(5):
            query: dict[str, Any] = dict(event_types="MessageCreate", dm_event_fields=DM_FIELDS, expansions=["sender_id"],
                                         user_fields=USER_FIELDS, max_results=PAGE, user_auth=True)
            if token:
                query["pagination_token"] = token
            body = self._call("GET /2/dm_events", self.client.get_direct_message_events, **query)
            for event in body.get("data") or []:
                if str(event.get("id")) == event_id:
                    return self.parse_dm(event, _Includes().add(body.get("includes")))
            token = (body.get("meta") or {}).get("next_token")
            if not token:
                break
        raise NotFound(f"direct message {event_id} not found", 404)

    # -- streaming --------------------------------------------------------------------------

    def _rule(self, channel: str) -> str:
        me = self.me().acct
        if channel == "mentions":
            return f"@{me} -from:{me} -is:retweet"
        raise ValueError(f"unknown channel {channel!r}")

    def _ensure_rule(self, channel: str) -> None:
        """One filtered-stream rule per channel, tagged ``ppb:<channel>``."""
        tag, value = f"ppb:{channel}", self._rule(channel)
        path = "/2/tweets/search/stream/rules"
        rules = self._http("GET", path, bearer=True).get("data") or []
        stale = [r["id"] for r in rules if r.get("tag") == tag and r.get("value") != value]
        if stale:
            self._http("POST", path, bearer=True, json={"delete": {"ids": stale}})
        if not any(r.get("tag") == tag and r.get("value") == value for r in rules):
            body = self._http("POST", path, bearer=True, json={"add": [{"value": value, "tag": tag}]})
            errors = [e for e in body.get("errors") or [] if "Duplicate" not in str(e.get("title", ""))]
            if errors and not body.get("data"):
                raise StreamUnavailable(f"stream rule refused: {errors[0].get('title') or errors[0]}")

    def stream(self, channel: str) -> Iterator[Event | None]:
        """Tweets of one channel from the filtered stream; ``None`` for each keep-alive (X sends
        one every 20 s) and for another channel's tweet, so the listener can check its stop flag.

        X offers no DM stream in API v2, and the filtered stream needs a paid tier (lower tiers
        get 403 ``client-not-enrolled``); both raise ``StreamUnavailable``, and so does a
        dropped or ended stream. Each channel opens its own connection: where the tier allows
        only one, the second channel is refused (429) and polls.
        """
        if channel == "dms":
            raise StreamUnavailable("X API v2 has no stream of direct messages")
        try:
            self._ensure_rule(channel)
        except StreamUnavailable:
            raise
        except PlatformError as exc:
            raise StreamUnavailable(f"stream rules refused: {exc}", exc.status) from None
        params = {
            "expansions": ",".join(EXPANSIONS), "tweet.fields": ",".join(TWEET_FIELDS),
            "media.fields": ",".join(MEDIA_FIELDS), "user.fields": ",".join(USER_FIELDS),
        }
        try:
            response = self.session.get(
                API + "/2/tweets/search/stream", params=params, stream=True,
                timeout=(self.timeout_s, 90),  # X sends a keep-alive newline every 20 s
                headers={"Authorization": f"Bearer {self.bearer_token}"},
            )
        except requests.RequestException as exc:
            raise StreamUnavailable(f"streaming connection failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            detail = self._problem(response)
            response.close()
            raise StreamUnavailable(f"streaming refused: HTTP {response.status_code} {detail}", response.status_code)
        tag = f"ppb:{channel}"
        try:
            for line in response.iter_lines():
                if not line or not line.strip():
                    yield None  # keep-alive
                    continue
                payload = json.loads(line)
                if not payload.get("data"):
                    if payload.get("errors"):
                        raise StreamUnavailable(f"stream error: {self._problem_of(payload)}")
                    continue
                if tag not in {r.get("tag") for r in payload.get("matching_rules", []) or []}:
                    yield None  # another channel's tweet on the same app's stream
                    continue
                yield read_event(payload["data"], lambda tweet: Event(
                    "mention", str(tweet["id"]), self.parse_tweet(tweet, _Includes().add(payload.get("includes")))), "mention", log)
        except (requests.RequestException, ValueError) as exc:
            raise StreamUnavailable(f"stream dropped: {type(exc).__name__}") from None
        finally:
            response.close()
        raise StreamUnavailable("stream ended")

    @staticmethod
    def _problem_of(payload: dict[str, Any]) -> str:
        error = (payload.get("errors") or [{}])[0]
        return str(error.get("title") or error.get("detail") or error)[:200]

    # -- writing ----------------------------------------------------------------------------

    def upload_image(self, data: bytes, mime: str, description: str) -> str:
        """A local handle; the upload itself happens in ``reply()`` (see the module docstring)."""
        now = time.time()
        handle = f"pending:{uuid.uuid4().hex}"
        with self._lock:
            for key in [k for k, p in self._pending.items() if now - p.created > PENDING_TTL_S]:
                del self._pending[key]  # a job that died between upload and reply
            self._pending[handle] = _Pending(data, mime, description, now)
        return handle

    def _upload(self, item: _Pending, category: str, sensitive: bool = False) -> str:
        """``POST /2/media/upload`` (one request: images are small) and its metadata."""
        extension = "png" if item.mime == "image/png" else "jpg"
        body = self._http(
            "POST", "/2/media/upload",
            files={"media": (f"anonymised.{extension}", item.data, item.mime)},
            data={"media_category": category, "media_type": item.mime},
            timeout=max(self.timeout_s, 60),
        )
        data = body.get("data") or body
        media_id = str(data.get("id") or data.get("media_id_string") or "")
        if not media_id:
            raise ServerError("the media upload answered without a media id")
        state = (data.get("processing_info") or {}).get("state")
        deadline = time.time() + 60
        while state in ("pending", "in_progress"):
            if time.time() > deadline:
                raise ServerError("media processing did not finish in 60 s")
            time.sleep(float((data.get("processing_info") or {}).get("check_after_secs") or 1))
            data = self._http("GET", "/2/media/upload", params={"command": "STATUS", "media_id": media_id}).get("data") or {}
            state = (data.get("processing_info") or {}).get("state")
        if state == "failed":
            raise PlatformError("X could not process the uploaded image")
        metadata: dict[str, Any] = {"alt_text": {"text": item.description[:ALT_TEXT_LIMIT]}}
        if sensitive:
            metadata["sensitive_media_warning"] = {"other": True}
        try:
            self._http("POST", "/2/media/metadata", json={"id": media_id, "metadata": metadata})
        except PlatformError:
            if category == "tweet_image" or sensitive:
                # a public image without its alt text is not posted, nor a sensitive one, in a
                # tweet or a DM, without its warning
                raise
            log.warning("dm_alt_text_failed", extra={"media_id": media_id})
        return media_id

    def _take_pending(self, media_ids: list[str]) -> list[_Pending | str]:
        with self._lock:
            return [self._pending.pop(m) if m in self._pending else m for m in media_ids]

    def _put_back(self, media_ids: list[str], items: list[_Pending | str]) -> None:
        """Undo ``_take_pending`` for a reply X refused, so the same handles can go by DM."""
        with self._lock:
            for handle, item in zip(media_ids, items):
                if isinstance(item, _Pending):
                    self._pending[handle] = item

    def media_limits(self) -> MediaLimits:
        return MediaLimits(max_bytes=IMAGE_BYTES)

    def reply(self, draft: ReplyDraft) -> Post:
        items = self._take_pending(draft.media_ids)  # the bytes go out of memory with this call
        if draft.visibility == "direct":
            to = draft.in_reply_to.account
            text = draft.text
            if text.startswith(f"@{to.acct} "):
                text = text[len(to.acct) + 2:]
            return self._send_dms(to, with_cw(text, draft.spoiler_text), items, draft.idempotency_key, draft.sensitive)
        try:
            return self._tweet_reply(draft, items)
        except RepliesClosed:
            # The caller may send this answer by DM instead: keep the images' bytes for it (their
            # tweet_image uploads cannot be attached to a DM, which needs dm_image).
            self._put_back(draft.media_ids, items)
            raise

    def own_reply(self, in_reply_to_id: str, with_media: bool) -> Post | None:
        """The bot's tweet answering ``in_reply_to_id`` (with images or without), if it posted
        one: its newest tweets since that post, up to ``OWN_TWEET_PAGES`` pages. (A copy sent
        by DM is not looked for.)"""
        return self._own_reply(in_reply_to_id, None, with_media)

    def _own_reply(self, in_reply_to_id: str, code: str | None, with_media: bool | None = None) -> Post | None:
        """The bot's tweet answering ``in_reply_to_id`` that carries ``code`` (any, for None) and
        has images or not as ``with_media`` says (either, for None), if any."""
        me = self.me()
        token = None
        for _ in range(OWN_TWEET_PAGES):
            query: dict[str, Any] = dict(since_id=in_reply_to_id, max_results=PAGE, tweet_fields=TWEET_FIELDS, user_auth=True)
            if token:
                query["pagination_token"] = token
            body = self._call("GET /2/users/:id/tweets", self.client.get_users_tweets, me.id, **query)
            for tweet in body.get("data") or []:
                referenced = {(r.get("type"), str(r.get("id"))) for r in tweet.get("referenced_tweets", []) or []}
                text = (tweet.get("note_tweet") or {}).get("text") or tweet.get("text", "")
                has_media = bool((tweet.get("attachments") or {}).get("media_keys"))
                if (("replied_to", in_reply_to_id) in referenced
                        and (code is None or marker_line(code).strip() in text)
                        and (with_media is None or has_media == with_media)):
                    includes = _Includes()
                    includes.users[me.id] = {"id": me.id, "username": me.acct, "protected": me.locked}
                    return self.parse_tweet(dict(tweet, author_id=me.id), includes)
            token = (body.get("meta") or {}).get("next_token")
            if not token:
                return None
        return None

    def _tweet_reply(self, draft: ReplyDraft, items: list[_Pending | str]) -> Post:
        code = marker(draft.idempotency_key)
        target = draft.in_reply_to.id
        self._check_budget("POST /2/tweets")  # before the look-up and the uploads it would waste
        if code:
            existing = self._own_reply(target, code)
            if existing is not None:
                log.info("reply_exists", extra={"reply_id": existing.id, "in_reply_to": target})
                return existing
        text = fit(with_cw(draft.text, draft.spoiler_text), code, TWEET_LIMIT)
        media_ids = [i if isinstance(i, str) else self._upload(i, "tweet_image", draft.sensitive) for i in items]
        try:
            body = self._call(
                "POST /2/tweets", self.client.create_tweet, text=text, in_reply_to_tweet_id=target,
                media_ids=media_ids or None, user_auth=True,
            )
        except PlatformError as exc:
            if exc.status == 403 and "reply to this conversation is not allowed" in str(exc).lower():
                # The conversation's first tweet limits who may reply ("Who can reply?": accounts
                # its author mentions, follows, or verified ones), and the bot is not among them.
                raise RepliesClosed(f"POST /2/tweets: replies in the conversation of {target} are limited", 403) from None
            if exc.status == 403 and "deleted or not visible" in str(exc):
                # X's answer to a reply whose tweet is gone (or hidden): what NotFound means here.
                raise NotFound(f"POST /2/tweets: the tweet {target} is deleted or not visible", 403) from None
            if exc.status == 403 and "duplicate" in str(exc).lower() and code:
                # X refuses the same text twice: an earlier attempt did post, though the timeline
                # did not show it yet. Look again; if still hidden, retry the job later.
                existing = self._own_reply(target, code)
                if existing is not None:
                    return existing
                raise ServerError("X reports this reply as a duplicate but does not show it yet", 403) from None
            raise
        data = self._data("POST /2/tweets", body)
        me = self.me()
        url = f"https://x.com/{me.acct}/status/{data['id']}"
        return Post(
            id=str(data["id"]), account=me, text=data.get("text", text), visibility="public",
            in_reply_to_id=target, url=url, uri=url,
        )

    def _sent_dms(self, participant_id: str) -> list[dict[str, Any]]:
        """The recent messages of the bot's one-to-one conversation with ``participant_id``."""
        body = self._call(
            "GET /2/dm_conversations/with/:id/dm_events", self.client.get_direct_message_events,
            participant_id=participant_id, event_types="MessageCreate", dm_event_fields=DM_FIELDS,
            max_results=PAGE, user_auth=True,
        )
        me = self.me().id
        return [e for e in body.get("data") or [] if str(e.get("sender_id")) == me]

    def _send_dms(self, to: Account, text: str, items: list[_Pending | str], key: str, sensitive: bool = False) -> Post:
        """One DM per image (X allows one attachment per message), the text with the first;
        a sensitive original's images keep their warning in a DM as in a tweet."""
        parts: list[tuple[str, _Pending | str | None]] = [(text, items[0] if items else None)]
        parts += [(f"Image {n} of {len(items)}.", item) for n, item in enumerate(items[1:], start=2)]
        codes = [marker(f"{key}#{n}") if key else "" for n in range(len(parts))]
        self._check_budget("POST /2/dm_conversations/with/:id/messages")
        sent = self._sent_dms(to.id) if key else []
        earlier = [next((e for e in sent if code and marker_line(code).strip() in e.get("text", "")), None) for code in codes]
        # Every image is uploaded (with its warning) before the first message goes: an upload
        # failing after some messages went left a copy partly sent and never recorded, which no
        # takedown could find.
        media_ids: list[str | None] = []
        for (_, item), found in zip(parts, earlier):
            if isinstance(item, _Pending) and found is None:
                media_ids.append(self._upload(item, "dm_image", sensitive))
            else:
                media_ids.append(item if isinstance(item, str) else None)
        ids: list[str] = []
        for (part, _), code, found, media_id in zip(parts, codes, earlier, media_ids):
            if found is not None:
                ids.append(str(found["id"]))
                continue
            message = part[: DM_LIMIT - 20] + marker_line(code)
            try:
                body = self._call(
                    "POST /2/dm_conversations/with/:id/messages", self.client.create_direct_message,
                    participant_id=to.id, text=message, media_id=media_id, user_auth=True,
                )
            except PlatformError as exc:
                if exc.retryable or exc.status != 403:
                    raise
                raise MessagesRefused(f"@{to.acct} takes no direct messages from the bot", 403) from None
            ids.append(str(self._data("POST /2/dm_conversations/with/:id/messages", body)["dm_event_id"]))
        # Every message's id: a takedown of a copy sent as several must delete them all.
        return Post(id="dm:" + DM_JOIN.join(ids), account=self.me(), text=text, visibility="direct")

    def direct_message(self, to: Account, text: str, in_reply_to: Post | None = None, idempotency_key: str = "") -> Post:
        return self._send_dms(to, text, [], idempotency_key)

    def delete_post(self, post_id: str) -> bool:
        if post_id.startswith("dm:"):
            # X removes a deleted DM from the bot's side of the conversation only. A copy sent as
            # several messages is gone once none of them is left.
            event_ids = post_id[3:].split(DM_JOIN)
            gone = 0
            for event_id in event_ids:
                try:
                    self._http("DELETE", f"/2/dm_events/{event_id}")
                except NotFound:
                    gone += 1
            if gone == len(event_ids):
                raise NotFound(f"direct messages {post_id} not found", 404)
            return False
        self._call("DELETE /2/tweets/:id", self.client.delete_tweet, post_id, user_auth=True)
        return True

    def post_id_from_reference(self, reference: str) -> str | None:
        reference = reference.strip().rstrip(".,;:!?)>")
        if is_decimal(reference):
            return reference if re.fullmatch(_TWEET_ID, reference) else None
        parsed = web_link(reference)
        if parsed is None or (parsed.hostname or "").lower() not in HOSTS:
            return None
        match = _STATUS_PATH.match(parsed.path)
        return match.group(1) if match else None
