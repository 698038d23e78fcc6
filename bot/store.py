"""Everything the bot remembers, in Redis: ids, replies, locks, limits, dead letters.

Never image bytes or media URLs: only post ids, account ids and short reasons.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, Literal, Sequence

import redis

from .logs import without_url_paths

PREFIX = "ppb"
#: how long the first attempt of each post is remembered (bot/earlier_post.py)
POST_ATTEMPT_TTL_S = 2 * 86400
#: sorted set of parked retries, scored by when they are due
PARKED = f"{PREFIX}:parked"
#: parked entries taken for publishing, by when they were taken
RELEASING = f"{PREFIX}:releasing"
#: a taken entry not published by then belonged to a listener that died: it is parked again
RELEASE_GRACE_S = 300
_MOVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
"""
#: claim a due watch (KEYS[1] member ARGV[1], due by ARGV[2]) by moving it to ARGV[3] and return
#: when its copies were first made (KEYS[2]); a watch whose time is over (KEYS[2] expired) is
#: dropped. One script, so a copy recorded meanwhile (which sets both keys again) is never lost.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
  return false
end
local since = redis.call('GET', KEYS[2])
if not since then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return since
"""
#: drop the members ARGV of the watch list KEYS[1] whose watch ran out (their since keys,
#: KEYS[2..], expired); one script, so a copy recorded meanwhile (which renews the since key)
#: keeps its original watched
_DROP_ENDED = """
local dropped = 0
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    dropped = dropped + redis.call('ZREM', KEYS[1], member)
  end
end
return dropped
"""
#: add run ARGV[1] to the runs of a task (KEYS[1]) for ARGV[2] seconds and count them; a count
#: an older version kept as a number (INCR) becomes that many placeholder runs first
_RUN_STARTED = """
if redis.call('TYPE', KEYS[1]).ok == 'string' then
  local count = tonumber(redis.call('GET', KEYS[1])) or 0
  redis.call('DEL', KEYS[1])
  for i = 1, count do redis.call('SADD', KEYS[1], 'before-' .. i) end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('SCARD', KEYS[1])
"""
#: end an original's watch (KEYS[2], KEYS[3]) only while it has no copies (KEYS[1])
#: set the next check ARGV[3] of the watched original ARGV[1] (watch list KEYS[1]) that a sweep
#: claimed when its newest copy dated from ARGV[2]; if a copy was recorded since (its since key
#: KEYS[2] moved on), no later than that copy's first check ARGV[4] seconds after it
_RESCHEDULE = """
local due = tonumber(ARGV[3])
local since = redis.call('GET', KEYS[2])
if since and tonumber(since) ~= tonumber(ARGV[2]) then
  due = math.min(due, tonumber(since) + tonumber(ARGV[4]))
end
redis.call('ZADD', KEYS[1], 'XX', due, ARGV[1])
return tostring(due)
"""
_UNWATCH = """
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""
#: claim the sighting KEYS[1] for ARGV[1] seconds, or say what holds it: one script, so a
#: claim that lapses (or is undone) between the two is never read as "queued"
_SIGHT = """
if redis.call('SET', KEYS[1], 'claimed', 'NX', 'EX', ARGV[1]) then
  return 'new'
end
return redis.call('GET', KEYS[1])
"""
SEEN_TTL_S = 14 * 24 * 3600
#: how long a sighting stays claimed before its enqueue is confirmed (an enqueue takes a moment)
CLAIM_TTL_S = 120
Sighting = Literal["new", "claimed", "queued"]
DONE_TTL_S = 365 * 24 * 3600
#: dead letters kept, the newest: an operator reads them, and a year of hostile photos (each
#: dead-lettered after it killed its workers) must not fill Redis; alerts count the workers'
#: ``ppb_job_failures_total``, not the list
DEAD_LETTERS_KEPT = 10_000
#: how long an original's copies are kept in step with it (see ``bot.withdrawal``), and its first check
WATCH_FOR_S = 90 * 24 * 3600
FIRST_CHECK_S = 3600
#: how long a copy being made is remembered until its record is written: longer than any retry
#: of its job waits (a retry parked behind a rate limit waits up to 25 hours)
MAKING_TTL_S = 7 * 24 * 3600


