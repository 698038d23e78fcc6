"""A retry that comes after the server forgot the post's idempotency key looks for the post first.

Every reply carries an ``Idempotency-Key`` derived from its job, so a retry of a post whose
answer was lost (a timeout, a worker killed between posting and recording) gets the same status
back instead of a second one. Mastodon keeps a key for an hour only, and a retry can come later
(parked behind the 3-hour posting budget). A second copy posted then would be worse than noise:
only one of the two is recorded, so a takedown would delete that one and leave the other up.
So the first attempt of each post is noted in Redis, and an attempt later than the platform's
window reads the thread for the bot's reply before posting. Only such late retries pay for the
read; platforms without the window (X, which looks for its ``ref`` marker before every post)
are not asked.
"""

from __future__ import annotations

import logging
import time

from .platforms.base import Platform, Post, ReplyDraft
from .store import Store

log = logging.getLogger("bot.earlier_post")


def earlier_post(platform: Platform, store: Store, draft: ReplyDraft) -> Post | None:
    """The reply an earlier attempt of ``draft`` posted, where the server may have forgotten
    its idempotency key since; None where the key still holds, or nothing was posted."""
    window: float | None = getattr(platform, "idempotency_window_s", None)
    if window is None or not draft.idempotency_key:
        return None
    now = time.time()
    first = store.first_post_attempt(f"{platform.name}:{draft.idempotency_key}", now)
    if now - first < window:
        return None
    found: Post | None = platform.own_reply(draft.in_reply_to.id, bool(draft.media_ids))  # type: ignore[attr-defined]
    log.info("late_retry_lookup", extra={"in_reply_to": draft.in_reply_to.id, "found": found is not None,
                                         "reply_id": found.id if found else None,
                                         "since_first_attempt_s": round(now - first)})
    return found
