"""Mastodon's REST API, faked in-process with ``responses`` (the shared pipeline tests run the
same scenarios against it and against the fake X). Only what the bot calls: verify_credentials,
statuses (get, post with Idempotency-Key, delete), notifications with ``min_id``, ``types[]``,
``exclude_types[]`` and ``include_filtered`` (a direct message from an account the bot does not
follow is filtered, as Mastodon 4.3's default notification policy does), media upload, search;
media files are served from ``files.mastodon.example``."""

from __future__ import annotations

import html
import itertools
import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qs, urlparse

import responses

BASE = "https://mastodon.example"
TOKEN = "test-mastodon-token"
FILES = "https://files.mastodon.example"


class FakeMastodonHTTP:
    def __init__(self, mock: responses.RequestsMock) -> None:
        self._ids = itertools.count(110_000_000_000_000_000, 1_000)
        self.accounts: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.notifications: list[dict[str, Any]] = []
        #: ids of the notifications the bot's notification policy filtered
        self.filtered: set[str] = set()
        #: ids of the accounts the bot follows
        self.following: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.upload_data: dict[str, bytes] = {}
        self.idempotency: dict[str, str] = {}
        self.deleted: list[str] = []
        self.bot = self.add_account("protestbot", bot=True)
        for method in ("GET", "POST", "DELETE"):
            mock.add_callback(method, re.compile(re.escape(BASE) + r"/api/.*"), callback=self._dispatch)
        mock.add_callback("GET", re.compile(re.escape(FILES) + r"/.*"), callback=self._file)

    def new_id(self) -> str:
        return str(next(self._ids))

    def add_account(self, username: str, note: str = "", bot: bool = False, locked: bool = False) -> dict[str, Any]:
        account = {"id": self.new_id(), "username": username, "acct": username, "bot": bot, "locked": locked,
                   "note": f"<p>{html.escape(note)}</p>" if note else "", "url": f"{BASE}/@{username}"}
        self.accounts[account["id"]] = account
        return account

    def media(self, data: bytes) -> dict[str, Any]:
        media_id = self.new_id()
        url = f"{FILES}/media/{media_id}.jpg"
        self.files[url] = data
        return {"id": media_id, "type": "image", "url": url, "description": None}

    def status(self, account: dict[str, Any], text: str, media: list[dict[str, Any]] = (), in_reply_to: dict[str, Any] | None = None,
               visibility: str = "public", mentions: list[dict[str, Any]] = ()) -> dict[str, Any]:
        status_id = self.new_id()
        status = {
            "id": status_id, "account": account, "content": f"<p>{html.escape(text)}</p>", "visibility": visibility,
            "sensitive": False, "spoiler_text": "", "in_reply_to_id": in_reply_to["id"] if in_reply_to else None,
            "in_reply_to_account_id": in_reply_to["account"]["id"] if in_reply_to else None,
            "url": f"{BASE}/@{account['acct']}/{status_id}", "uri": f"{BASE}/users/{account['acct']}/statuses/{status_id}",
            "media_attachments": list(media), "mentions": [{"id": m["id"], "acct": m["acct"]} for m in mentions],
            "tags": [{"name": t.lower()} for t in re.findall(r"#(\w+)", text)],
        }
        self.statuses[status_id] = status
        if any(m["id"] == self.bot["id"] for m in mentions) and account["id"] != self.bot["id"]:
            notification = self.notify("mention", account, status)
            if self._filtered(status):
                self.filtered.add(notification["id"])
        return status

    def notify(self, kind: str, account: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
        """A notification of the bot's: ``mention``, ``favourite``, ``follow``..."""
        notification = {"id": self.new_id(), "type": kind, "account": account, "status": status}
        self.notifications.append(notification)
        return notification

    def _filtered(self, status: dict[str, Any]) -> bool:
        """Mastodon 4.3's default policy (``for_private_mentions: filter``): a private mention
        from an account the bot does not follow is filtered, unless it answers a thread in which
        the bot mentioned its sender."""
        sender = status["account"]["id"]
        if status["visibility"] != "direct" or sender in self.following:
            return False
        parent = self.statuses.get(status["in_reply_to_id"] or "")
        while parent is not None:
            if parent["account"]["id"] == self.bot["id"] and any(m["id"] == sender for m in parent["mentions"]):
                return False
            parent = self.statuses.get(parent["in_reply_to_id"] or "")
        return True

    def bot_statuses(self) -> list[dict[str, Any]]:
        return [s for s in self.statuses.values() if s["account"]["id"] == self.bot["id"]]

    # -- HTTP -------------------------------------------------------------------------------

    @staticmethod
    def _answer(status: int, body: Any) -> tuple[int, dict[str, str], str]:
        return status, {"content-type": "application/json", "X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "299"}, json.dumps(body)

    def _file(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        data = self.files.get(request.url)
        return (200, {"content-type": "image/jpeg"}, data) if data is not None else (404, {}, b"")

    def _dispatch(self, request: Any) -> tuple[int, dict[str, str], str]:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._answer(401, {"error": "The access token is invalid"})
        parsed = urlparse(request.url)
        path, query = parsed.path, parse_qs(parsed.query)
        key = f"{request.method} {path}"
        if key == "GET /api/v1/accounts/verify_credentials":
            return self._answer(200, self.bot)
        if match := re.fullmatch(r"GET /api/v1/statuses/(\d+)", key):
            status = self.statuses.get(match.group(1))
            return self._answer(200, status) if status else self._answer(404, {"error": "Record not found"})
        if match := re.fullmatch(r"GET /api/v1/statuses/(\d+)/context", key):
            return self._context(match.group(1))
        if match := re.fullmatch(r"DELETE /api/v1/statuses/(\d+)", key):
            status = self.statuses.pop(match.group(1), None)
            if status is None:
                return self._answer(404, {"error": "Record not found"})
            self.deleted.append(status["id"])
            return self._answer(200, status)
        if key == "POST /api/v1/statuses":
            return self._post_status(request)
        if key == "POST /api/v2/media":
            return self._upload(request)
        if key == "GET /api/v1/notifications":
            return self._notifications(query)
        if key == "GET /api/v2/search":
            return self._answer(200, {"accounts": [], "statuses": [], "hashtags": []})
        return self._answer(404, {"error": "Not found"})

    def _visible_to_bot(self, status: dict[str, Any]) -> bool:
        return (status["account"]["id"] == self.bot["id"] or status["visibility"] in ("public", "unlisted")
                or any(m["id"] == self.bot["id"] for m in status["mentions"])
                or (status["visibility"] == "private" and status["account"]["id"] in self.following))

    def _context(self, status_id: str) -> tuple[int, dict[str, str], str]:
        """``GET /api/v1/statuses/:id/context``: the statuses above and below one, as far as the
        bot may see them (404 for a status that is gone, as Mastodon answers)."""
        status = self.statuses.get(status_id)
        if status is None or not self._visible_to_bot(status):
            return self._answer(404, {"error": "Record not found"})
        ancestors = []
        parent = self.statuses.get(status["in_reply_to_id"] or "")
        while parent is not None:
            ancestors.insert(0, parent)
            parent = self.statuses.get(parent["in_reply_to_id"] or "")
        below, frontier = [], {status_id}
        for candidate in sorted(self.statuses.values(), key=lambda s: int(s["id"])):
            if candidate["in_reply_to_id"] in frontier:
                frontier.add(candidate["id"])
                below.append(candidate)
        return self._answer(200, {"ancestors": [a for a in ancestors if self._visible_to_bot(a)],
                                  "descendants": [d for d in below if self._visible_to_bot(d)]})

    def _post_status(self, request: Any) -> tuple[int, dict[str, str], str]:
        payload = json.loads(request.body)
        key = request.headers.get("Idempotency-Key")
        if key and key in self.idempotency:
            return self._answer(200, self.statuses[self.idempotency[key]])
        text = payload["status"]
        mentions = [a for a in self.accounts.values() if f"@{a['acct']}" in text.split()]
        media = [self.uploads[m] for m in payload.get("media_ids", [])]
        status = self.status(self.bot, text, media=media, in_reply_to=self.statuses.get(payload.get("in_reply_to_id") or ""),
                             visibility=payload.get("visibility", "public"), mentions=mentions)
        status["sensitive"] = bool(payload.get("sensitive"))
        status["spoiler_text"] = payload.get("spoiler_text", "")
        if key:
            self.idempotency[key] = status["id"]
        return self._answer(200, status)

    def _upload(self, request: Any) -> tuple[int, dict[str, str], str]:
        content_type = request.headers["Content-Type"]
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()}
        media_id = self.new_id()
        attachment = {"id": media_id, "type": "image", "url": f"{FILES}/uploads/{media_id}.jpg",
                      "description": fields.get("description", b"").decode()}
        self.uploads[media_id] = attachment
        self.upload_data[media_id] = fields["file"]
        return self._answer(200, attachment)

    def _notifications(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], str]:
        """GET /api/v1/notifications: ``types[]`` keeps, ``exclude_types[]`` drops, and what
        the policy filtered is listed only with ``include_filtered`` (Mastodon 4.3)."""
        limit = int(query.get("limit", ["40"])[0])
        min_id = query.get("min_id", [None])[0]
        types, excluded = query.get("types[]"), set(query.get("exclude_types[]", []))
        with_filtered = query.get("include_filtered", ["false"])[-1].lower() in ("true", "1", "t", "on")
        found = sorted((n for n in self.notifications
                        if (not types or n["type"] in types) and n["type"] not in excluded
                        and (with_filtered or n["id"] not in self.filtered)), key=lambda n: int(n["id"]))
        if min_id:
            found = [n for n in found if int(n["id"]) > int(min_id)][:limit]  # the page just after min_id
        else:
            found = found[-limit:]
        return self._answer(200, list(reversed(found)))