def _making_key(platform: str, original_id: str) -> str:
    """The requests (``request id:requester id``) whose copy of one original is being posted."""
    return f"{PREFIX}:making:{platform}:{original_id}"


def _making_for_key(platform: str, request_id: str, requester_id: str) -> str:
    """The original one request's copy is being made of, until the copy is recorded."""
    return f"{PREFIX}:making_for:{platform}:{request_id}:{requester_id}"


def _visibility_key(platform: str, reply_id: str) -> str:
    return f"{PREFIX}:visibility:{platform}:{reply_id}"


def _replies_key(platform: str, original_id: str) -> str:
    """The set of the bot's copies of one original."""
    return f"{PREFIX}:replies:{platform}:{original_id}"


def _finished_key(key: str) -> str:
    return f"{PREFIX}:finished:{key}"


def _media_key(platform: str, reply_id: str) -> str:
    return f"{PREFIX}:copied_media:{platform}:{reply_id}"


def _warned_key(platform: str, reply_id: str) -> str:
    return f"{PREFIX}:warned:{platform}:{reply_id}"


def _watch_key(platform: str) -> str:
    """The originals watched for withdrawal, scored by when each is checked next."""
    return f"{PREFIX}:watch:{platform}"


def _since_key(platform: str, original_id: str) -> str:
    """When an original's newest copy was made; it expires when the original's watch ends."""
    return f"{PREFIX}:watch_since:{platform}:{original_id}"


