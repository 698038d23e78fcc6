"""``python -m bot listen``: mentions and hashtag posts in, small Celery jobs out.

Each channel (the bot's mentions, each watched hashtag) runs in its own thread: it catches up by
polling from the cursor kept in Redis, then streams; when streaming is refused or drops it polls
every ``BOT_POLL_INTERVAL`` seconds and retries the stream with exponential backoff. Because
every (re)connection starts with a catch-up from the cursor, nothing missed during an outage or
a restart is lost, and the first-sighting key in Redis makes sure a post seen both by the stream
and by the poll is enqueued once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable

from .handler import Job
from .platforms.base import Account, Event, Platform, PlatformError, RateLimited
from .deletion_words import asks_deletion, commands_deletion
from .takedown import names_a_post
from .store import SEEN_TTL_S, Store

log = logging.getLogger("bot.listener")

MAX_BACKOFF_S = 300.0
#: how long ago a hashtag post found by the late scan may have been published; below the
#: first-sighting keys' lifetime, so that no post is scanned after its key expired
LATE_MAX_AGE_S = SEEN_TTL_S // 2


def job_for(event: Event, me: Account | None = None) -> Job:
    """The job an event asks for.

    A direct message without images that replies to nothing, or replies to one of the bot's
    own posts, is a takedown request (the takedown flow tells "please delete this" from
    "thanks!", and leaves talk under the bot's other messages unanswered); so is a public
    answer to the bot's post that is a command to delete. Anywhere else in a thread (under the
    original photo, under someone's request), a message that asks for deletion and names what
    to delete by link or id is one too: answering it with a fresh copy of the photo would hand
    the person asking for its removal another copy, and leave the one they named up.

    A hashtag post that mentions the bot is judged as a mention: it is the same post the
    mentions channel lists, and whichever channel sights it first decides its one job (as a
    hashtag job, a request would get no explanation and a "delete ..." no takedown).
    """
    post = event.post
    answers_me = me is not None and post.in_reply_to_account_id == me.id
    direct = post.visibility == "direct"
    if event.kind == "hashtag" and not (me is not None and post.addresses(me)):
        kind = "hashtag"
    elif not post.images and (
        (direct and (post.in_reply_to_id is None or answers_me))
        or (answers_me and commands_deletion(post.text))
        or ((asks_deletion(post.text) if direct else commands_deletion(post.text)) and names_a_post(post.text))
    ):
        kind = "takedown"
    else:
        kind = "mention"
    return Job(platform="", post_id=post.id, requester_id=post.account.id, kind=kind, event_id=event.id)


class Listener:
    """Turns platform events into enqueued jobs, exactly once each."""

    def __init__(
        self,
        platform: Platform,
        store: Store,
        enqueue: Callable[[Job], None],
        hashtags: tuple[str, ...] = (),
        stream: bool = True,
        poll_interval_s: float = 30.0,
        late_window_s: float = 900.0,
    ) -> None:
        self.platform = platform
        self.store = store
        self.enqueue = enqueue
        if hashtags and not platform.watches_hashtags:
            log.warning("hashtags_not_watched", extra={"platform": platform.name, "tags": len(hashtags)})
            hashtags = ()
        self.channels = ["mentions"] + [f"tag:{t}" for t in hashtags]
        if hasattr(platform, "dms_since"):
            self.channels.append("dms")  # platforms whose direct messages are not mentions (X)
        self.use_stream = stream
        self.poll_interval_s = poll_interval_s
        #: while streaming, poll anyway this often (a safety net for events the stream missed)
        self.resync_s = max(10 * poll_interval_s, 2.0)
        self.stop = threading.Event()
        self.enqueued = 0
        #: channels whose last poll stopped before an event claimed elsewhere
        self.held: dict[str, bool] = {}
        #: whether a streamed event may move a cursor: not where the stream carries only part of
        #: what the poll lists (Mastodon never streams filtered notifications, X's filtered stream
        #: never carries a protected account's tweets), or the cursor would pass the events only a
        #: poll finds, and every later poll miss them
        self.stream_moves_cursor = platform.stream_complete
        #: how far below a hashtag cursor each poll looks for posts that reached the server late
        #: (0: not at all); only platforms whose ids follow publish time need it (``hashtag_late``)
        self.late_window_s = late_window_s
        self._watched_since: dict[str, float] = {}

    def handle(self, channel: str, event: Event, move_cursor: bool = True) -> bool:
        """Enqueue the event's job once, then move the channel's cursor past it (unless told
        not to). False (the cursor left before it) while another claim on the event is pending:
        if that one fails, a later poll must still find the event."""
        me = self.platform.me()
        post = event.post
        if not event.skip and not self._history(channel, event) and post.account.id != me.id and not post.account.bot:
            job = job_for(event, me)
            job.platform = self.platform.name
            # Sighted by its first version: X lists each edit of a mention as a new tweet, and
            # a typo fixed is no second request.
            seen = post.key
            sighting = self.store.first_sighting(job.platform, seen, job.requester_id)
            if sighting == "claimed":
                return False
            if sighting == "new":
                try:
                    self.enqueue(job)
                except BaseException:
                    # The cursor stays put and the next poll sees the event again: it must not
                    # find it marked as already queued. (If Redis itself is gone, the claim
                    # expires instead.)
                    with contextlib.suppress(Exception):
                        self.store.unsee(job.platform, seen, job.requester_id)
                    raise
                self.store.queued(job.platform, seen, job.requester_id)
                self.enqueued += 1
                log.info("enqueued", extra={"channel": channel, "post_id": job.post_id, "kind": job.kind})
        # The cursor moves only after the job is safely in the queue: at-least-once, and the
        # first-sighting key turns that into exactly once.
        if move_cursor:
            self.store.set_cursor(self.platform.name, channel, event.id)
        return True

    def catch_up(self, channel: str) -> int:
        """Poll everything newer than the channel's cursor; returns how many events were seen."""
        cursor = self.store.cursor(self.platform.name, channel)
        if cursor is None and channel.startswith("tag:"):
            # Taken before the first listing: a post published before it is history, however
            # late it reaches the server, and one published after it is not.
            self._since(channel)
        if channel == "mentions":
            events = self.platform.mentions_since(cursor)
        elif channel == "dms":
            events = self.platform.dms_since(cursor)  # type: ignore[attr-defined]
        else:
            events = self.platform.hashtag_since(channel[4:], cursor)
        if cursor is None:
            # First start ever: begin from now rather than answering old history. With no
            # history at all, "0" marks the channel as started so that the next poll answers
            # what arrives from now on instead of taking it for history too.
            start = events[-1].id if events else "0"
            self.store.set_cursor(self.platform.name, channel, start)
            log.info("cursor_initialised", extra={"channel": channel, "cursor": start})
            return 0
        self.held[channel] = False
        for event in events:
            if not self.handle(channel, event):
                self.held[channel] = True
                break  # the next poll starts from here again
        return len(events) + self._late(channel, cursor)

    def _late(self, channel: str, cursor: str) -> int:
        """Handle the posts of a hashtag that sort below ``cursor`` but were not there when it
        was polled (a server dates a federated post by its publish time, so one that arrives
        late is never listed above the cursor again); returns how many were listed.

        They never move the cursor, which is past them, and the first-sighting keys make the
        ones already handled cost nothing. A post whose claim is pending elsewhere is left to
        that claim, or to a later scan if the claim dies."""
        scan = getattr(self.platform, "hashtag_late", None)
        if scan is None or not channel.startswith("tag:") or self.late_window_s <= 0:
            return 0
        # Not back further than a delivery is retried (Mastodon gives up within days): a quiet
        # tag's cursor stays put, and posts found below it again after their first-sighting
        # keys expired would be queued again.
        not_before = max(self._since(channel), time.time() - LATE_MAX_AGE_S)
        events = scan(channel[4:], cursor, self.late_window_s, not_before)
        for event in events:
            self.handle(channel, event, move_cursor=False)
        return len(events)

    def _history(self, channel: str, event: Event) -> bool:
        """Whether ``event`` is a hashtag post published before the listener first watched the
        tag: listed above the cursor all the same when it reaches the server late (a server
        dates a federated post by its publish time; above a cursor of "0", every post does), it
        is history, passed over like the history at the first start."""
        published = getattr(self.platform, "published_ms", None)
        if published is None or not channel.startswith("tag:"):
            return False
        ms = published(event.id)
        return ms is not None and ms < self._since(channel) * 1000

    def _since(self, channel: str) -> float:
        if channel not in self._watched_since:
            self._watched_since[channel] = self.store.watched_since(self.platform.name, channel, time.time())
        return self._watched_since[channel]

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def run_channel(self, channel: str) -> None:
        """Catch up, stream, fall back to polling with backoff; until ``stop`` is set."""
        backoff = max(1.0, self.poll_interval_s)
        next_stream_try = 0.0
        while not self.stop.is_set():
            try:
                self.catch_up(channel)
            except RateLimited as exc:
                log.warning("poll_rate_limited", extra={"channel": channel, "wait_s": exc.retry_after_s})
                self._sleep(min(exc.retry_after_s, MAX_BACKOFF_S))
                continue
            except PlatformError as exc:
                log.warning("poll_failed", extra={"channel": channel, "error": type(exc).__name__, "status": exc.status})
                self._sleep(self.poll_interval_s)
                continue
            if self.use_stream and time.monotonic() >= next_stream_try:
                try:
                    log.info("stream_start", extra={"channel": channel})
                    caught_up = False
                    last_sync = time.monotonic()
                    for event in self.platform.stream(channel):
                        if self.stop.is_set():
                            return
                        if time.monotonic() - last_sync > self.resync_s:
                            # Bounds how long anything the stream missed waits for a poll.
                            self.catch_up(channel)
                            last_sync = time.monotonic()
                        if event is None:
                            continue  # heartbeat
                        if not caught_up:
                            # Whatever arrived between the catch-up above and the moment the
                            # stream was subscribed is not streamed: poll it before this event
                            # moves the cursor past it.
                            self.catch_up(channel)
                            caught_up = True
                        # While an earlier event's claim is pending, a streamed one is queued
                        # but must not move the cursor past that event: if the claim dies with
                        # the process that made it, only a poll from before it finds it again.
                        move = self.stream_moves_cursor and not self.held.get(channel)
                        if not self.handle(channel, event, move_cursor=move):
                            self.held[channel] = True
                        backoff = max(1.0, self.poll_interval_s)
                        if self.stop.is_set():
                            return
                except PlatformError as exc:
                    log.warning("stream_failed", extra={"channel": channel, "error": type(exc).__name__, "status": exc.status, "retry_in_s": backoff})
                    next_stream_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue  # catch up at once, then poll until the next stream attempt
            self._sleep(self.poll_interval_s)

    def run(self) -> None:
        """Every channel in its own thread; returns when ``stop`` is set."""
        try:
            self.platform.prepare()
        except Exception:
            log.exception("prepare_failed")  # the polls still find what a server filtered
        threads = [threading.Thread(target=self._guard, args=(c,), name=f"listen-{c}", daemon=True) for c in self.channels]
        for thread in threads:
            thread.start()
        while not self.stop.is_set() and any(t.is_alive() for t in threads):
            self.stop.wait(0.5)
        # A channel blocked in a quiet stream notices the stop at its next heartbeat; the
        # threads are daemons, so the process can exit even if a server sends none.
        for thread in threads:
            thread.join(timeout=5)

    def _guard(self, channel: str) -> None:
        # A bug in one event must not stop the channel for good.
        while not self.stop.is_set():
            try:
                self.run_channel(channel)
            except Exception:
                log.exception("channel_crashed", extra={"channel": channel})
                self._sleep(self.poll_interval_s)
