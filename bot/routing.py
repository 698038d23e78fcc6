"""Queues, worker heartbeats, routing and draining: the fleet grows by adding workers.

* **Queues.** GPU workers consume ``anonymise.gpu``, CPU workers ``anonymise.cpu``
  (``celery -A bot.tasks worker -Q anonymise.gpu``). A worker started without ``-Q`` consumes
  the legacy default queue ``celery`` *and* its role's queue, so ``python -m bot run`` and old
  process files keep working.
* **Heartbeats.** Every worker's main process writes ``ppb:worker:<hostname>:<pid>`` (role,
  queues) every ``BOT_HEARTBEAT_INTERVAL`` seconds with a time-to-live of three intervals, and deletes
  it on a clean shutdown. A worker is alive while its key exists: Redis expires it on its own
  clock, so the machines' clocks never matter. The keys are listed in ``ppb:workers`` (a sorted
  set, scored by when each was last due to expire, pruned by the workers): finding them with
  SCAN walked every key of the bot's store, about 4 million after a year at 1,000 photos a day
  (4.4 s of Redis time per look, and listeners and metrics look every few seconds).
* **Routing** (the listener, for every job): the GPU queue when a live worker consumes it and it
  holds fewer than ``BOT_GPU_QUEUE_LIMIT`` jobs per live GPU worker (beyond that, new jobs spill
  over to the CPU queue, if a CPU worker is alive); else the CPU queue. Takedowns need no model
  and go to the CPU queue whenever a CPU worker is alive.
* **Draining** (the listener, every ``BOT_DRAIN_INTERVAL`` seconds): jobs left in a queue that no
  live worker consumes (a GPU outage, or Celery's default queue that an older listener published
  to while every worker was started with ``-Q``; from that queue, shared by every Celery app on
  the broker, only this bot's tasks) are moved, oldest first and atomically (Redis scripts), to
  the queue routing would pick now, each rewritten to name that queue, so that its retries and
  restored deliveries stay there. A job a dead worker had already taken comes back to its original
  queue when Redis's visibility timeout expires (Kombu restores it) and is drained from there.

Settings (read here until they are folded into ``bot/config.py``): ``BOT_WORKER_ROLE`` (cpu or
gpu, default cpu), ``BOT_HEARTBEAT_INTERVAL`` (5 s), ``BOT_GPU_QUEUE_LIMIT`` (500 jobs per live
GPU worker), ``BOT_DRAIN_INTERVAL`` (5 s), ``BOT_METRICS_PORT`` (unset: no metrics server),
``BOT_DEVICE_FAILURE_LIMIT`` (3 consecutive device failures take a GPU worker out).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import redis
from celery import signals

from .config import ConfigError, read_number

log = logging.getLogger("bot.routing")

GPU_QUEUE = "anonymise.gpu"
CPU_QUEUE = "anonymise.cpu"
#: Celery's default queue: what workers without ``-Q`` consume, and older listeners publish to
LEGACY_QUEUE = "celery"
ROLES = ("cpu", "gpu")
ROLE_QUEUES = {"cpu": CPU_QUEUE, "gpu": GPU_QUEUE}
HEARTBEAT_PREFIX = "ppb:worker:"
#: the heartbeat keys, scored by the time (ms) each was last set to expire
WORKERS = "ppb:workers"
#: Kombu's Redis transport keeps messages with a priority in ``<queue>\x06\x16<priority>`` lists
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
#: A moved message must name the queue it now waits in: Kombu puts a delivery back (visibility
#: timeout, ``Reject(requeue=True)``) and Celery sends a retry to the queue its
#: ``properties.delivery_info`` names, and the metrics label a job by it. Left naming the queue it
#: was drained from, a job bounced back there until the next drain, and the CPU workers counted it
#: as the GPU queue's. This rewrites that field in place, as text, to the target on the default
#: (anonymous) exchange, which delivers by queue name; the match takes the whole
#: ``"delivery_info": {"exchange": "…", "routing_key": "<source>"`` (a JSON string's own quotes are
#: escaped, so no value inside the message can look like it). A message in any other shape moves
#: unchanged, as before.
_RETARGET = """
local function retarget(message, source, target)
  local pattern = '"delivery_info": {"exchange": "[^"]*", "routing_key": "' .. string.gsub(source, '%p', '%%%0') .. '"'
  local replacement = '"delivery_info": {"exchange": "", "routing_key": "' .. string.gsub(target, '%%', '%%%%') .. '"'
  return (string.gsub(message, pattern, replacement, 1))