class Store:
    """Typed access to the bot's Redis keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @classmethod
    def from_url(cls, url: str) -> "Store":
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # listener cursors ----------------------------------------------------------------------
    def cursor(self, platform: str, channel: str) -> str | None:
        return self.r.get(f"{PREFIX}:cursor:{platform}:{channel}")

    def set_cursor(self, platform: str, channel: str, value: str) -> None:
        """Only ever moves forward (ids compared numerically), so a late writer cannot rewind."""
        key = f"{PREFIX}:cursor:{platform}:{channel}"
        current = self.r.get(key)
        if current is None or (len(value), value) > (len(current), current):
            self.r.set(key, value)

    def watched_since(self, platform: str, channel: str, now: float) -> float:
        """When the listener first watched ``channel`` (``now`` the first time it asks): a post
        published before that is history, however late it reaches the server. A channel whose
        cursor predates this record counts from the first time it is asked about."""
        key = f"{PREFIX}:watched_since:{platform}:{channel}"
        self.r.set(key, repr(now), nx=True)
        return float(self.r.get(key) or now)

    def first_sighting(self, platform: str, post_id: str, requester_id: str) -> Sighting:
        """``"new"`` exactly once per (post, requester) (the stream and the poll may both see
        it), claimed for :data:`CLAIM_TTL_S` until :meth:`queued` confirms it; ``"queued"`` once
        confirmed; ``"claimed"`` while another claim is pending or a failed one has not expired.

        A claim that neither confirms nor is undone (Redis went away between the claim and the
        enqueue) expires, so the event is queued on a later poll instead of being skipped for
        the two weeks a confirmed sighting is kept."""
        held = self.r.eval(_SIGHT, 1, self._seen(platform, post_id, requester_id), CLAIM_TTL_S)
        return "new" if held == "new" else "claimed" if held == "claimed" else "queued"

    def queued(self, platform: str, post_id: str, requester_id: str) -> None:
        """Confirm a :meth:`first_sighting` claim: the job is in the queue."""
        self.r.set(self._seen(platform, post_id, requester_id), "queued", ex=SEEN_TTL_S)

    def unsee(self, platform: str, post_id: str, requester_id: str) -> None:
        """Undo :meth:`first_sighting` when the job could not be queued, so the next poll retries it."""
        self.r.delete(self._seen(platform, post_id, requester_id))

    @staticmethod
    def _seen(platform: str, post_id: str, requester_id: str) -> str:
        return f"{PREFIX}:seen:{platform}:{post_id}:{requester_id}"

    # replies -------------------------------------------------------------------------------
    def reply_for(self, platform: str, original_id: str, requester_id: str) -> str | None:
        return self.r.get(f"{PREFIX}:done:{platform}:{original_id}:{requester_id}")

    def begin_copy(self, platform: str, original_id: str, request_id: str, requester_id: str) -> None:
        """Note, before posting, that ``request_id``'s copy of ``original_id`` is being made, until
        :meth:`record_reply` (given ``request_id``) records it: a run that posted it but could not
        record it (Redis failing, the worker killed between the two) leaves this for the next run
        to find the copy by (:meth:`unrecorded_copy`), and a takedown of the original meanwhile
        is kept for the copy to meet (:meth:`original_for`)."""
        pipe = self.r.pipeline()
        pipe.set(_making_for_key(platform, request_id, requester_id), original_id, ex=MAKING_TTL_S)
        pipe.sadd(_making_key(platform, original_id), f"{request_id}:{requester_id}")
        pipe.expire(_making_key(platform, original_id), MAKING_TTL_S)
        pipe.execute()

    def unrecorded_copy(self, platform: str, request_id: str, requester_id: str) -> str | None:
        """The original whose copy for this request an earlier run began to post and did not
        record; None when none did (or it was recorded)."""
        return self.r.get(_making_for_key(platform, request_id, requester_id))

    def record_reply(self, platform: str, original_id: str, requester_id: str, reply_id: str, urls: list[str],
                     visibility: str = "public", media_ids: Sequence[str] = (), answered: str = "",
                     warned: bool = False, request_id: str = "") -> None:
        """Remember a copy: whose request it answered, which original it copies (also by the
        original's URLs, for takedown links), its ``visibility``, the ids of the original's
        attachments it copies, whether it went out ``warned`` (sensitive, or behind a content
        warning), that the job ``answered`` (keyed by the request) is done, and that the
        original is now watched for withdrawal (one transaction: a copy is never recorded
        unwatched, nor its request left looking unanswered). ``request_id``: the copy
        :meth:`begin_copy` noted is made."""
        now = time.time()
        pipe = self.r.pipeline()
        if request_id:
            pipe.delete(_making_for_key(platform, request_id, requester_id))
            pipe.srem(_making_key(platform, original_id), f"{request_id}:{requester_id}")
        done_key = f"{PREFIX}:done:{platform}:{original_id}:{requester_id}"
        pipe.set(done_key, reply_id, ex=DONE_TTL_S)
        pipe.set(f"{PREFIX}:done_key_of:{platform}:{reply_id}", done_key, ex=DONE_TTL_S)
        replies_key = _replies_key(platform, original_id)
        pipe.sadd(replies_key, reply_id)
        # Kept as long as its newest copy's records: without it, every original ever copied
        # left a set behind for good.
        pipe.expire(replies_key, DONE_TTL_S)
        pipe.set(f"{PREFIX}:original_of:{platform}:{reply_id}", original_id, ex=DONE_TTL_S)
        for url in urls:
            if url:
                pipe.set(f"{PREFIX}:url:{platform}:{url}", original_id, ex=DONE_TTL_S)
        pipe.set(_visibility_key(platform, reply_id), visibility, ex=DONE_TTL_S)
        if media_ids:
            pipe.set(_media_key(platform, reply_id), " ".join(media_ids), ex=DONE_TTL_S)
        pipe.set(_warned_key(platform, reply_id), "1" if warned else "0", ex=DONE_TTL_S)
        if answered:
            pipe.set(_finished_key(answered), reply_id, ex=DONE_TTL_S)
        self._watch(pipe, platform, original_id, now)
        pipe.execute()

    def copy_visibility(self, platform: str, reply_id: str) -> str | None:
        """The visibility a copy was posted with (None for copies recorded before it was kept)."""
        return self.r.get(_visibility_key(platform, reply_id))

    def copied_media(self, platform: str, reply_id: str) -> set[str] | None:
        """The ids of the original's attachments a copy shows (None for copies recorded before
        they were kept)."""
        ids = self.r.get(_media_key(platform, reply_id))
        return set(ids.split()) if ids else None

    def copy_warned(self, platform: str, reply_id: str) -> bool | None:
        """Whether a copy went out sensitive or behind a content warning (None for copies
        recorded before it was kept)."""
        mark = self.r.get(_warned_key(platform, reply_id))
        return None if mark is None else mark == "1"

    def remember_visibility(self, platform: str, reply_id: str, visibility: str) -> None:
        """Keep a copy's visibility once read (a copy recorded before it was kept)."""
        self.r.set(_visibility_key(platform, reply_id), visibility, ex=DONE_TTL_S)

    # originals whose copies follow them ------------------------------------------------------
    def watch(self, platform: str, original_id: str, now: float) -> None:
        """Check ``original_id`` for withdrawal from its newest copy (made at ``now``) on: first
        :data:`FIRST_CHECK_S` after it (or sooner, if a check was due sooner), until
        :data:`WATCH_FOR_S` after it. A copy made late in the watch of an earlier one used to
        keep that watch's schedule and end, and the check after day 84 fell past day 90: an
        original deleted then kept its new copy up."""
        pipe = self.r.pipeline()
        self._watch(pipe, platform, original_id, now)
        pipe.execute()

    @staticmethod
    def _watch(pipe: Any, platform: str, original_id: str, now: float) -> None:
        # ``now`` may lie in the past (a backfilled copy): the watch ends WATCH_FOR_S after it.
        pipe.set(_since_key(platform, original_id), now, ex=max(1, int(now + WATCH_FOR_S - time.time())))
        pipe.zadd(_watch_key(platform), {original_id: now + FIRST_CHECK_S}, lt=True)

    def watch_recorded(self, platform: str, now: float) -> int:
        """Watch the originals whose copies were recorded before withdrawal checks existed,
        once per platform (a key scan); returns how many.

        Each is watched from its newest copy's real age (read from its record's time to live),
        so its checks resume where its schedule stands, and one whose copies are all older than
        :data:`WATCH_FOR_S` is left alone, as a watch that ran its course would be."""
        marker = f"{PREFIX}:watch_backfilled:{platform}"
        if self.r.exists(marker):
            return 0
        started = 0
        prefix = _replies_key(platform, "")
        for key in self.r.scan_iter(match=f"{prefix}*", count=1000):
            original_id = key[len(prefix):]
            if self.r.zscore(_watch_key(platform), original_id) is not None:
                continue
            # The newest copy's record has the longest time to live left (-2: none left).
            ttl = max((self.r.ttl(f"{PREFIX}:original_of:{platform}:{r}") for r in self.r.smembers(key)), default=-2)
            age = DONE_TTL_S - ttl
            if ttl < 0 or age >= WATCH_FOR_S:
                continue
            self.watch(platform, original_id, now - age)
            started += 1
        self.r.set(marker, int(now))
        return started

    def due_originals(self, platform: str, now: float, limit: int, hold_s: float) -> list[tuple[str, float]]:
        """Originals due for a check by ``now``, each with when its copies were first made.

        Each is claimed by moving its next check ``hold_s`` ahead (only a caller that moves it
        gets it, so two listeners never check the same original at once); one whose watch ended
        (:data:`WATCH_FOR_S` after its newest copy) is dropped instead."""
        key = _watch_key(platform)
        taken = []
        for original in self.r.zrangebyscore(key, "-inf", now, start=0, num=limit):
            since = self.r.eval(_CLAIM, 2, key, _since_key(platform, original), original, now, now + hold_s)
            if since is not None:  # None: claimed by another listener, or its watch is over
                taken.append((original, float(since)))
        return taken

    def drop_ended_watches(self, platform: str, now: float, start: int = 0, limit: int = 1000) -> tuple[int, int]:
        """Drop the watches that ran out (:data:`WATCH_FOR_S` after their newest copy) among
        ``limit`` due by ``now``, from the ``start``-th on, checking nothing; returns how many
        were dropped and where the next page starts (0: back to the first).

        For withdrawal checks switched off: workers record a watch with every copy whatever the
        listener's setting, and only a check removed one, so the list grew by every copied
        original. Live watches keep their schedule, for when checks are on again or for another
        listener of the platform that checks. Pages go on across calls, because a live watch
        can be due before an ended one (a check before the switch-off scheduled it a week on).
        """
        key = _watch_key(platform)
        due = self.r.zrangebyscore(key, "-inf", now, start=start, num=limit)
        dropped = 0
        if due:
            dropped = int(self.r.eval(_DROP_ENDED, 1 + len(due), key, *(_since_key(platform, o) for o in due), *due))
        return dropped, (start + len(due) - dropped if len(due) == limit else 0)

    def check_again(self, platform: str, original_id: str, due: float) -> None:
        """The next check of a watched original."""
        self.r.zadd(_watch_key(platform), {original_id: due}, xx=True)

    def reschedule(self, platform: str, original_id: str, claimed_since: float, due: float) -> float:
        """After a sweep's check of an original it claimed with ``claimed_since``: its next check
        at ``due``, unless a copy recorded during the check is due its first check sooner (the
        claim had moved the score past that copy's, and ``check_again`` then overwrote it with
        a schedule days away). Returns the check set."""
        keys = [_watch_key(platform), _since_key(platform, original_id)]
        return float(self.r.eval(_RESCHEDULE, 2, *keys, original_id, repr(claimed_since), repr(due), FIRST_CHECK_S))

    def unwatch_if_no_copies(self, platform: str, original_id: str) -> bool:
        """Stop checking ``original_id`` if it has no copies left; atomic, so a copy recorded at
        the same moment keeps it watched. True when the watch ended."""
        keys = [_replies_key(platform, original_id), _watch_key(platform),
                _since_key(platform, original_id)]
        return bool(self.r.eval(_UNWATCH, 3, *keys, original_id))

    def record_original_urls(self, platform: str, original_id: str, urls: list[str]) -> None:
        for url in urls:
            if url:
                self.r.set(f"{PREFIX}:url:{platform}:{url}", original_id, ex=DONE_TTL_S)

    def original_for(self, platform: str, post_id: str) -> str | None:
        """The original post id if ``post_id`` is one of our replies, an answered original, or
        an original whose first copy is being made (a takedown of it must be kept for that copy
        to meet: it found no record, and the copy was posted and left up)."""
        original = self.r.get(f"{PREFIX}:original_of:{platform}:{post_id}")
        if original:
            return original
        return post_id if self.r.exists(_replies_key(platform, post_id), _making_key(platform, post_id)) else None

    def requester_of(self, platform: str, reply_id: str) -> str | None:
        """The account whose request the reply answered, while its record lasts."""
        done_key = self.r.get(f"{PREFIX}:done_key_of:{platform}:{reply_id}")
        return done_key.rsplit(":", 1)[1] if done_key else None

    def original_for_url(self, platform: str, url: str) -> str | None:
        return self.r.get(f"{PREFIX}:url:{platform}:{url}")

    def replies_of(self, platform: str, original_id: str) -> set[str]:
        return set(self.r.smembers(_replies_key(platform, original_id)))

    def forget_reply(self, platform: str, original_id: str, reply_id: str) -> None:
        """After a takedown: the reply is gone (no new copy is made: see :meth:`mark_taken_down`).

        The reply still leads to its original (until that record expires): a takedown retried
        after a platform error part-way, or asked twice, names a reply already deleted, and must
        still find the original's other copies or say they are already gone, not "unknown".
        """
        done_key = self.r.get(f"{PREFIX}:done_key_of:{platform}:{reply_id}")
        pipe = self.r.pipeline()
        if done_key:
            pipe.delete(done_key, f"{PREFIX}:done_key_of:{platform}:{reply_id}")
        pipe.delete(_visibility_key(platform, reply_id), _media_key(platform, reply_id), _warned_key(platform, reply_id))
        pipe.srem(_replies_key(platform, original_id), reply_id)
        pipe.execute()

    def mark_taken_down(self, platform: str, original_id: str) -> None:
        """The bot's copies of ``original_id`` were taken down at someone's request: no new copy
        for as long as reply records are kept. Keyed by the post id only, never its URL."""
        self.r.set(f"{PREFIX}:taken_down:{platform}:{original_id}", "1", ex=DONE_TTL_S)

    def taken_down(self, platform: str, original_id: str) -> bool:
        """Whether a takedown removed the bot's copies of ``original_id`` (see :meth:`mark_taken_down`)."""
        return bool(self.r.exists(f"{PREFIX}:taken_down:{platform}:{original_id}"))

    def first_post_attempt(self, key: str, now: float) -> float:
        """When a post under the idempotency key ``key`` was first attempted: ``now`` on the
        first call, the first call's time on every later one (kept for two days, past any
        retry)."""
        name = f"{PREFIX}:posting:{key}"
        with self.r.pipeline() as pipe:
            pipe.set(name, repr(now), nx=True, ex=POST_ATTEMPT_TTL_S)
            pipe.get(name)
            _, first = pipe.execute()
        return float(first)

    def done(self, key: str) -> str | None:
        """What was recorded when the job ``key`` finished (e.g. the id of the bot's answer)."""
        return self.r.get(_finished_key(key))

    def mark_done(self, key: str, value: str) -> None:
        self.r.set(_finished_key(key), value, ex=DONE_TTL_S)

    def once(self, key: str, ttl_s: int) -> bool:
        """True the first time ``key`` is claimed within ``ttl_s`` seconds, False after that."""
        return bool(self.r.set(f"{PREFIX}:once:{key}", "1", nx=True, ex=ttl_s))

    def forget(self, key: str) -> None:
        """Release a key claimed with :meth:`once`."""
        self.r.delete(f"{PREFIX}:once:{key}")

    def add_to_tally(self, key: str, **counts: int) -> None:
        """Add ``counts`` to what the attempts of job ``key`` did so far (kept for a week): a
        job retried part-way reports the work of its earlier attempts too."""
        tally = f"{PREFIX}:tally:{key}"
        pipe = self.r.pipeline()
        for name, count in counts.items():
            pipe.hincrby(tally, name, count)
        pipe.expire(tally, 7 * 24 * 3600)  # a takedown parked behind a long rate limit still adds up
        pipe.execute()

    def tally(self, key: str) -> dict[str, int]:
        """The counts :meth:`add_to_tally` added for job ``key``, over all its attempts."""
        return {name: int(count) for name, count in self.r.hgetall(f"{PREFIX}:tally:{key}").items()}

    # limits --------------------------------------------------------------------------------
    def admitted(self, key: str, limits: dict[str, int]) -> bool:
        """Count the job ``key`` against each hourly limit (bucket: uses per hour) once: a
        retried or redelivered job was counted by its first attempt. False once a limit is
        passed; the claim is then released, so the job is counted again if it comes back."""
        claim = f"admitted:{key}"
        if not self.once(claim, 24 * 3600):
            return True
        if all(self.within_limit(bucket, limit) for bucket, limit in limits.items()):
            return True
        self.forget(claim)
        return False

    def within_limit(self, bucket: str, limit: int, window_s: int = 3600) -> bool:
        """Count one use of ``bucket`` in the current window; False once ``limit`` is passed."""
        window = int(time.time() // window_s)
        key = f"{PREFIX}:rate:{bucket}:{window}"
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, window_s * 2)
        count = pipe.execute()[0]
        return int(count) <= limit

    # failures ------------------------------------------------------------------------------
    def run_started(self, task_id: str, ttl_s: int, run: str | None = None) -> int:
        """Count one more start of task ``task_id``; returns how many starts have not finished.

        A worker killed by the kernel (out of memory), by a hard time limit or by a crash never
        reaches any handler: the count is the only trace it leaves, and the next start sees it.
        Each start adds its own ``run`` token (a fresh one by default) to a set rather than
        incrementing a number: redis-py retries a command whose answer timed out, and a replayed
        INCR counted a loss that never happened (two of those dead-letter a healthy job).
        """
        key = f"{PREFIX}:running:{task_id}"
        return int(self.r.eval(_RUN_STARTED, 1, key, run or uuid.uuid4().hex, ttl_s))

    def run_finished(self, task_id: str) -> None:
        """The start counted by :meth:`run_started` ended (in any way a handler saw)."""
        self.r.delete(f"{PREFIX}:running:{task_id}")

    def dead_letter(self, job: dict[str, Any], reason: str) -> None:
        """Keep ``job`` (ids only) with why it was given up; the oldest beyond
        :data:`DEAD_LETTERS_KEPT` go."""
        # Cut back to hosts as log lines are: no path today puts a media URL (a capability
        # link to someone's original) into an exception's message, but this list outlives logs.
        entry = {"job": job, "reason": without_url_paths(reason)[:500], "at": time.time()}
        self.r.rpush(f"{PREFIX}:dead", json.dumps(entry))
        # Apart from the push, which alone decides whether the dead letter was kept (an error
        # puts the job back in its queue, see bot.tasks.redis_refused): a trim that fails must
        # not have a kept dead letter written again, and the next one trims the list.
        with contextlib.suppress(redis.RedisError):
            self.r.ltrim(f"{PREFIX}:dead", -DEAD_LETTERS_KEPT, -1)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{PREFIX}:dead", 0, -1)]

    # retries that wait long -----------------------------------------------------------------
    def park(self, job: dict[str, Any], retries: int, due: float) -> None:
        """Keep ``job`` (ids only) until ``due`` (epoch seconds); its next run is retry ``retries``."""
        entry = {"job": job, "retries": retries, "id": uuid.uuid4().hex}
        self.r.zadd(PARKED, {json.dumps(entry): due})

    def take_due(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        """Take the parked entries due by ``now``, oldest first, for publishing. Each goes to
        exactly one caller (several listeners may look at once), and is held in a releasing set
        until :meth:`released` or :meth:`unrelease`: a listener killed between taking and
        publishing leaves it there, and a drain :data:`RELEASE_GRACE_S` later parks it again."""
        for member in self.r.zrangebyscore(RELEASING, "-inf", now - RELEASE_GRACE_S):
            self._move(member, RELEASING, PARKED, now)
        return [json.loads(m) for m in self.r.zrangebyscore(PARKED, "-inf", now, start=0, num=limit)
                if self._move(m, PARKED, RELEASING, now)]

    def released(self, entry: dict[str, Any]) -> None:
        """A taken entry is in the queue now."""
        self.r.zrem(RELEASING, json.dumps(entry))

    def unrelease(self, entry: dict[str, Any], due: float) -> None:
        """A taken entry could not be published: park it again until ``due``."""
        self._move(json.dumps(entry), RELEASING, PARKED, due)

    def _move(self, member: str, source: str, target: str, score: float) -> bool:
        """Move ``member`` between sorted sets atomically; False if another caller moved it first."""
        return bool(self.r.eval(_MOVE, 2, source, target, member, score))

    def parked(self) -> list[tuple[dict[str, Any], float]]:
        """Every parked entry with its due time (operators, tests)."""
        return [(json.loads(m), float(due)) for m, due in self.r.zrange(PARKED, 0, -1, withscores=True)]
