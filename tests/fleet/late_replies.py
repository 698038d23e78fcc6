"""Imported before Celery starts a test worker (``Fleet.launch(preload=...)``): a reply to a post
whose id is listed in the file ``PPB_TEST_LATE_POSTS`` is posted for real, then its answer takes
``PPB_TEST_LATE_S`` seconds to come back (a slow platform), so the soft time limit passes between
posting and recording."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bot.platforms.mastodon import MastodonPlatform

_real = MastodonPlatform.reply


def _late_reply(self, draft):  # type: ignore[no-untyped-def]
    posted = _real(self, draft)
    if draft.in_reply_to.id in Path(os.environ["PPB_TEST_LATE_POSTS"]).read_text().split():
        print(f"late_reply_posted {draft.in_reply_to.id}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["PPB_TEST_LATE_S"]))
    return posted


MastodonPlatform.reply = _late_reply
