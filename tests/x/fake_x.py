"""X's HTTP API v2, faked in-process at the HTTP boundary with ``responses``.

The JSON is shaped like X's: ``data`` / ``includes`` (users, media) / ``meta`` (``result_count``,
``newest_id``, ``oldest_id``, ``next_token``), problems with ``title``/``detail``/``type``,
lookups of missing resources answered 200 with an ``errors`` array, ``x-rate-limit-*``
headers on every answer, a tweet's t.co links in ``entities.urls`` but a DM event's at its top
level (``urls``, ``mentions``, ``hashtags``, as X's DmEvent schema has them, for the
``entities`` field), a post shared into a DM as the event's ``referenced_tweets``, and the refusals X is known for
(duplicate text 403, the filtered stream's 403 ``client-not-enrolled`` on lower tiers, one
attachment per DM, DM media uploaded with ``media_category=dm_image``, a reply in a conversation
whose first tweet's ``reply_settings`` leave the bot out). Both API hosts are
served (tweepy 4.17 calls api.twitter.com, the bot's own requests go to api.x.com), and
photos are served from ``pbs.twimg.com``.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import responses

API = re.compile(r"https://api\.(?:x|twitter)\.com/2/.*")
PHOTOS = re.compile(r"https://pbs\.twimg\.com/media/.*")
BEARER = "test-bearer-token"
#: edits X allows of one post
MAX_EDITS = 5
KEYS = dict(api_key="test-consumer-key", api_secret="test-consumer-secret",
            access_token="1-test-access-token", access_token_secret="test-access-secret")
#: routes that take app-only auth (the bearer token); every other one takes OAuth 1.0a
APP_ONLY = ("/2/tweets/search/stream",)
#: X's 403 to a reply in a conversation whose first tweet limits who may reply
REPLIES_LIMITED = ("Reply to this conversation is not allowed because you have not been mentioned or otherwise "
                   "engaged by the author of the post you are replying to.")


def problem(status: int, title: str, detail: str, kind: str = "about:blank", **extra: Any) -> dict[str, Any]:
    return {"title": title, "detail": detail, "type": kind, "status": status, **extra}


CLIENT_NOT_ENROLLED = problem(
    403, "Client Forbidden",
    "When authenticating requests to the Twitter API v2 endpoints, you must use keys and tokens from a "
    "Twitter developer App that is attached to a Project. You can create a project via the developer portal.",
    "https://api.twitter.com/2/problems/client-forbidden",
    reason="client-not-enrolled", registration_url="https://developer.twitter.com/en/docs/projects/overview",
    required_enrollment="Appropriate Level of API Access", client_id="12345",
)


@dataclass
class Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class FakeX:
    """State of a tiny X: users, tweets, media, DMs; and everything the bot sent it."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.mock = mock
        self._ids = itertools.count(1_890_000_000_000_000_000, 1_000)
        self.users: dict[str, dict[str, Any]] = {}
        self.tweets: dict[str, dict[str, Any]] = {}
        self.media: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.dms: list[dict[str, Any]] = []
        self.groups: dict[str, set[str]] = {}  # group conversation id -> member ids
        self.uploads: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self.rules: list[dict[str, str]] = []
        self.log: list[tuple[str, str]] = []  # (method, path) of every API request
        self.photo_requests: list[str] = []
        self.deleted: list[str] = []
        self.deleted_dms: list[str] = []
        self.failures: dict[str, list[Failure]] = {}
        #: "basic": the filtered stream and its rules answer 403; "rules-only": the rules work but
        #: the stream answers 403; "pro": both work
        self.tier = "basic"
        self.stream_lines: list[str] = []  # ids of tweets the next stream connection delivers
        #: the newest N of the bot's tweets are not yet listed on its timeline (eventual consistency)
        self.timeline_lag = 0
        #: tweets the mentions timeline does not list yet (X's timelines are eventually consistent)
        self.unlisted: set[str] = set()
        #: protected users the bot does not follow: their tweets answer "Authorization Error"
        self.hidden_from_bot: set[str] = set()
        self.follows: dict[str, set[str]] = {}  # user id -> the ids of the users they follow
        self.bot = self.add_user("protestbot", name="Protest privacy bot")
        for method in ("GET", "POST", "DELETE"):
            mock.add_callback(method, API, callback=self._dispatch)
        mock.add_callback("GET", PHOTOS, callback=self._photo)

    # -- building the world -----------------------------------------------------------------

    def new_id(self) -> str:
        return str(next(self._ids))

    def add_user(self, username: str, name: str = "", description: str = "", protected: bool = False,
                 bot_follows: bool = True, withheld_in: list[str] = ()) -> dict[str, Any]:
        """A user; a protected one's tweets are readable by the bot only if ``bot_follows``;
        ``withheld_in``: the countries where X withholds the whole account (its ``withheld``
        field), whose tweets the API still serves, without a ``withheld`` of their own."""
        user = {"id": self.new_id(), "username": username, "name": name or username.title(),
                "description": description, "protected": protected}
        if withheld_in:
            user["withheld"] = {"country_codes": list(withheld_in)}
        if not bot_follows:
            self.hidden_from_bot.add(user["id"])
        self.users[user["id"]] = user
        return user

    def photo(self, data: bytes, alt_text: str = "") -> str:
        """A photo as X stores it; returns its media key."""
        media_id = self.new_id()
        key = f"3_{media_id}"
        url = f"https://pbs.twimg.com/media/F{media_id[-8:]}x.jpg"
        self.media[key] = {"media_key": key, "type": "photo", "url": url, "width": 512, "height": 512,
                           **({"alt_text": alt_text} if alt_text else {})}
        self.files[url] = data
        return key

    def video(self) -> str:
        key = f"7_{self.new_id()}"
        self.media[key] = {"media_key": key, "type": "video", "preview_image_url": "https://pbs.twimg.com/x.jpg"}
        return key

    def tweet(self, author: dict[str, Any], text: str, media: list[str] = (), in_reply_to: dict[str, Any] | None = None,
              quote: dict[str, Any] | None = None, sensitive: bool = False, withheld_in: list[str] = (),
              reply_settings: str = "everyone") -> dict[str, Any]:
        """A tweet; ``withheld_in``: the countries where X withholds it (by a legal demand; "XY"
        for a copyright claim), which the API still serves it with a ``withheld`` field;
        ``reply_settings`` ("Who can reply?": "everyone", "mentionedUsers", "following",
        "verified") counts for the whole conversation when the tweet starts one."""
        tweet_id = self.new_id()
        tweet: dict[str, Any] = {
            "id": tweet_id, "text": text, "author_id": author["id"], "edit_history_tweet_ids": [tweet_id],
            "conversation_id": in_reply_to["conversation_id"] if in_reply_to else tweet_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "possibly_sensitive": sensitive,
            "entities": self._entities(text), "reply_settings": reply_settings,
        }
        if media:
            short = f"https://t.co/m{tweet_id[-6:]}"
            tweet["text"] = f"{text} {short}"
            tweet["attachments"] = {"media_keys": list(media)}
            tweet["entities"].setdefault("urls", []).append({
                "start": len(text) + 1, "end": len(text) + 1 + len(short), "url": short,
                "expanded_url": f"https://x.com/{author['username']}/status/{tweet_id}/photo/1",
                "display_url": "pic.x.com/abcdef", "media_key": media[0]})
        if withheld_in:
            tweet["withheld"] = {"copyright": "XY" in withheld_in, "country_codes": list(withheld_in), "scope": "tweet"}
        referenced = []
        if in_reply_to:
            referenced.append({"type": "replied_to", "id": in_reply_to["id"]})
            tweet["in_reply_to_user_id"] = in_reply_to["author_id"]
        if quote:
            referenced.append({"type": "quoted", "id": quote["id"]})
        if referenced:
            tweet["referenced_tweets"] = referenced
        self.tweets[tweet_id] = tweet
        return tweet

    def edit(self, tweet: dict[str, Any], text: str, media: list[str] | None = None) -> dict[str, Any]:
        """The author's edit of ``tweet`` (the latest version of its chain): a new tweet, as X
        makes one, whose id ends every version's ``edit_history_tweet_ids`` (oldest first);
        each earlier version still answers its own lookup with its own text and media. A photo
        kept through the edit keeps its media key (an assumption: X documents none).

        As X documents (docs.x.com, "Edit posts"), a post is edited at most 5 times, and
        replies to others and reposts cannot be edited at all; the fake refuses those edits
        rather than build a world X never shows. (The 30-minute window is not modelled.)"""
        chain = list(tweet["edit_history_tweet_ids"])
        assert chain[-1] == tweet["id"], "only the latest version can be edited"
        assert len(chain) <= MAX_EDITS, f"X allows {MAX_EDITS} edits of a post"
        author = self.users[tweet["author_id"]]
        references = {r["type"]: r["id"] for r in tweet.get("referenced_tweets", [])}
        assert "retweeted" not in references, "a repost cannot be edited"
        in_reply_to = self.tweets[references["replied_to"]] if "replied_to" in references else None
        assert in_reply_to is None or in_reply_to["author_id"] == author["id"], "X edits no reply to someone else"
        keys = (tweet.get("attachments") or {}).get("media_keys", []) if media is None else media
        latest = self.tweet(author, text, media=keys, in_reply_to=in_reply_to, sensitive=tweet["possibly_sensitive"],
                            reply_settings=tweet.get("reply_settings", "everyone"))
        latest["conversation_id"] = tweet["conversation_id"]
        for version in [*chain, latest["id"]]:
            self.tweets[version]["edit_history_tweet_ids"] = [*chain, latest["id"]]
        return latest

    def retweet(self, user: dict[str, Any], tweet: dict[str, Any]) -> dict[str, Any]:
        """``user``'s retweet of ``tweet``: "RT @author: text", mentioning whom the tweet does,
        so the mentions timeline lists it (X's tweet lookup shape for a retweet)."""
        retweet = self.tweet(user, f"RT @{self.users[tweet['author_id']]['username']}: {tweet['text']}")
        retweet["referenced_tweets"] = [{"type": "retweeted", "id": tweet["id"]}]
        return retweet

    def follow(self, follower: dict[str, Any], followed: dict[str, Any]) -> None:
        self.follows.setdefault(follower["id"], set()).add(followed["id"])

    def _entities(self, text: str) -> dict[str, Any]:
        entities: dict[str, Any] = {}
        for match in re.finditer(r"@(\w{1,15})", text):
            user = next((u for u in self.users.values() if u["username"].lower() == match.group(1).lower()), None)
            if user:
                entities.setdefault("mentions", []).append(
                    {"start": match.start(), "end": match.end(), "username": user["username"], "id": user["id"]})
        for match in re.finditer(r"#(\w+)", text):
            entities.setdefault("hashtags", []).append({"start": match.start(), "end": match.end(), "tag": match.group(1)})
        return entities

    def dm(self, sender: dict[str, Any], text: str, links: dict[str, str] | None = None, to: dict[str, Any] | None = None,
           media: list[str] = (), group: str = "", shares: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """A direct message; ``links`` maps t.co links in ``text`` to what they expand to;
        ``media`` are media keys of photos attached to it; ``group``: sent to that group
        conversation (see :meth:`group`) instead of the one-to-one conversation with ``to``;
        ``shares`` are tweets shared into it (each a t.co link at the end of the text, and a
        ``referenced_tweets`` entry).

        Its entities stand at the top level of the event, not under ``entities`` as in a tweet
        (docs.x.com/x-api/direct-messages/get-dm-events-by-id; X's SDK's DmEvent schema)."""
        to = to or self.bot
        if group:
            assert sender["id"] in self.groups[group], "only a member writes in a group"
        links = dict(links or {})
        for tweet in shares:
            short = f"https://t.co/s{tweet['id'][-8:]}"
            text = f"{text} {short}".strip()
            links[short] = f"https://x.com/{self.users[tweet['author_id']]['username']}/status/{tweet['id']}"
        event = {
            "id": self.new_id(), "event_type": "MessageCreate", "text": text, "sender_id": sender["id"],
            "dm_conversation_id": group or self.conversation(sender["id"], to["id"]),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            **self._entities(text),
        }
        if media:
            event["attachments"] = {"media_keys": list(media)}
        if links:
            event["urls"] = [
                {"start": text.index(short), "end": text.index(short) + len(short), "url": short,
                 "expanded_url": long, "display_url": long.split("://", 1)[1][:25]}
                for short, long in links.items()]
        if shares:
            event["referenced_tweets"] = [{"id": tweet["id"]} for tweet in shares]
        self.dms.append(event)
        return event

    @staticmethod
    def conversation(a: str, b: str) -> str:
        """A one-to-one conversation's id: the two user ids joined by "-", the smaller first."""
        return "-".join(sorted((a, b), key=int))

    def group(self, *members: dict[str, Any]) -> str:
        """A group conversation of ``members`` and the bot (one of them added it), as
        ``POST /2/dm_conversations`` makes one: an id of its own, not made of user ids. Its
        messages are listed by ``GET /2/dm_events`` with the one-to-one messages."""
        conversation = self.new_id()
        self.groups[conversation] = {self.bot["id"], *(m["id"] for m in members)}
        return conversation

    def fail(self, route: str, status: int, body: dict[str, Any], headers: dict[str, str] | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``route`` ("POST /2/tweets") with an error."""
        self.failures.setdefault(route, []).extend([Failure(status, body, headers or {})] * times)

    # -- what the bot did -------------------------------------------------------------------

    def bot_tweets(self) -> list[dict[str, Any]]:
        return [t for t in self.tweets.values() if t["author_id"] == self.bot["id"]]

    def replies_to(self, tweet_id: str) -> list[dict[str, Any]]:
        return [t for t in self.bot_tweets() if {"type": "replied_to", "id": tweet_id} in t.get("referenced_tweets", [])]

    def bot_dms(self, to: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [e for e in self.dms if e["sender_id"] == self.bot["id"]
                and (to is None or e["dm_conversation_id"] == self.conversation(self.bot["id"], to["id"]))]

    def media_of(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The uploads attached to a bot tweet or DM, each with ``data``, ``category``, ``alt_text``."""
        keys = (item.get("attachments") or {}).get("media_keys", [])
        return [dict(self.uploads[k.split("_", 1)[1]], alt_text=self.metadata.get(k.split("_", 1)[1], {}).get("alt_text", {}).get("text"),
                     metadata=self.metadata.get(k.split("_", 1)[1], {})) for k in keys]

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.log if m == method and re.fullmatch(pattern, p))

    # -- HTTP -------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json; charset=utf-8", "x-rate-limit-limit": "900",
                "x-rate-limit-remaining": "899", "x-rate-limit-reset": str(int(time.time()) + 900)}

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        return status, {**self._headers(), **(headers or {})}, json.dumps(body)

    def _photo(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        url = request.url
        self.photo_requests.append(url)
        data = self.files.get(url.split("?", 1)[0])
        if data is None:
            return 404, {}, b""
        return 200, {"content-type": "image/jpeg", "content-length": str(len(data))}, data

    def _dispatch(self, request: Any) -> tuple[int, dict[str, str], str]:
        parsed = urlparse(request.url)
        path, query = parsed.path, {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        method = request.method
        self.log.append((method, path))
        route = f"{method} {re.sub(r'/[0-9]{3,}[0-9-]*(?=/|$)', '/:id', path)}"
        auth = request.headers.get("Authorization", "")
        auth = auth.decode() if isinstance(auth, bytes) else auth  # requests_oauthlib may set bytes
        if path.startswith(APP_ONLY):
            if auth != f"Bearer {BEARER}":
                return self._answer(401, problem(401, "Unauthorized", "Unauthorized"))
        elif not (auth.startswith("OAuth ") and f'oauth_consumer_key="{KEYS["api_key"]}"' in auth
                  and 'oauth_token="1-test-access-token"' in auth and "oauth_signature=" in auth):
            return self._answer(401, problem(401, "Unauthorized", "Unauthorized"))
        pending = self.failures.get(route)
        if pending:
            failure = pending.pop(0)
            return self._answer(failure.status, failure.body, failure.headers)
        for pattern, handler in self._routes():
            match = re.fullmatch(pattern, f"{method} {path}")
            if match:
                return handler(request, query, *match.groups())
        return self._answer(404, {"errors": [{"message": "Sorry, that page does not exist", "code": 34}]})

    def _routes(self) -> list[tuple[str, Callable[..., tuple[int, dict[str, str], str]]]]:
        return [
            (r"GET /2/users/me", self._me),
            (r"GET /2/tweets/(\d+)", self._get_tweet),
            (r"GET /2/users/(\d+)/mentions", self._mentions),
            (r"GET /2/users/(\d+)/tweets", self._user_tweets),
            (r"GET /2/tweets/search/recent", self._search),
            (r"GET /2/tweets/search/stream", self._stream),
            (r"(GET|POST) /2/tweets/search/stream/rules", self._rules),
            (r"POST /2/tweets", self._create_tweet),
            (r"DELETE /2/tweets/(\d+)", self._delete_tweet),
            (r"GET /2/dm_events", self._dm_events),
            (r"GET /2/dm_events/(\d+)", self._dm_event),
            (r"DELETE /2/dm_events/(\d+)", self._delete_dm),
            (r"GET /2/dm_conversations/with/(\d+)/dm_events", self._conversation_events),
            (r"POST /2/dm_conversations/with/(\d+)/messages", self._send_dm),
            (r"POST /2/media/upload", self._upload),
            (r"POST /2/media/metadata", self._metadata),
        ]

    # -- reading ----------------------------------------------------------------------------

    def _includes(self, tweets: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        expansions = query.get("expansions", "").split(",")
        includes: dict[str, Any] = {}
        if "author_id" in expansions:
            authors = dict.fromkeys(t["author_id"] for t in tweets)
            includes["users"] = [self._user(self.users[a], query) for a in authors]
        if "attachments.media_keys" in expansions:
            keys = dict.fromkeys(k for t in tweets for k in (t.get("attachments") or {}).get("media_keys", []))
            if keys:
                includes["media"] = [self.media[k] for k in keys]
        return {k: v for k, v in includes.items() if v}

    @staticmethod
    def _user(user: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        fields = set(query.get("user.fields", "").split(",")) | {"id", "name", "username"}
        return {k: v for k, v in user.items() if k in fields}

    @staticmethod
    def _visible(tweet: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        """The tweet with the fields asked for: ``id``, ``text`` and ``edit_history_tweet_ids``
        always, the others only when named in ``tweet.fields``, as X answers."""
        fields = set(query.get("tweet.fields", "").split(",")) | {"id", "text", "edit_history_tweet_ids"}
        return {k: v for k, v in tweet.items() if k in fields}

    def _me(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        return self._answer(200, {"data": self._user(self.bot, query)})

    def _get_tweet(self, request: Any, query: dict[str, str], tweet_id: str) -> tuple[int, dict[str, str], str]:
        if not re.fullmatch(r"[0-9]{1,19}", tweet_id):  # the OpenAPI schema's TweetID
            return self._answer(400, {"errors": [{"parameters": {"id": [tweet_id]},
                                                  "message": f"The `id` query parameter value [{tweet_id}] does not match ^[0-9]{{1,19}}$"}],
                                      "title": "Invalid Request", "detail": "One or more parameters to your request was invalid.",
                                      "type": "https://api.twitter.com/2/problems/invalid-request"})
        tweet = self.tweets.get(tweet_id)
        if tweet is None:
            return self._answer(200, {"errors": [{
                "value": tweet_id, "detail": f"Could not find tweet with id: [{tweet_id}].", "title": "Not Found Error",
                "resource_type": "tweet", "parameter": "id", "resource_id": tweet_id,
                "type": "https://api.twitter.com/2/problems/resource-not-found"}]})
        if self.users[tweet["author_id"]]["protected"] and tweet["author_id"] in self.hidden_from_bot:
            return self._answer(200, {"errors": [{
                "value": tweet_id, "detail": f"Sorry, you are not authorized to see the Tweet with id: [{tweet_id}].",
                "title": "Authorization Error", "resource_type": "tweet", "parameter": "id", "resource_id": tweet_id,
                "type": "https://api.twitter.com/2/problems/not-authorized-for-resource"}]})
        body: dict[str, Any] = {"data": self._visible(tweet, query)}
        includes = self._includes([tweet], query)
        if includes:
            body["includes"] = includes
        return self._answer(200, body)

    def _timeline(self, tweets: list[dict[str, Any]], query: dict[str, str], lowest: int = 5) -> tuple[int, dict[str, str], str]:
        """Newest first, ``since_id``, ``max_results`` and ``pagination_token`` as X does them."""
        max_results = int(query.get("max_results", "10"))
        if not lowest <= max_results <= 100:
            return self._answer(400, {"errors": [{"parameters": {"max_results": [str(max_results)]},
                                                  "message": f"The `max_results` query parameter value [{max_results}] is not between {lowest} and 100"}],
                                      "title": "Invalid Request", "detail": "One or more parameters to your request was invalid.",
                                      "type": "https://api.twitter.com/2/problems/invalid-request"})
        since = query.get("since_id")
        if since is not None and not since.isdigit():
            return self._answer(400, problem(400, "Invalid Request", "since_id is invalid"))
        found = sorted((t for t in tweets if since is None or int(t["id"]) > int(since)), key=lambda t: int(t["id"]), reverse=True)
        start = int(query.get("pagination_token", "0") or 0)
        page = found[start:start + max_results]
        meta: dict[str, Any] = {"result_count": len(page)}
        if page:
            meta.update(newest_id=page[0]["id"], oldest_id=page[-1]["id"])
        if start + max_results < len(found):
            meta["next_token"] = str(start + max_results)
        body: dict[str, Any] = {"meta": meta}
        if page:
            body["data"] = [self._visible(t, query) for t in page]
            includes = self._includes(page, query)
            if includes:
                body["includes"] = includes
        return self._answer(200, body)

    def _mentions(self, request: Any, query: dict[str, str], user_id: str) -> tuple[int, dict[str, str], str]:
        user = self.users[user_id]
        mentioning = [t for t in self.tweets.values()
                      if any(m["id"] == user["id"] for m in t["entities"].get("mentions", [])) and t["author_id"] != user_id
                      and t["id"] not in self.unlisted]
        return self._timeline(mentioning, query)

    def _user_tweets(self, request: Any, query: dict[str, str], user_id: str) -> tuple[int, dict[str, str], str]:
        own = sorted((t for t in self.tweets.values() if t["author_id"] == user_id), key=lambda t: int(t["id"]))
        if self.timeline_lag:
            own = own[:-self.timeline_lag]
        return self._timeline(own, query)

    def _search(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        terms = query["query"].split()
        def matches(tweet: dict[str, Any]) -> bool:
            author = self.users[tweet["author_id"]]
            if author["protected"]:
                return False  # search only ever finds public tweets
            tags = {h["tag"].lower() for h in tweet["entities"].get("hashtags", [])}
            for term in terms:
                if term.startswith("#") and term[1:].lower() not in tags:
                    return False
                if term == "has:images" and not any(self.media[k]["type"] == "photo" for k in (tweet.get("attachments") or {}).get("media_keys", [])):
                    return False
                if term == "-is:retweet" and any(r["type"] == "retweeted" for r in tweet.get("referenced_tweets", [])):
                    return False
                if term.startswith("-from:") and author["username"].lower() == term[6:].lower():
                    return False
            return True
        return self._timeline([t for t in self.tweets.values() if matches(t)], query, lowest=10)

    def _stream(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        if self.tier != "pro":
            return self._answer(403, CLIENT_NOT_ENROLLED)
        lines = []
        for tweet_id in self.stream_lines:
            tweet = self.tweets[tweet_id]
            tags = [r for r in self.rules if self._rule_matches(r["value"], tweet)]
            if tags:
                payload = {"data": self._visible(tweet, query), "includes": self._includes([tweet], query),
                           "matching_rules": [{"id": r["id"], "tag": r["tag"]} for r in tags]}
                lines.append(json.dumps(payload))
            lines.append("")  # keep-alive
        self.stream_lines = []
        return 200, {"content-type": "application/json; charset=utf-8"}, "\r\n".join(lines) + "\r\n"

    def _rule_matches(self, value: str, tweet: dict[str, Any]) -> bool:
        author = self.users[tweet["author_id"]]
        for term in value.split():
            if term.startswith("@") and term[1:].lower() not in {m["username"].lower() for m in tweet["entities"].get("mentions", [])}:
                return False
            if term.startswith("#") and term[1:].lower() not in {h["tag"].lower() for h in tweet["entities"].get("hashtags", [])}:
                return False
            if term.startswith("-from:") and author["username"].lower() == term[6:].lower():
                return False
        return not author["protected"]

    def _rules(self, request: Any, query: dict[str, str], method: str) -> tuple[int, dict[str, str], str]:
        if self.tier == "basic":
            return self._answer(403, CLIENT_NOT_ENROLLED)
        if method == "GET":
            body: dict[str, Any] = {"meta": {"sent": "2025-01-01T00:00:00.000Z", "result_count": len(self.rules)}}
            if self.rules:
                body["data"] = self.rules
            return self._answer(200, body)
        payload = json.loads(request.body)
        created = []
        for rule in payload.get("add", []):
            if any(r["value"] == rule["value"] for r in self.rules):
                return self._answer(200, {"errors": [{"value": rule["value"], "id": "1", "title": "DuplicateRule",
                                                      "type": "https://api.twitter.com/2/problems/duplicate-rules"}],
                                          "meta": {"summary": {"created": 0, "not_created": 1}}})
            created.append({"id": self.new_id(), "value": rule["value"], "tag": rule.get("tag", "")})
        self.rules += created
        deleted = set((payload.get("delete") or {}).get("ids", []))
        self.rules = [r for r in self.rules if r["id"] not in deleted]
        return self._answer(201, {"data": created, "meta": {"summary": {"created": len(created), "valid": len(created)}}})

    def _dm_page(self, events: list[dict[str, Any]], query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        if "since_id" in query:
            return self._answer(400, problem(400, "Invalid Request", "since_id is not a valid parameter"))
        kinds = query.get("event_types")
        events = sorted((e for e in events if not kinds or e["event_type"] in kinds.split(",")), key=lambda e: int(e["id"]), reverse=True)
        max_results = int(query.get("max_results", "100"))
        start = int(query.get("pagination_token", "0") or 0)
        page = events[start:start + max_results]
        body: dict[str, Any] = {"meta": {"result_count": len(page)}}
        if start + max_results < len(events):
            body["meta"]["next_token"] = str(start + max_results)
        if page:
            body["data"] = [self._dm_fields(e, query) for e in page]
            if "sender_id" in query.get("expansions", ""):
                body["includes"] = {"users": [self._user(self.users[s], query) for s in dict.fromkeys(e["sender_id"] for e in page)]}
        return self._answer(200, body)

    @staticmethod
    def _dm_fields(event: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        """The event with the fields asked for: ``id``, ``event_type`` and ``text`` always;
        the ``entities`` field brings the top-level entity arrays."""
        fields = set(query.get("dm_event.fields", "").split(",")) | {"id", "event_type", "text"}
        if "entities" in fields:
            fields |= {"urls", "mentions", "hashtags", "cashtags"}
        return {k: v for k, v in event.items() if k in fields}

    def _dm_events(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        return self._dm_page(self.dms, query)

    def _conversation_events(self, request: Any, query: dict[str, str], participant: str) -> tuple[int, dict[str, str], str]:
        conversation = self.conversation(self.bot["id"], participant)
        return self._dm_page([e for e in self.dms if e["dm_conversation_id"] == conversation], query)

    def _dm_event(self, request: Any, query: dict[str, str], event_id: str) -> tuple[int, dict[str, str], str]:
        event = next((e for e in self.dms if e["id"] == event_id), None)
        if event is None:
            return self._answer(200, {"errors": [{"value": event_id, "detail": f"Could not find dm_event with id: [{event_id}].",
                                                  "title": "Not Found Error", "resource_type": "dm_event", "parameter": "event_id",
                                                  "resource_id": event_id, "type": "https://api.twitter.com/2/problems/resource-not-found"}]})
        body: dict[str, Any] = {"data": self._dm_fields(event, query)}
        if "sender_id" in query.get("expansions", ""):
            body["includes"] = {"users": [self._user(self.users[event["sender_id"]], query)]}
        return self._answer(200, body)

    # -- writing ----------------------------------------------------------------------------

    def _create_tweet(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        payload = json.loads(request.body)
        text = payload.get("text", "")
        if any(t["text"] == text for t in self.bot_tweets()):
            return self._answer(403, problem(403, "Forbidden", "You are not allowed to create a Tweet with duplicate content."))
        media_ids = (payload.get("media") or {}).get("media_ids", [])
        for media_id in media_ids:
            upload = self.uploads.get(media_id)
            if upload is None or upload["category"] != "tweet_image":
                return self._answer(400, {"errors": [{"message": f"Your media IDs are invalid: {media_id}"}],
                                          "title": "Invalid Request", "detail": "One or more parameters to your request was invalid.",
                                          "type": "https://api.twitter.com/2/problems/invalid-request"})
        if len(media_ids) > 4:
            return self._answer(400, problem(400, "Invalid Request", "too many media"))
        parent = self.tweets.get((payload.get("reply") or {}).get("in_reply_to_tweet_id", ""))
        if payload.get("reply") and parent is None:
            return self._answer(403, problem(403, "Forbidden", "You attempted to reply to a Tweet that is deleted or not visible to you."))
        if parent is not None and not self._invited(parent):
            # Since 23 Feb 2026 (@XDevelopers) self-serve tiers may reply only where the author
            # mentioned or quoted the replying account. The exact wording is not documented.
            return self._answer(403, problem(403, "Forbidden", "Reply to this conversation is not allowed: the author did not mention or quote you."))
        if parent is not None and not self._may_reply(self.tweets.get(parent["conversation_id"]), self.bot["id"]):
            return self._answer(403, problem(403, "Forbidden", REPLIES_LIMITED))
        tweet = self.tweet(self.bot, text, in_reply_to=parent)
        tweet["text"] = text  # no t.co for uploaded media in this fake: the text stays as sent
        if media_ids:
            tweet["attachments"] = {"media_keys": [f"3_{m}" for m in media_ids]}
            for media_id in media_ids:
                url = f"https://pbs.twimg.com/media/B{media_id[-8:]}x.jpg"
                self.media[f"3_{media_id}"] = {"media_key": f"3_{media_id}", "type": "photo", "url": url}
        return self._answer(201, {"data": {"id": tweet["id"], "text": text, "edit_history_tweet_ids": [tweet["id"]]}})

    def _invited(self, parent: dict[str, Any]) -> bool:
        """Whether ``parent``'s author mentioned the bot in it or quoted one of the bot's tweets."""
        if parent["author_id"] == self.bot["id"]:
            return True  # a thread of its own
        if any(m["id"] == self.bot["id"] for m in parent.get("entities", {}).get("mentions", [])):
            return True
        quoted = [r["id"] for r in parent.get("referenced_tweets", []) if r["type"] == "quoted"]
        return any(self.tweets.get(q, {}).get("author_id") == self.bot["id"] for q in quoted)

    def _may_reply(self, root: dict[str, Any] | None, user_id: str) -> bool:
        """Whether the conversation's first tweet (X reads its ``reply_settings``, not the
        replied-to tweet's) lets ``user_id`` reply: its author and the accounts it mentions
        always may; "following" adds the accounts its author follows, "verified" verified ones."""
        if root is None:
            return True  # a conversation whose first tweet is gone: not refused here
        setting = root.get("reply_settings", "everyone")
        if setting == "everyone" or root["author_id"] == user_id:
            return True
        if any(m["id"] == user_id for m in root["entities"].get("mentions", [])):
            return True
        if setting == "following":
            return user_id in self.follows.get(root["author_id"], set())
        if setting == "verified":
            return bool(self.users[user_id].get("verified"))
        return False

    def _delete_tweet(self, request: Any, query: dict[str, str], tweet_id: str) -> tuple[int, dict[str, str], str]:
        tweet = self.tweets.get(tweet_id)
        if tweet is None:
            return self._answer(404, problem(404, "Not Found Error", f"Could not find tweet with id: [{tweet_id}].",
                                             "https://api.twitter.com/2/problems/resource-not-found"))
        if tweet["author_id"] != self.bot["id"]:
            return self._answer(403, problem(403, "Forbidden", "You are not allowed to delete a Tweet that is not yours."))
        # X: deleting any version of an edited post deletes every version of it
        for version in tweet.get("edit_history_tweet_ids") or [tweet_id]:
            if self.tweets.pop(str(version), None) is not None:
                self.deleted.append(str(version))
        return self._answer(200, {"data": {"deleted": True}})

    def _send_dm(self, request: Any, query: dict[str, str], participant: str) -> tuple[int, dict[str, str], str]:
        payload = json.loads(request.body)
        attachments = payload.get("attachments") or []
        if len(attachments) > 1:
            return self._answer(400, problem(400, "Invalid Request", "Only one attachment is supported per message."))
        for attachment in attachments:
            upload = self.uploads.get(attachment["media_id"])
            if upload is None or upload["category"] != "dm_image":
                return self._answer(400, problem(400, "Invalid Request", f"Invalid media id {attachment['media_id']}"))
        if not payload.get("text") and not attachments:
            return self._answer(400, problem(400, "Invalid Request", "text or attachments required"))
        if participant not in self.users:
            return self._answer(400, problem(400, "Invalid Request", "unknown participant"))
        event = self.dm(self.bot, payload.get("text", ""), to=self.users[participant])
        if attachments:
            event["attachments"] = {"media_keys": [f"3_{a['media_id']}" for a in attachments]}
        return self._answer(201, {"data": {"dm_conversation_id": event["dm_conversation_id"], "dm_event_id": event["id"]}})

    def _delete_dm(self, request: Any, query: dict[str, str], event_id: str) -> tuple[int, dict[str, str], str]:
        event = next((e for e in self.dms if e["id"] == event_id), None)
        if event is None:
            return self._answer(404, problem(404, "Not Found Error", "no such event"))
        self.dms.remove(event)
        self.deleted_dms.append(event_id)
        return self._answer(200, {"data": {"deleted": True}})

    def _upload(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        content_type = request.headers.get("Content-Type", "")
        content_type = content_type.decode() if isinstance(content_type, bytes) else content_type
        if not content_type.startswith("multipart/form-data"):
            return self._answer(400, problem(400, "Invalid Request", "multipart/form-data expected"))
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True)
        if "media" not in fields or fields.get("media_category", b"").decode() not in ("tweet_image", "dm_image"):
            return self._answer(400, problem(400, "Invalid Request", "media and media_category are required"))
        if len(fields["media"]) > 5 * 1024 * 1024:  # X's limit on a photo, in tweets and DMs
            return self._answer(400, problem(400, "Invalid Request", "File size exceeds 5242880 bytes."))
        media_id = self.new_id()
        mime = fields.get("media_type", b"image/jpeg").decode()
        self.uploads[media_id] = {"data": fields["media"], "category": fields["media_category"].decode(), "mime": mime}
        return self._answer(200, {"data": {"id": media_id, "media_key": f"3_{media_id}", "size": len(fields["media"]),
                                           "expires_after_secs": 86400, "image": {"image_type": mime, "w": 512, "h": 512}}})

    def _metadata(self, request: Any, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        payload = json.loads(request.body)
        media_id = payload.get("id")
        if media_id not in self.uploads:
            return self._answer(400, problem(400, "Invalid Request", f"media id {media_id} not found"))
        alt = ((payload.get("metadata") or {}).get("alt_text") or {}).get("text", "")
        if len(alt) > 1000:
            return self._answer(400, problem(400, "Invalid Request", "alt text longer than 1000 characters"))
        self.metadata[media_id] = payload["metadata"]
        return self._answer(200, {"data": {"id": media_id, "associated_metadata": payload["metadata"]}})