end
"""
#: Moves up to ARGV[3] messages from KEYS[1] (a list of queue ARGV[1]) to KEYS[2] (queue ARGV[2]),
#: newest first to the consumers' end, so the oldest still comes out first (as ``LMOVE LEFT
#: RIGHT`` would); returns how many.
_MOVE_RETARGETED = _RETARGET + """
local moved = 0
for _ = 1, tonumber(ARGV[3]) do
  local message = redis.call('LPOP', KEYS[1])
  if not message then break end
  redis.call('RPUSH', KEYS[2], retarget(message, ARGV[1], ARGV[2]))
  moved = moved + 1
end
return moved
"""
#: messages one move script takes: a backlog of 100,000 is many short scripts, not one long one
MOVE_BATCH = 1000
#: Celery's default queue may hold other apps' tasks when the broker is shared; moved into this
#: bot's queues they would be discarded as unregistered. This looks at ARGV[3] messages, after
#: skipping ARGV[2] from the consumers' end, and moves those whose Celery header names a task
#: starting with ARGV[1], oldest first, to the back of KEYS[2] (queue ARGV[5], retargeted from
#: ARGV[4]; at the back so that jobs moved by later windows and drains, all newer, are taken
#: after them); the others are left untouched, in place. Returns {moved, looked at}. Bounded:
#: rewriting the whole list (an other app's backlog) on every drain kept Redis busy in
#: proportion to its length (1.8 s for 200,000 messages), and past 5 s every client is answered
#: BUSY while a script that has written cannot be killed. One script per window, so no consumer
#: sees a gap.
_MOVE_OWN_TASKS = _RETARGET + """
local skip, size = tonumber(ARGV[2]), tonumber(ARGV[3])
local window = redis.call('LRANGE', KEYS[1], -(skip + size), -(skip + 1))
local moved = 0
for i = #window, 1, -1 do
  local message = window[i]
  local ok, decoded = pcall(cjson.decode, message)
  local task = ok and type(decoded) == 'table' and type(decoded['headers']) == 'table' and decoded['headers']['task']
  if type(task) == 'string' and string.sub(task, 1, string.len(ARGV[1])) == ARGV[1] then
    if redis.call('LREM', KEYS[1], -1, message) == 1 then
      redis.call('LPUSH', KEYS[2], retarget(message, ARGV[4], ARGV[5]))
      moved = moved + 1
    end
  end
