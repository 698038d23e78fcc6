"""Copies follow their originals: when an author withdraws a photo, the bot's copy goes too.

A copy is made for the audience its original had at that moment. An author who later deletes
the post, locks the account (protects their tweets) or puts ``#nobot`` / ``#noanon`` in the
profile has taken the photo back; a copy left up would outlive that choice and become its only
public trace, and the people in it may be ones the detectors missed. So the listener checks every
copied original on a schedule (:data:`STEPS_S` after its newest copy, then weekly, for
:data:`~bot.store.WATCH_FOR_S`), one read per original, and deletes

- every copy, when the original is gone (deleted, or hidden from the bot), its author opted out,
  or a takedown removed its copies (one made while that ran);
- the copies of a photo the author edited out of the post (Mastodon keeps an attachment's id
  through edits, and an X lookup answers the latest version, so a copy showing an id the post
  no longer has shows a withdrawn photo);
- the copies more public than a copy may be now, when the author narrowed the audience;
- the copies shown without a warning, when the author has since marked the post sensitive or
  put it behind a content warning (the copy would show without a click what the author now
  hides behind one; a new request gets a copy with the warning).

Where nothing changed, an original's copies are not even read.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from .copies import delete_copy, own_copies
from .handler import opted_out, reply_visibility
from .platforms.base import VISIBILITIES, NotFound, Platform, Post, RateLimited
from .store import FIRST_CHECK_S, Store

log = logging.getLogger("bot.withdrawal")

#: checks after an original's newest copy: soon, while a regretted post is most often deleted,
#: then further apart; weekly after the last
STEPS_S = (FIRST_CHECK_S, 6 * 3600, 24 * 3600, 2 * 24 * 3600, 4 * 24 * 3600, 7 * 24 * 3600)
WEEK_S = 7 * 24 * 3600
#: how often the listener looks for due checks
SWEEP_INTERVAL_S = 300.0
#: originals checked per round at most (``BOT_WITHDRAWAL_CHECKS``): 50 reads per 5 minutes leave
#: most of Mastodon's 300 requests per 5 minutes, and of X's 900 post lookups per 15 minutes, to
#: the bot's real work
PER_ROUND = 50
#: a check claimed by a listener that died before finishing it comes back after this
HOLD_S = 900.0


def next_check(since: float, now: float) -> float:
    """When to check next an original last copied at ``since``: the first step after ``now``."""
    for step in STEPS_S:
        if since + step > now:
            return since + step
    return since + (math.floor((now - since) / WEEK_S) + 1) * WEEK_S


def _wider(visibility: str, allowed: str) -> bool:
    return VISIBILITIES.index(visibility) > VISIBILITIES.index(allowed)


def doomed_copies(platform: Platform, store: Store, original_id: str, my_id: str) -> tuple[list[Post], str]:
    """The bot's copies of ``original_id`` that must go now, and why ("" when none must)."""
    try:
        original: Post | None = platform.get_post(original_id)
    except NotFound:
        original = None
    if original is None:
        reason = "gone"
    elif opted_out(original.account):
        reason = "opted_out"
    elif store.taken_down(platform.name, original_id):
        reason = "taken_down"  # a copy that slipped past a takedown
    else:
        reason = ""
    if reason:
        return list(own_copies(platform, store, original_id, my_id)), reason
    allowed = reply_visibility(original, original)
    replies = store.replies_of(platform.name, original_id)
    still_shown = {m.id for m in original.images}
    edited_out = {r for r in replies if not (store.copied_media(platform.name, r) or set()) <= still_shown}
    # Only those and the copies recorded as wider than allowed (or recorded before visibilities
    # were kept) are read: where nothing changed, a check costs the original's read alone.
    known = {r: store.copy_visibility(platform.name, r) for r in replies - edited_out}
    suspects = [r for r, seen in known.items() if _wider(seen or "public", allowed)]
    warned = {r: store.copy_warned(platform.name, r) for r in known} if original.sensitive or original.spoiler_text else {}
    unwarned = [r for r, mark in warned.items() if mark is not True]
    if not suspects and not edited_out and not unwarned:
        return [], ""
    doomed: list[Post] = []
    reason = ""
    for copy in own_copies(platform, store, original_id, my_id, only=[*edited_out, *suspects, *unwarned]):
        if copy.id in edited_out:
            doomed.append(copy)
            reason = "edited_out"
            continue
        # A copy recorded before warnings were kept is judged by what the platform shows.
        mark = warned.get(copy.id, True)
        if mark is False or (mark is None and not (copy.sensitive or copy.spoiler_text)):
            doomed.append(copy)
            reason = reason or "warned"
            continue
        if known[copy.id] is None:  # recorded before visibilities were kept: now it is
            store.remember_visibility(platform.name, copy.id, copy.visibility)
        if _wider(copy.visibility, allowed):
            doomed.append(copy)
            reason = reason or "narrowed"
    return doomed, reason


def sweep(platform: Platform, store: Store, now: float | None = None, limit: int = PER_ROUND) -> int:
    """Check the originals that are due; returns how many copies were deleted."""
    now = time.time() if now is None else now
    name = platform.name
    my_id = platform.me().id
    deleted = 0
    for original_id, since in store.due_originals(name, now, limit, HOLD_S):
        if store.unwatch_if_no_copies(name, original_id):
            continue  # taken down or withdrawn already
        try:
            doomed, reason = doomed_copies(platform, store, original_id, my_id)
            removed = sum(delete_copy(platform, store, original_id, copy) is not None for copy in doomed)
        except RateLimited:
            log.warning("withdrawal_paused", extra={"platform": name, "original_id": original_id})
            break  # held for HOLD_S: checked again once the budget is back
        except Exception as exc:  # one original's trouble (a bad answer, a bug) must not stop the rest
            log.warning("withdrawal_check_failed", extra={"platform": name, "original_id": original_id, "error": type(exc).__name__})
            continue  # held for HOLD_S, then checked again
        if removed:
            deleted += removed
            log.info("copies_withdrawn", extra={"platform": name, "original_id": original_id, "copies": removed, "reason": reason})
        if not store.unwatch_if_no_copies(name, original_id):
            store.reschedule(name, original_id, since, next_check(since, now))
    return deleted


def run(platform: Platform, store: Store, stop: threading.Event, interval_s: float = SWEEP_INTERVAL_S,
        per_round: int = PER_ROUND) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set (the listener runs this in a thread);
    first, watch the originals whose copies were recorded before these checks existed.

    With ``per_round`` 0 (checks off) nothing is read from the platform: each round only drops
    the watches that ran out, so the list holds 90 days of copied originals, as with checks on."""
    if per_round:
        try:
            started = store.watch_recorded(platform.name, time.time())
            if started:
                log.info("withdrawal_backfilled", extra={"platform": platform.name, "originals": started})
        except Exception:
            log.warning("withdrawal_backfill_failed", exc_info=True)
    page = 0
    while not stop.wait(interval_s):
        try:
            if per_round:
                sweep(platform, store, limit=per_round)
            else:
                _, page = store.drop_ended_watches(platform.name, time.time(), page)
        except Exception:  # Redis or the platform hiccups: the next round tries again
            log.warning("withdrawal_failed", exc_info=True)
