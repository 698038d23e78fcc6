"""Prometheus metrics of a worker, served on ``BOT_METRICS_PORT`` (unset: no server).

Celery's prefork pool runs tasks in child processes, so the counters use prometheus_client's
multiprocess mode: every process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(a fresh temporary folder created at import when the variable is not set) and the worker's main
process serves their sum. This module must therefore be imported before anything else imports
``prometheus_client`` (``bot/tasks.py`` imports it first).

Exported (all prefixed ``ppb_``):

* ``jobs_total{kind, outcome, queue}``: finished task runs by outcome (``replied``,
  ``already_done``, ``no_image``, ``failed``, ``dead_letter``, ``retry``, ``parked``,
  ``handed_over``, ``requeued``, ...);
* ``job_failures_total{reason}``: ``retry`` (a platform error, retried now or parked), ``device`` (this
  worker's GPU failed; the job went to another worker) and ``dead_letter``;
* ``photos_total{result}``: photos anonymised (``ok``) or refused (``failed``);
* ``job_seconds{kind}`` (processing time of one task run), ``job_latency_seconds`` (from the
  listener's enqueue to the end of the task that answered), ``photo_seconds``: histograms;
* ``batch_size``, ``batch_seconds``: histograms of the GPU worker's LSC-CNN batches;
* ``precision_checks_total{result}`` (``agreed`` / ``failed``), ``precision_check_boxes_total{kind}``
  (``reference``, ``identical``, ``uncovered``) and ``precision_fallbacks_total``: the GPU
  worker's checks of its reduced precision (fp16, bf16, tf32) against IEEE float32, one photo in
  ``ANON_LSCCNN_CHECK_EVERY`` (``anonymiser.batching.engine.LSCCNNEngine.finish``);
* read from Redis at each scrape: ``queue_depth{queue}``, ``workers_alive{role}`` (from the
  heartbeats), ``dead_letters``, and ``worker_up{hostname, role}`` = 1.

The failure and photo series exist from the start, at 0: ``increase()`` of a series that first
appears at 1 is 0, so alerts on them would miss each process's first failure.

Photos per second is ``rate(ppb_photos_total[1m])``; latency percentiles come from
``histogram_quantile`` over ``ppb_job_latency_seconds_bucket``. Queue depths, workers alive and
dead letters are fleet-wide, so every worker reports the same value: aggregate with ``max``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any, Iterator

_OWN_DIR: str | None = None
if os.environ.get("BOT_METRICS_PORT", "").strip() and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _OWN_DIR = tempfile.mkdtemp(prefix="ppb-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _OWN_DIR

import redis  # noqa: E402
from celery import signals  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

from anonymiser.errors import DeviceFailure  # noqa: E402

if TYPE_CHECKING:
    from anonymiser.batching.agreement import PrecisionCheck

from .platforms.registry import PLATFORMS  # noqa: E402
from .routing import CPU_QUEUE, GPU_QUEUE, LEGACY_QUEUE, ROLES, live_workers, queue_depth, settings_or_exit  # noqa: E402

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

JOBS = Counter("ppb_jobs_total", "Finished task runs by outcome", ["kind", "outcome", "queue"])
FAILURES = Counter("ppb_job_failures_total", "Task runs that failed (retried or dead-lettered)", ["reason"])
PHOTOS = Counter("ppb_photos_total", "Photos anonymised (ok) or refused (failed)", ["result"])
JOB_SECONDS = Histogram("ppb_job_seconds", "Processing time of one task run", ["kind"], buckets=_SECONDS)
LATENCY = Histogram("ppb_job_latency_seconds", "From the listener's enqueue to the job's answer", buckets=_SECONDS)
PHOTO_SECONDS = Histogram("ppb_photo_seconds", "Time to anonymise one photo", buckets=_SECONDS)
BATCH_SIZE = Histogram("ppb_batch_size", "Photos (or tiles) per LSC-CNN batch", buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64))
BATCH_SECONDS = Histogram("ppb_batch_seconds", "One LSC-CNN batch, from issuing it to its logits on the host", buckets=_SECONDS)
CHECKS = Counter("ppb_precision_checks_total", "Photos run again in float32 to check the reduced precision", ["result"])
CHECK_BOXES = Counter("ppb_precision_check_boxes_total",
                      "Boxes of the checked photos: float32's (reference), equal in both, float32 heads left uncovered", ["kind"])
FALLBACKS = Counter("ppb_precision_fallbacks_total", "Failed checks that switched the worker's LSC-CNN to float32")

_started: dict[str, float] = {}

#: label values whose series are created at 0 in every process (see the module docstring)
#: a withdrawal check due longer ago than this counts as overdue: a sweep every 5 minutes, a claim
#: held 15 minutes by a listener that died, and a rate-limit pause all stay well within it
OVERDUE_AFTER_S = 3600
FAILURE_REASONS = ("retry", "device", "dead_letter")
PHOTO_RESULTS = ("ok", "failed")
CHECK_RESULTS = ("agreed", "failed")
CHECK_BOX_KINDS = ("reference", "identical", "uncovered")


def _zero_series() -> None:
    for reason in FAILURE_REASONS:
        FAILURES.labels(reason)
    for result in PHOTO_RESULTS:
        PHOTOS.labels(result)
    for result in CHECK_RESULTS:
        CHECKS.labels(result)
    for kind in CHECK_BOX_KINDS:
        CHECK_BOXES.labels(kind)


_zero_series()


def _outcome(state: str | None, retval: Any) -> str:
    """A task run's outcome label: the handler's own word, or Celery's state."""
    if state == "SUCCESS" and isinstance(retval, str):
        return retval
    # A retry's return value is Celery's Retry, whose ``exc`` is what caused it; none for a job
    # sent on to a CPU worker after a loss beside others (tasks._isolate), which is no failure.
    if state == "RETRY" and isinstance(getattr(retval, "exc", None), DeviceFailure):
        return "handed_over"
    if state == "RETRY" and getattr(retval, "exc", None) is None:
        return "requeued"
    return str(state or "unknown").lower()


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    BATCH_SECONDS.observe(seconds)


