"""X's text: how X counts a post's length, a reply fitted to it with the job's marker, and the
links X wraps in t.co turned back into what the person wrote (tweets and direct messages)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .base import web_link

#: the hosts of X's own web links (a post's address, a DM's media)
HOSTS = {"x.com", "www.x.com", "mobile.x.com", "twitter.com", "www.twitter.com", "mobile.twitter.com"}
_URL = re.compile(r"https?://\S+")
_TCO = re.compile(r"https?://t\.co/\w+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def marker(idempotency_key: str) -> str:
    """The short code that identifies one job's post (10 hex digits: 40 bits)."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:10] if idempotency_key else ""


def marker_line(code: str) -> str:
    return f"\n\nref {code}" if code else ""


def weighted_length(text: str) -> int:
    """Characters as X counts them: URLs 23, most Latin/punctuation 1, everything else 2."""
    total = 0
    for part in _URL.split(text):
        for ch in part:
            cp = ord(ch)
            light = cp <= 4351 or 8192 <= cp <= 8205 or 8208 <= cp <= 8223 or 8242 <= cp <= 8247
            total += 1 if light else 2
    return total + 23 * len(_URL.findall(text))


def fit(text: str, code: str, limit: int) -> str:
    """``text`` plus the marker line within ``limit``: middle sentences are dropped first (the
    first says what this is, the last how to get it deleted), then the end is cut with "…"."""
    suffix = marker_line(code)
    if weighted_length(text + suffix) <= limit:
        return text + suffix
    sentences = _SENTENCE.split(text)
    while len(sentences) > 2 and weighted_length(" ".join(sentences) + suffix) > limit:
        del sentences[1]
    out = " ".join(sentences)
    if weighted_length(out + suffix) <= limit:
        return out + suffix
    while out and weighted_length(out + "…" + suffix) > limit:
        cut = out.rfind(" ")
        out = out[:cut].rstrip() if cut > 0 else out[:-1]
    return out + "…" + suffix


def with_cw(text: str, spoiler_text: str) -> str:
    """X has no content warnings: the warning goes first, as a line of its own."""
    return f"CW: {spoiler_text}\n{text}" if spoiler_text else text


def expand_links(text: str, entities: dict[str, Any] | None) -> str:
    """t.co links back to what they point at; links to the tweet's own media removed."""
    for url in (entities or {}).get("urls", []) or []:
        short = url.get("url")
        if not short:
            continue
        expanded = web_link(str(url.get("expanded_url") or ""))
        dm_media = expanded is not None and (expanded.hostname or "").lower() in HOSTS and expanded.path.startswith("/messages/media/")
        if url.get("media_key") or dm_media or str(url.get("display_url", "")).startswith(("pic.x.com", "pic.twitter.com")):
            text = text.replace(short, "")
        elif url.get("expanded_url"):
            text = text.replace(short, url["expanded_url"])
    return text.strip()


def dm_text(event: dict[str, Any]) -> str:
    """A DM event's text with its links as the sender wrote them.

    A DmEvent carries its entities at its top level (``urls``, ``mentions``, ``hashtags``,
    ``cashtags``, asked for with the ``entities`` field), not under ``entities`` as a tweet does
    (docs.x.com/x-api/direct-messages/get-dm-events-by-id; the DmEvent schema of X's SDK). A
    post shared into the conversation comes as ``referenced_tweets: [{"id": ...}]`` beside its
    t.co link: the post's own URL stands for it where the text does not name it yet, in place
    of the t.co links left unexpanded when there are as many of them (a takedown request must
    not be answered "I do not know that link" for the link of the very post it shares).
    """
    # The tweet-like nesting is read too: it costs nothing, and a link left short would make a
    # takedown request "unknown".
    nested = (event.get("entities") or {}).get("urls") or []
    text = expand_links(event.get("text", ""), {"urls": [*(event.get("urls") or []), *nested]})
    shared = [str(r["id"]) for r in event.get("referenced_tweets") or [] if isinstance(r, dict) and r.get("id")]
    links = [f"https://x.com/i/web/status/{i}" for i in dict.fromkeys(shared) if i not in text]
    wrapped = _TCO.findall(text)
    if links and len(wrapped) == len(links):
        for short, link in zip(wrapped, links):
            text = text.replace(short, link, 1)
    elif links:
        text = " ".join([text, *links]).strip()
    return text
