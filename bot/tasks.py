"""Celery tasks: ``celery -A bot.tasks worker``.

Reliability: tasks are acknowledged late and rejected when the worker process is lost, so a
worker killed mid-task loses nothing (Redis redelivers the job after the visibility timeout);
platform 429s and 5xx are retried with backoff honouring the server's reset time; after
``BOT_MAX_ATTEMPTS`` a job goes to the dead-letter list with its reason and the requester gets
a short apology instead of silence. A job that kills the worker running it (a photo that
exhausts memory, a crash) is given up after ``BOT_MAX_WORKER_LOSSES`` runs (:func:`_admit_run`)
instead of killing every worker in turn. A GPU that fails on a job that is fine hands the job to
another worker, and repeated failures take the worker out of rotation (:func:`_hand_over`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from functools import lru_cache
from typing import Any

from .config import ConfigError, load_env_file

# The worker reads .env as ``python -m bot`` does, before anything else is imported: the metrics
# module picks its mode from BOT_METRICS_PORT at import, and numpy's BLAS reads its thread
# settings then. A broken file stops the worker at worker_init, with the lines at fault.
try:
    load_env_file()
    _ENV_FILE_PROBLEM: ConfigError | None = None
except ConfigError as _exc:
    _ENV_FILE_PROBLEM = _exc

import numpy as np  # noqa: E402
import redis
from celery import Celery, signals
from celery.exceptions import Reject

# First: metrics switch prometheus_client to multiprocess mode before anything imports it; both
# modules connect worker signals (heartbeats, role queue, metrics server).
from . import metrics, routing
from anonymiser.errors import DeviceFailure, WeightsError
from anonymiser.limits import Limits
from anonymiser.process import forbid_core_dumps
from anonymiser.pipeline import Anonymiser, Settings

from . import logs, messages
from .config import HARD_LIMIT_GRACE_S, BotConfig, check_startup, int_or_default
from .handler import Job, MentionHandler
from .platforms.base import PlatformError, RateLimited
from .platforms.registry import make
from .store import Store
from .takedown import TakedownHandler

log = logging.getLogger("bot.tasks")

# Needed before the configuration is validated (at worker_init, which lists bad values).
_VISIBILITY_TIMEOUT_S = int_or_default("BOT_VISIBILITY_TIMEOUT", BotConfig.visibility_timeout_s)
_TIME_LIMIT_S = int_or_default("BOT_TASK_TIME_LIMIT", BotConfig.task_time_limit_s)

app = Celery("bot")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": _VISIBILITY_TIMEOUT_S},
    # A task should end before Redis hands its job to a second worker (keep
    # BOT_TASK_TIME_LIMIT below BOT_VISIBILITY_TIMEOUT); the soft limit leaves time to apologise.
    task_soft_time_limit=_TIME_LIMIT_S,
    task_time_limit=_TIME_LIMIT_S + HARD_LIMIT_GRACE_S,
    # A run the hard limit kills goes back to the queue like one whose worker died, so the next
    # run counts it as a worker loss (BOT_MAX_WORKER_LOSSES) and the requester is told in the end;
    # acknowledged (Celery's default), the job vanished without a dead letter or a word.
    task_acks_on_timeout=False,
    worker_hijack_root_logger=False,
    # Prefork children keep the real stderr, so their JSON job lines reach the worker log.
    worker_redirect_stdouts=False,
)


#: whether this worker runs several jobs side by side in one process (a thread pool), so that a
#: job killing the process takes the others with it (set at start)
_side_by_side = False


@signals.worker_init.connect
def _validate_at_start(sender: Any = None, **_: Any) -> None:
    """Fail at start-up, with every problem listed, rather than on the first job."""
    forbid_core_dumps()  # before any photo is in memory; prefork children inherit it
    logs.setup()
    try:
        if _ENV_FILE_PROBLEM is not None:
            raise _ENV_FILE_PROBLEM
        settings = check_startup(worker=True)
    except ConfigError as exc:
        # Celery logs and swallows exceptions raised by signal handlers (the worker would start
        # anyway and fail every job); SystemExit is not swallowed and stops the worker.
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    for risk in settings.risks():
        log.warning("config_risk", extra={"risk": risk})
    pool = getattr(sender, "pool_cls", "")
    pool_name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"
    global _side_by_side
    cores = usable_cores()
    concurrency = getattr(sender, "concurrency", 1) or 1
    if not isinstance(concurrency, int):  # "--concurrency auto" is still a string here
        concurrency = cores
    _side_by_side = not any(n in pool_name.lower() for n in ("prefork", "solo")) and concurrency > 1
    if "prefork" in pool_name.lower() and not os.environ.get("ANON_ONNX_THREADS", "").strip():
        os.environ["ANON_ONNX_THREADS"] = str(onnx_threads_per_child(concurrency, cores))
        log.info("onnx_threads", extra={"per_child": os.environ["ANON_ONNX_THREADS"], "children": concurrency,
                                        "cores": cores})
    if routing.settings_or_exit().role == "gpu":
        if "prefork" in pool_name.lower():
            # Each prefork child would load its own model and batch only its own photo, and a
            # child can neither withdraw the worker's heartbeat nor stop the worker when the
            # GPU fails (its hand-over would pick this very worker again).
            print("a GPU worker (BOT_WORKER_ROLE=gpu) runs one process whose tasks share the model: "
                  "start it with --pool threads --concurrency 32 (or --pool solo)", file=sys.stderr)
            raise SystemExit(2)
        _warm_up()


def onnx_threads_per_child(children: int, cores: int | None = None) -> int:
    """ONNX Runtime threads for each of a prefork worker's ``children`` when the operator set
    none: the cores shared out, at least one. ONNX Runtime's default, a thread per core in every
    child, put cores x children threads on the cores (measured best: one child per core, one
    thread each; README "Measured (fleet)"). Children inherit it from the worker's environment."""
    return max(1, (cores or usable_cores()) // max(1, children))


def usable_cores() -> int:
    """The cores this process may use, not the machine's: its CPU affinity (a container's
    cpuset) and its cgroup CPU quota (``docker --cpus``, a Kubernetes limit), as Celery itself
    sizes ``--concurrency auto``; 2 CPUs of a 64-core host are 2."""
    try:
        from celery.utils.sysinfo import cpu_budget  # Celery 5.7+
    except ImportError:
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return max(1, cpu_budget().count)


def _warm_up() -> None:
    """A GPU worker loads its models and runs one photo before it announces itself.

    Its heartbeat (what makes listeners route jobs to it) starts only at ``worker_ready``, after
    this, so no job waits behind model loading, cuDNN autotuning or compilation, and missing
    weights stop the worker at start instead of failing its first jobs.
    """
    started = time.monotonic()
    try:
        # Small: loading, CUDA start-up and first kernels are what take long, not the pixels.
        anonymiser().locate(np.full((256, 256, 3), 128, np.uint8))
    except (WeightsError, ValueError) as exc:
        print(f"cannot load the models: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        # Not only RuntimeErrors: torch raises AssertionError for a device index the machine
        # lacks (ANON_LSCCNN_DEVICE=cuda:1 on one GPU) or a CUDA device on a CPU build, and
        # ONNX Runtime's errors derive from Exception alone. Celery logs and swallows whatever
        # else a signal handler raises: the worker would announce itself and fail every job.
        print(f"the GPU failed the warm-up: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(EX_UNAVAILABLE) from None
    log.info("worker_warm", extra={"seconds": round(time.monotonic() - started, 3)})


@signals.worker_process_init.connect
def _child_logging(**_: Any) -> None:
    forbid_core_dumps()  # inherited already; a child started some other way gets it too
    logs.setup()


@lru_cache(maxsize=1)
def config() -> BotConfig:
    return BotConfig.from_env()


@lru_cache(maxsize=1)
def store() -> Store:
    return Store.from_url(config().redis_url)


@lru_cache(maxsize=None)
def platform(name: str):  # type: ignore[no-untyped-def]
    return make(name, config())


#: exit status of a GPU worker whose device fails (sysexits' "service unavailable")
EX_UNAVAILABLE = 69


class DeviceHealth:
    """Consecutive device failures of this worker; an LSC-CNN batch that runs clears them (a
    GPU run of an ONNX locator does only on a worker without LSC-CNN: see build_anonymiser)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures = 0

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def failed(self) -> int:
        """Count one more failure; returns how many in a row."""
        with self._lock:
            self._failures += 1
            return self._failures


_device_health = DeviceHealth()


def _on_batch(size: int, seconds: float) -> None:
    _device_health.succeeded()
    metrics.observe_batch(size, seconds)


_anonymiser_lock = threading.Lock()


@lru_cache(maxsize=1)
def _load_anonymiser() -> Anonymiser:
    settings = Settings(locators=config().locators, limits=Limits.from_env())
    if routing.FleetSettings.from_env().role == "gpu":
        from .accelerated import build_anonymiser

        return metrics.instrument(build_anonymiser(settings, config().weights_dir, on_batch=_on_batch,
                                                   on_success=_device_health.succeeded,
                                                   on_check=metrics.observe_check))
    return metrics.instrument(Anonymiser(settings, weights_dir=config().weights_dir))


def anonymiser() -> Anonymiser:
    """Loaded once per worker process (once, even with a thread pool); the models stay in memory."""
    with _anonymiser_lock:
        return _load_anonymiser()


def run_job(job: Job) -> str:
    """Dispatch one job to its handler."""
    if job.kind == "takedown":
        return TakedownHandler(platform(job.platform), store(), config().takedowns_per_account_per_hour).handle(job)
    return MentionHandler(platform(job.platform), store(), anonymiser(), config()).handle(job)


def _apologise(job: Job) -> None:
    """Best effort: tell the requester we gave up, so they are not left in silence. Nobody
    asked for a hashtag job: its author gets no message from the bot about it."""
    if job.kind == "hashtag":
        return
    try:
        client = platform(job.platform)
        request = client.get_post(job.post_id)
        client.direct_message(request.account, messages.APOLOGY, in_reply_to=request, idempotency_key=f"ppb-apology-{job.platform}-{job.post_id}-{job.requester_id}")
    except Exception:  # the platform may be the very thing that is down
        log.warning("apology_failed", extra={"post_id": job.post_id}, exc_info=True)


def _queue_elsewhere(kind: str) -> str | None:
    """Where routing would send ``kind`` if this worker were not alive; None when no other live
    worker consumes that queue (routing then names the CPU queue only as the place to wait)."""
    client = redis.Redis.from_url(config().redis_url)
    try:
        router = routing.Router(client, routing.settings_or_exit(), cache_s=0)
        others = [w for w in router.workers(fresh=True) if not routing.is_self(w)]
        queue = router.choose(kind, others)
        return queue if router.consumers(queue, others) else None
    finally:
        client.close()


def _take_out_of_rotation(failures: int) -> None:
    """Withdraw the heartbeat (listeners route around this worker and drain its queue) and ask
    Celery for a warm shutdown: running tasks finish, then the process exits with status 69 for
    its supervisor to restart it. A restart re-initialises the GPU; a GPU that is really gone then
    fails the warm-up and the worker stays down, while CPU workers take the jobs."""
    from celery.worker import state

    log.error("worker_withdrawn", extra={"reason": "device_failures", "failures": failures})
    routing.withdraw()
    state.should_stop = EX_UNAVAILABLE


def _hand_over(task: Any, job: Job, payload: dict[str, Any], ids: dict[str, Any], exc: DeviceFailure) -> str:
    """This worker's accelerator failed on a job that is fine: another worker should do it.

    The job is queued again where routing would send it without this worker (a CPU worker,
    another GPU worker); the attempt counts, as for a platform error, so a fleet with no other
    worker cannot loop forever. ``BOT_DEVICE_FAILURE_LIMIT`` failures in a row, with no batch
    running in between, take this worker out of rotation.
    """
    failures = _device_health.failed()
    if failures == routing.settings_or_exit().device_failure_limit:
        _take_out_of_rotation(failures)
    attempt = task.request.retries + 1
    cause = type(exc.__cause__ or exc).__name__
    if attempt < config().max_attempts:
        try:
            queue = _queue_elsewhere(job.kind) or routing.CPU_QUEUE
        except redis.RedisError:  # publishing the retry will tell whether Redis is really down
            queue = routing.CPU_QUEUE
        log.error("device_failure", extra=ids | {"error": cause, "failures": failures, "requeued_to": queue})
        raise task.retry(exc=exc, queue=queue, countdown=0)
    store().dead_letter(payload, f"DeviceFailure: {exc}")
    log.error("dead_letter", extra=ids | {"error": cause})
    _apologise(job)
    return "dead_letter"


def _held_past_visibility(delay: float) -> bool:
    """Whether a Celery countdown of ``delay`` seconds could hold its delivery past the
    visibility timeout.

    Kombu's Redis transport starts a delivery's visibility timeout when the worker receives the
    message (its ``unacked_index`` score), and a countdown retry is received at once: Celery
    then holds it unacknowledged until it is due and, acknowledging late, through its whole run,
    which only the hard time limit bounds. So the countdown plus the longest run must end within
    the timeout; half the timeout at most besides, which leaves room for a wait for a free pool
    slot. (Half alone was not enough: 450 s plus a 630 s run is past the default 900 s.) Where
    the run alone may outlast the timeout (start-up logs that ``config_risk``), parking cannot
    prevent a second run, and only the half applies.
    """
    run_s = _TIME_LIMIT_S + HARD_LIMIT_GRACE_S
    return delay > _VISIBILITY_TIMEOUT_S / 2 or (run_s < _VISIBILITY_TIMEOUT_S and delay + run_s >= _VISIBILITY_TIMEOUT_S)


def backoff_s(attempt: int, exc: PlatformError) -> float:
    """Seconds before the next attempt: the server's reset time for 429s, else exponential."""
    if isinstance(exc, RateLimited):
        return max(1.0, exc.retry_after_s)
    return float(min(300, 2 ** attempt))


def _admit_run(task_id: str, job: Job, payload: dict[str, Any], ids: dict[str, Any]) -> int | None:
    """Count this run and return how many earlier runs of the same delivery were lost with their
    worker; ``None`` (and the job dead-lettered, the requester told) at ``BOT_MAX_WORKER_LOSSES``.

    Redis hands an unacknowledged job to the next worker, which a hostile photo kills the same
    way: without this count one post could take down the whole fleet, one worker after another.
    """
    # Long enough to outlive the visibility timeout a thread-pool worker's loss waits for.
    starts = store().run_started(task_id, ttl_s=2 * _VISIBILITY_TIMEOUT_S + 86_400)
    losses = starts - 1
    if losses < config().max_worker_losses:
        if losses:
            log.warning("worker_lost_before", extra=ids | {"losses": losses})
        return losses
    store().run_finished(task_id)
    store().dead_letter(payload, f"WorkerLost: the worker running this job was lost {losses} times "
                                 "(out of memory, killed or crashed)")
    log.error("dead_letter", extra=ids | {"error": "WorkerLost", "losses": losses})
    _apologise(job)
    return None


def _isolate(task: Any, task_id: str, job: Job, ids: dict[str, Any]) -> None:
    """Send a job whose last run was lost beside others to a CPU worker, if one is alive.

    A worker that runs jobs side by side in one process (a GPU worker's thread pool) dies with all
    of them when one photo kills it, and each would be charged the loss: restored together and
    taken together again, innocent jobs would be dead-lettered with the hostile one. A prefork CPU
    worker runs each job in its own child, so there only the hostile job's runs are lost, and
    counted. Returns (the job runs here, counted as before) when no live CPU worker would take
    it: sent to a queue nobody consumes, the listener's drain brought it straight back, its loss
    count wiped by the move, and a photo that kills workers was retried for ever."""
    try:
        queue = _queue_elsewhere(job.kind)
    except redis.RedisError:
        return
    if queue != routing.CPU_QUEUE or queue == (task.request.delivery_info or {}).get("routing_key"):
        return
    store().run_finished(task_id)  # counted afresh there, one job per process
    log.warning("isolated_after_loss", extra=ids | {"requeued_to": queue})
    raise task.retry(queue=queue, countdown=0)


@app.task(bind=True, name="bot.handle", max_retries=None)
def handle(self, payload: dict[str, Any]) -> str:  # type: ignore[no-untyped-def]
    """One job from the listener. Never raises except to schedule a retry, or to put the job
    back in its queue when Redis fails under it.

    Both of Celery's other endings would drop the message, acknowledged late as it is: a task
    that fails is acknowledged (``task_acks_on_failure``, on by default; off, it is rejected
    without requeueing), and ``Task.retry`` turns a retry it cannot publish into
    ``Reject(requeue=False)``. So a Redis that went away during a run (a restart, a failover)
    or refused the retry or a write of the run (``maxmemory`` reached, see :func:`redis_refused`)
    and answered the acknowledgement lost the job without a dead letter or a word.
    ``Reject(requeue=True)`` puts it back in its queue; while Redis cannot even take that, the
    delivery stays unacknowledged and the visibility timeout brings it back.
    """
    try:
        return _handle(self, payload)
    except Reject as exc:
        if exc.requeue:
            raise
        log.warning("requeued", extra={"reason": "retry_not_published", "error": repr(exc.reason)[:200]})
        raise Reject(exc.reason, requeue=True) from None
    except redis.RedisError as exc:
        if not redis_refused(exc):
            raise
        log.warning("requeued", extra={"reason": "redis_unavailable", "error": type(exc).__name__})
        raise Reject(exc, requeue=True) from None


#: the error replies of a Redis refusing for a while, that redis-py raises as a plain
#: ResponseError: a failed snapshot with ``stop-writes-on-bgsave-error``, a script running past
#: its time, a replica cut off from its master (``replica-serve-stale-data no``), too few
#: replicas for ``min-replicas-to-write``
_PASSING_REFUSALS = ("MISCONF ", "BUSY ", "MASTERDOWN ", "NOREPLICAS ")


def redis_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis being unreachable or refusing writes (at ``maxmemory``, a
    replica after a failover, and :data:`_PASSING_REFUSALS`): a state of the server that
    passes, which says nothing about the job that met it."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                        redis.exceptions.ReadOnlyError)):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_PASSING_REFUSALS)


#: runs that ended while Redis refused to record it (task ids), recorded once it answers
_unfinished: set[str] = set()
_unfinished_lock = threading.Lock()
#: how often a worker tries again to record those
UNFINISHED_RETRY_S = 1.0


def _finish_run(task_id: str) -> None:
    """Record that a run ended, in whatever way a handler saw; never raises.

    A run that ended because Redis went away could not record it either: its start then stayed
    counted, and the job's next delivery took it for a worker lost with it (two Redis blips under
    one job dead-lettered a healthy photo, one blip on a GPU worker charged a loss to every job
    it ran). Such ends are kept here and recorded as soon as Redis answers: before this worker's
    next run, and by a thread in the meantime."""
    try:
        store().run_finished(task_id)
        return
    except redis.RedisError:
        pass
    with _unfinished_lock:
        first = not _unfinished
        _unfinished.add(task_id)
    if first:
        threading.Thread(target=_record_unfinished_until_done, name="ppb-unfinished", daemon=True).start()


#: one recording at a time: a second one, from a snapshot the first already recorded, could
#: delete the start of a new run of the same task made in between
_recording = threading.Lock()


def _record_unfinished() -> bool:
    """Record the kept ends; whether none is left."""
    with _recording:
        with _unfinished_lock:
            pending = list(_unfinished)
        for task_id in pending:
            try:
                store().run_finished(task_id)
            except redis.RedisError:
                return False
            with _unfinished_lock:
                _unfinished.discard(task_id)
        with _unfinished_lock:
            return not _unfinished


def _record_unfinished_until_done() -> None:
    while not _record_unfinished():
        time.sleep(UNFINISHED_RETRY_S)


def _handle(self: Any, payload: dict[str, Any]) -> str:
    """The body of :func:`handle`."""
    _record_unfinished()  # before this run is counted: it may be a redelivery of one of them
    job = Job.from_dict(payload)
    timer = logs.Timer()
    ids = {"platform": job.platform, "post_id": job.post_id, "kind": job.kind, "attempt": self.request.retries + 1}
    task_id = self.request.id or f"local-{job.platform}-{job.post_id}"
    losses = _admit_run(task_id, job, payload, ids)
    if losses is None:
        return "dead_letter"
    if losses and _side_by_side:
        _isolate(self, task_id, job, ids)
    try:
        outcome = _run(self, job, payload, ids, timer)
    except Exception:  # a retry being scheduled, or Redis failing under the run: it ended here
        _finish_run(task_id)
        raise
    # Not on SystemExit: that is the process being ended from outside mid-run (the hard time
    # limit sends SIGTERM before SIGKILL), a lost run the next start must count.
    _finish_run(task_id)
    return outcome


def _run(self: Any, job: Job, payload: dict[str, Any], ids: dict[str, Any], timer: logs.Timer) -> str:
    """The body of :func:`handle`: run the job and apply the retry and failure rules."""
    try:
        outcome = run_job(job)
    except DeviceFailure as exc:
        return _hand_over(self, job, payload, ids, exc)
    except PlatformError as exc:
        attempt = self.request.retries + 1
        if exc.retryable and attempt < config().max_attempts:
            delay = backoff_s(attempt, exc)
            extra = ids | {"error": type(exc).__name__, "status": exc.status, "delay_s": delay}
            if _held_past_visibility(delay):
                # A countdown this long could keep the delivery unacknowledged in this worker
                # past the visibility timeout, and the job would run again elsewhere: park it
                # (routing.release_parked).
                store().park(payload, attempt, time.time() + delay)
                log.warning("parked", extra=extra)
                return "parked"
            log.warning("retry", extra=extra)
            raise self.retry(countdown=delay, exc=exc)
        store().dead_letter(payload, f"{type(exc).__name__}: {exc}")
        log.error("dead_letter", extra=ids | {"error": type(exc).__name__, "status": exc.status})
        _apologise(job)
        return "dead_letter"
    except Exception as exc:  # a bug or an unexpected input must not kill the worker
        if redis_refused(exc):
            raise  # handle() puts the job back in its queue: it may well be answered already
        store().dead_letter(payload, f"{type(exc).__name__}: {exc}")
        log.exception("dead_letter", extra=ids | {"error": type(exc).__name__})
        _apologise(job)
        return "dead_letter"
    log.info("job_done", extra=ids | {"outcome": outcome, "s": timer()})
    return outcome