def observe_check(check: PrecisionCheck) -> None:
    """Count one check of the reduced precision against float32."""
    CHECKS.labels("failed" if check.failed else "agreed").inc()
    found = check.agreement
    for kind, value in zip(CHECK_BOX_KINDS, (found.reference, found.identical, found.uncovered)):
        CHECK_BOXES.labels(kind).inc(value)
    if check.fell_back:
        FALLBACKS.inc()


def instrument(anonymiser: Any) -> Any:
    """Count and time every ``anonymiser.anonymise`` call (the object is returned, patched)."""
    original = anonymiser.anonymise

    def anonymise(data: bytes, **budgets: Any) -> Any:
        start = time.perf_counter()
        try:
            result = original(data, **budgets)
        except DeviceFailure:
            raise  # the GPU failed, not the photo: the worker it is handed to counts it
        except Exception:
            PHOTOS.labels("failed").inc()
            raise
        PHOTOS.labels("ok").inc()
        PHOTO_SECONDS.observe(time.perf_counter() - start)
        return result

    anonymiser.anonymise = anonymise
    return anonymiser


@signals.task_prerun.connect
def _task_started(task_id: str, task: Any, **_: Any) -> None:
    if task.name == "bot.handle":
        _started[task_id] = time.perf_counter()


@signals.task_postrun.connect
def _task_finished(task_id: str, task: Any, args: Any = (), retval: Any = None, state: str | None = None, **_: Any) -> None:
    if task.name != "bot.handle":
        return
    started = _started.pop(task_id, None)
    payload = args[0] if args and isinstance(args[0], dict) else {}
    kind = str(payload.get("kind", "unknown"))
    queue = str((getattr(task.request, "delivery_info", None) or {}).get("routing_key") or "unknown")
    outcome = _outcome(state, retval)
    JOBS.labels(kind, outcome, queue).inc()
    if outcome in ("retry", "parked", "dead_letter", "failure", "handed_over"):
        FAILURES.labels({"handed_over": "device", "parked": "retry"}.get(outcome, outcome)).inc()
    if started is not None:
        JOB_SECONDS.labels(kind).observe(time.perf_counter() - started)
    enqueued_at = payload.get("enqueued_at")
    # Only a run that ends the job is timed from its enqueueing: a retried, parked, handed-over
    # or requeued one (``rejected``: put back in its queue when Redis failed under it) will be
    # timed when it is answered, and counting both inflated the latency quantiles just when
    # Redis was in trouble.
    if outcome not in ("retry", "parked", "handed_over", "requeued", "rejected") and enqueued_at:
        try:
            LATENCY.observe(max(0.0, time.time() - float(enqueued_at)))
        except (TypeError, ValueError):
            pass