end
return {moved, #window}
"""
#: messages of the default queue one script looks at, and scripts per queue key and drain: each
#: drain looks at most at this many of its messages, from where the last one stopped
LEGACY_WINDOW = 1000
LEGACY_WINDOWS_PER_DRAIN = 10
#: the prefix of this bot's task names (``bot.handle``)
TASK_PREFIX = "bot."


@dataclass(frozen=True)
class FleetSettings:
    """How this process takes part in the fleet (validated; see the module docstring)."""

    role: str = "cpu"
    heartbeat_interval_s: float = 5.0
    gpu_queue_limit: int = 500
    drain_interval_s: float = 5.0
    metrics_port: int | None = None
    #: consecutive LSC-CNN device failures after which a GPU worker withdraws and stops
    device_failure_limit: int = 3

    @property
    def heartbeat_ttl_s(self) -> float:
        return 3 * self.heartbeat_interval_s

    @property
    def queue(self) -> str:
        return ROLE_QUEUES[self.role]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "FleetSettings":
        """Read and validate; ``ConfigError`` names every bad variable at once."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, Any] = {}
        role = env.get("BOT_WORKER_ROLE", "").strip().lower() or "cpu"
        if role not in ROLES:
            problems.append(f"BOT_WORKER_ROLE must be cpu or gpu, got {env.get('BOT_WORKER_ROLE')!r}")
        else:
            values["role"] = role

        def number(name: str, key: str, kind: type, low: float, high: float) -> None:
            value = read_number(env, name, kind, problems, low=low, high=high)
            if value is not None:
                values[key] = value

        number("BOT_HEARTBEAT_INTERVAL", "heartbeat_interval_s", float, 0.1, 300)
        number("BOT_GPU_QUEUE_LIMIT", "gpu_queue_limit", int, 1, 10_000_000)
        number("BOT_DRAIN_INTERVAL", "drain_interval_s", float, 0.1, 3600)
        number("BOT_METRICS_PORT", "metrics_port", int, 1, 65535)
        number("BOT_DEVICE_FAILURE_LIMIT", "device_failure_limit", int, 1, 1000)
        if problems:
            raise ConfigError(problems)
        return cls(**values)


# --------------------------------------------------------------------------- Redis helpers


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Jobs waiting in ``queue`` (not those a worker has taken)."""
    pipe = client.pipeline()
    for key in _queue_keys(queue):
        pipe.llen(key)
    return int(sum(pipe.execute()))


def _queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]


def write_heartbeat(client: redis.Redis, key: str, payload: dict[str, Any], ttl_ms: int) -> None:
    """Set a worker's heartbeat ``key`` for ``ttl_ms`` and list it in :data:`WORKERS` (pruning
    the entries of heartbeats long expired: a worker killed without a goodbye leaves one)."""
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline()
    pipe.set(key, json.dumps(payload), px=ttl_ms)
    pipe.zadd(WORKERS, {key: now_ms + ttl_ms})
    pipe.zremrangebyscore(WORKERS, "-inf", now_ms - 3_600_000)
    pipe.expire(WORKERS, 3600)  # gone an hour after the last worker
    pipe.execute()


def remove_heartbeat(client: redis.Redis, key: str) -> None:
    pipe = client.pipeline()
    pipe.delete(key)
    pipe.zrem(WORKERS, key)
    pipe.execute()


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every worker whose heartbeat has not expired (the keys :data:`WORKERS` lists; whether
    each still exists is Redis's own clock's answer, not the score's)."""
    keys = sorted(client.zrange(WORKERS, 0, -1))
    if not keys:
        return []
    workers = []
    for raw in client.mget(keys):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        if isinstance(info, dict) and isinstance(info.get("queues"), list):
            workers.append(info)
    return workers


# --------------------------------------------------------------------------- worker side


class Heartbeat:
    """A daemon thread that keeps ``ppb:worker:<hostname>:<pid>`` alive while the worker runs."""

    def __init__(self, client: redis.Redis, hostname: str, info: Callable[[], dict[str, Any]], settings: FleetSettings) -> None:
        self.client = client
        # The pid too: two workers started with Celery's default name on one machine share it.
        self.key = f"{HEARTBEAT_PREFIX}{hostname}:{os.getpid()}"
        self.hostname = hostname
        self.info = info
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ppb-heartbeat", daemon=True)

    def beat(self) -> None:
        payload = dict(self.info(), ts=round(time.time(), 3))
        write_heartbeat(self.client, self.key, payload, int(self.settings.heartbeat_ttl_s * 1000))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                if self._stop.is_set():
                    # A beat slower than stop()'s wait landed after its delete: take it back,
                    # or listeners would route to a withdrawn worker until the key expired.
                    remove_heartbeat(self.client, self.key)
            except redis.RedisError:
                log.warning("heartbeat_failed", exc_info=True)
            self._stop.wait(self.settings.heartbeat_interval_s)

    def start(self) -> "Heartbeat":
        self.beat()  # alive from the first moment, not one interval later
        self._thread.start()
        return self

    def stop(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=wait_s)
        try:
            remove_heartbeat(self.client, self.key)
        except redis.RedisError:
            pass


_heartbeat: Heartbeat | None = None


def settings_or_exit() -> FleetSettings:
    """For worker signals: print the problems and stop the worker (Celery swallows other errors)."""
    try:
        return FleetSettings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


