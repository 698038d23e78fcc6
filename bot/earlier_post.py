"""A retry that comes after the server forgot the post's idempotency key looks for the post first.

Every reply carries an ``Idempotency-Key`` derived from its job, so a retry of a post whose
answer was lost (a timeout, a worker killed between posting and recording) gets the same status
back instead of a second one. Mastodon keeps a key for an hour only, and a retry can come later
(parked behind the 3-hour posting budget). A second copy posted then would be worse than noise:
only one of the two is recorded, so a takedown would delete that one and leave the other up.
So the first attempt of each post is noted in Redis, and an attempt later than the platform's
window reads the thread for the bot's reply before posting. Only such late retries pay for the
read; platforms without the window (X, which looks for its ``ref`` marker before every post)
are not asked. The same holds for the direct message that confirms a takedown: a duplicate of
it would only repeat itself, but it answers a request the person is waiting on, and the
recorded id should be the one they got.
"""

from __future__ import annotations

import logging
import time

from .platforms.base import Platform, Post
from .store import Store

log = logging.getLogger("bot.earlier_post")


def earlier_post(platform: Platform, store: Store, idempotency_key: str, in_reply_to_id: str,
                 with_media: bool) -> Post | None:
    """The bot's reply to ``in_reply_to_id`` (with images or without) that an earlier attempt
    under ``idempotency_key`` posted, where the server may have forgotten the key since; None
    where the key still holds, or nothing was posted."""
    window: float | None = getattr(platform, "idempotency_window_s", None)
    if window is None or not idempotency_key:
        return None
    now = time.time()
    first = store.first_post_attempt(f"{platform.name}:{idempotency_key}", now)
    if now - first < window:
        return None
    found: Post | None = platform.own_reply(in_reply_to_id, with_media)  # type: ignore[attr-defined]
    log.info("late_retry_lookup", extra={"in_reply_to": in_reply_to_id, "found": found is not None,
                                         "reply_id": found.id if found else None,
                                         "since_first_attempt_s": round(now - first)})
    return found