class FleetCollector:
    """Fleet-wide gauges read from Redis at scrape time (the worker's main process only)."""

    def __init__(self, client: redis.Redis, hostname: str, role: str) -> None:
        self.client = client
        self.hostname = hostname
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self._up()
        try:
            depth = GaugeMetricFamily("ppb_queue_depth", "Jobs waiting per queue", labels=["queue"])
            for queue in (GPU_QUEUE, CPU_QUEUE, LEGACY_QUEUE):
                depth.add_metric([queue], queue_depth(self.client, queue))
            alive = GaugeMetricFamily("ppb_workers_alive", "Workers with a fresh heartbeat", labels=["role"])
            workers = live_workers(self.client)
            for role in ROLES:
                alive.add_metric([role], sum(1 for w in workers if w.get("role") == role))
            dead = GaugeMetricFamily("ppb_dead_letters", "Jobs in the dead-letter list ppb:dead",
                                     value=int(self.client.llen("ppb:dead")))
            overdue = GaugeMetricFamily(
                "ppb_withdrawal_checks_overdue",
                "Copied originals whose withdrawal check is more than an hour overdue", labels=["platform"])
            late = time.time() - OVERDUE_AFTER_S
            for platform in PLATFORMS:
                overdue.add_metric([platform], int(self.client.zcount(f"ppb:watch:{platform}", "-inf", late)))
        except redis.RedisError:
            yield GaugeMetricFamily("ppb_redis_up", "Redis answered the scrape", value=0)
            return
        yield GaugeMetricFamily("ppb_redis_up", "Redis answered the scrape", value=1)
        yield depth
        yield alive
        yield dead
        yield overdue

    def _up(self) -> GaugeMetricFamily:
        up = GaugeMetricFamily("ppb_worker_up", "This worker is running", labels=["hostname", "role"])
        up.add_metric([self.hostname, self.role], 1)
        return up


_server: Any = None


@signals.worker_ready.connect
def _serve(sender: Any, **_: Any) -> None:
    global _server
    settings = settings_or_exit()
    if settings.metrics_port is None:
        return
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # pragma: no cover - only when prometheus_client was imported before this module
        from prometheus_client import REGISTRY

        registry = REGISTRY
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    registry.register(FleetCollector(redis.Redis.from_url(sender.app.conf.broker_url), hostname, settings.role))
    try:
        _server, _thread = start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:
        # Celery swallows errors of signal handlers: without this line a second worker on a
        # machine whose shared .env names one port would export nothing, silently.
        logging.getLogger("bot.metrics").error(
            "metrics_port_unavailable", extra={"port": settings.metrics_port, "error": exc.strerror or str(exc)}
        )
        return
    logging.getLogger("bot.metrics").info("metrics_serving", extra={"port": settings.metrics_port})


@signals.worker_process_shutdown.connect
def _child_gone(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


@signals.worker_shutdown.connect
def _cleanup(**_: Any) -> None:
    if _server is not None:
        _server.shutdown()
    if _OWN_DIR is not None:
        shutil.rmtree(_OWN_DIR, ignore_errors=True)