@signals.celeryd_after_setup.connect
def _consume_role_queue(sender: str, instance: Any, **_: Any) -> None:
    """A worker started without ``-Q`` consumes its role's queue besides Celery's default one."""
    settings = settings_or_exit()
    queues = instance.app.amqp.queues
    # No -Q leaves no selection. (Celery 5.7's ``consume_from`` then returns a default dict of
    # its own, where older versions returned the Queues object itself, so compare nothing else.)
    if getattr(queues, "_consume_from", None) is None:
        queues.select_add(settings.queue)


@signals.worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    global _heartbeat
    settings = settings_or_exit()
    app = sender.app
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    queues = sorted(app.amqp.queues.consume_from)
    pool = getattr(getattr(sender, "pool", None), "num_processes", None) or app.conf.worker_concurrency
    info = {"hostname": hostname, "role": settings.role, "queues": queues, "pid": os.getpid(), "concurrency": pool}
    client = redis.Redis.from_url(app.conf.broker_url)
    _heartbeat = Heartbeat(client, hostname, lambda: info, settings).start()
    log.info("worker_alive", extra={"hostname": hostname, "role": settings.role, "queues": ",".join(queues)})


@signals.worker_shutting_down.connect  # a warm shutdown's start: running tasks may take long
@signals.worker_shutdown.connect
def withdraw(**_: Any) -> None:
    """Stop this worker's heartbeat and delete it: listeners stop routing to it at once and
    drain what waits in its queue to the workers still alive (also run as soon as a clean
    shutdown begins, while the tasks still running finish: the worker takes no new job)."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def is_self(worker: Mapping[str, Any]) -> bool:
    """Whether a live worker's heartbeat is this process's own."""
    return _heartbeat is not None and worker.get("pid") == os.getpid() and worker.get("hostname") == _heartbeat.hostname


# --------------------------------------------------------------------------- listener side


class Router:
    """Picks each job's queue from the live workers, and drains queues nobody consumes."""

    def __init__(self, client: redis.Redis, settings: FleetSettings = FleetSettings(), cache_s: float = 1.0,
                 restore: Callable[[], None] | None = None, release: Callable[[], Any] | None = None) -> None:
        self.client = client
        self.settings = settings
        self.cache_s = cache_s
        #: returns expired deliveries of dead workers to their queues first (see restore_expired)
        self.restore = restore
        #: queues the parked retries that are due (see release_parked)
        self.release = release
        self._cached: tuple[float, list[dict[str, Any]]] = (-1e18, [])
        self._lock = threading.Lock()
        #: where the next drain goes on looking in each key of the default queue (messages from
        #: the consumers' end)
        self._legacy_from: dict[str, int] = {}

    @classmethod
    def from_url(cls, url: str, settings: FleetSettings = FleetSettings(), cache_s: float = 1.0,
                 restore: Callable[[], None] | None = None, release: Callable[[], Any] | None = None) -> "Router":
        return cls(redis.Redis.from_url(url), settings, cache_s, restore, release)

    def workers(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Live workers, read at most once per ``cache_s`` (every job asks)."""
        with self._lock:
            at, workers = self._cached
            now = time.monotonic()
            if fresh or now - at > self.cache_s:
                workers = live_workers(self.client)
                self._cached = (now, workers)
            return workers

    def consumers(self, queue: str, workers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        return [w for w in (self.workers() if workers is None else workers) if queue in w.get("queues", ())]

    def choose(self, kind: str = "mention", workers: list[dict[str, Any]] | None = None) -> str:
        """The queue for a new job of ``kind``."""
        workers = self.workers() if workers is None else workers
        gpu = self.consumers(GPU_QUEUE, workers)
        cpu = self.consumers(CPU_QUEUE, workers)
        if kind == "takedown" and cpu:
            return CPU_QUEUE
        if gpu:
            if not cpu or queue_depth(self.client, GPU_QUEUE) < self.settings.gpu_queue_limit * len(gpu):
                return GPU_QUEUE
            return CPU_QUEUE  # the GPUs are saturated: spill over
        if cpu:
            return CPU_QUEUE
        if self.consumers(LEGACY_QUEUE, workers):
            return LEGACY_QUEUE
        return CPU_QUEUE  # nobody is alive: wait where CPU workers (the default) will look

    def drain(self) -> dict[str, int]:
        """Queue the parked retries that are due, then move jobs out of our queues that no live
        worker consumes; returns ``{source: moved}``."""
        if self.release is not None:
            self.release()
        workers = self.workers(fresh=True)
        if not workers:
            return {}  # nobody to hand them to: leave them where they are
        if self.restore is not None:
            self.restore()
        moved: dict[str, int] = {}
        for source in (GPU_QUEUE, CPU_QUEUE, LEGACY_QUEUE):
            if self.consumers(source, workers):
                continue
            target = self.choose("mention", workers)
            if target == source or not self.consumers(target, workers):
                continue
            count = 0
            for key in _queue_keys(source):
                if source == LEGACY_QUEUE:
                    count += self._move_own_tasks(key, target)
                    continue
                while True:
                    batch = int(self.client.eval(_MOVE_RETARGETED, 2, key, target, source, target, MOVE_BATCH))
                    count += batch
                    if batch < MOVE_BATCH:
                        break
            if count:
                moved[source] = count
                log.warning("queue_drained", extra={"source": source, "target": target, "jobs": count})
        return moved

    def _move_own_tasks(self, key: str, target: str) -> int:
        """Move this bot's tasks from ``key`` of the default queue to ``target``, looking at no
        more than ``LEGACY_WINDOWS_PER_DRAIN`` windows; the next drain goes on from there, and
        starts again from the consumers' end once it reached the other one."""
        skip, moved = self._legacy_from.get(key, 0), 0
        for _ in range(LEGACY_WINDOWS_PER_DRAIN):
            here, seen = (int(n) for n in self.client.eval(_MOVE_OWN_TASKS, 2, key, target, TASK_PREFIX, skip, LEGACY_WINDOW,
                                                                       LEGACY_QUEUE, target))
            moved += here
            if seen < LEGACY_WINDOW:
                skip = 0
                break
            skip += seen - here
        self._legacy_from[key] = skip
        return moved

    def run(self, stop: threading.Event) -> None:
        """Drain every ``drain_interval_s`` until ``stop`` is set (the listener runs this)."""
        while not stop.wait(self.settings.drain_interval_s):
            try:
                self.drain()
            except Exception:  # Redis or the broker hiccups: the next round tries again
                log.warning("drain_failed", exc_info=True)


def release_parked(store: Any, publish: Callable[[dict[str, Any], int], None], now: float | None = None) -> int:
    """Queue the parked retries that are due (``publish(job, retries)``); returns how many.

    A retry that must wait longer than half the visibility timeout (a platform's rate-limit
    window) is parked in Redis by its task instead of becoming a Celery countdown: a countdown is
    a message the worker holds unacknowledged until it is due, and Redis hands a message held
    past the visibility timeout to another worker, so the job would run twice or more. The
    listeners' drain releases parked jobs. A job whose publishing fails is parked again for the
    next drain; one taken by a listener that died before publishing it, a few minutes later.
    """
    taken = store.take_due(time.time() if now is None else now)
    released = 0
    try:
        for entry in taken:
            publish(entry["job"], int(entry["retries"]))
            store.released(entry)
            released += 1
    finally:
        for entry in taken[released:]:  # taken, not yet queued: never drop them
            store.unrelease(entry, time.time())
    if released:
        log.info("parked_released", extra={"jobs": released})
    return released


def restore_expired(app: Any) -> None:
    """Return deliveries older than the visibility timeout to their queues, now.

    Kombu does this in every consumer, but only every ``unacked_restore_interval *
    unacked_restore_throttle`` seconds (100 s by default); the listener's drain calls it so that
    the jobs a dead GPU worker had taken reach the CPU workers within a drain interval of the
    visibility timeout. Same operation, same mutex as Kombu's own sweep.
    """
    with app.connection_for_write() as connection:
        connection.default_channel.qos.restore_visible(num=1000, interval=1)
