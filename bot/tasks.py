"""Celery tasks: ``celery -A bot.tasks worker``.

Reliability: tasks are acknowledged late and rejected when the worker process is lost, so a
worker killed mid-task loses nothing (Redis redelivers the job after the visibility timeout);
platform 429s and 5xx are retried with backoff honouring the server's reset time; after
``BOT_MAX_ATTEMPTS`` a job goes to the dead-letter list with its reason and the requester gets
a short apology instead of silence.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from functools import lru_cache
from typing import Any

import numpy as np
from celery import Celery, signals

# First: metrics switch prometheus_client to multiprocess mode before anything imports it; both
# modules connect worker signals (heartbeats, role queue, metrics server).
from . import metrics, routing
from anonymiser.errors import WeightsError
from anonymiser.limits import Limits
from anonymiser.locators.registry import default_weights_dir, resolve_names
from anonymiser.pipeline import Anonymiser, Settings

from . import logs, messages
from .config import BotConfig, ConfigError
from .handler import Job, MentionHandler
from .platforms.base import PlatformError, RateLimited
from .platforms.registry import make
from .store import Store
from .takedown import TakedownHandler

log = logging.getLogger("bot.tasks")

_VISIBILITY_TIMEOUT_S = int(os.environ.get("BOT_VISIBILITY_TIMEOUT", "900") or 900)
_TIME_LIMIT_S = int(os.environ.get("BOT_TASK_TIME_LIMIT", "600") or 600)

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
    task_time_limit=_TIME_LIMIT_S + 30,
    worker_hijack_root_logger=False,
    # Prefork children keep the real stderr, so their JSON job lines reach the worker log.
    worker_redirect_stdouts=False,
)


@signals.worker_init.connect
def _validate_at_start(sender: Any = None, **_: Any) -> None:
    """Fail at start-up, with every problem listed, rather than on the first job."""
    logs.setup()
    try:
        settings = BotConfig.from_env()
    except ConfigError as exc:
        # Celery logs and swallows exceptions raised by signal handlers (the worker would start
        # anyway and fail every job); SystemExit is not swallowed and stops the worker.
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    try:  # checks files without loading anything, so prefork workers are covered too
        resolve_names(settings.locators, settings.weights_dir or default_weights_dir())
    except (WeightsError, ValueError) as exc:
        print(f"cannot load the models: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    pool = getattr(sender, "pool_cls", "")
    pool_name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"
    # Prefork children would inherit models (and a CUDA context) loaded here, which neither
    # ONNX Runtime's thread pools nor CUDA survive: they load their own on their first job.
    if routing.settings_or_exit().role == "gpu" and "prefork" not in pool_name.lower():
        _warm_up()


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
    log.info("worker_warm", extra={"seconds": round(time.monotonic() - started, 3)})


@signals.worker_process_init.connect
def _child_logging(**_: Any) -> None:
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


_anonymiser_lock = threading.Lock()


@lru_cache(maxsize=1)
def _load_anonymiser() -> Anonymiser:
    settings = Settings(locators=config().locators, limits=Limits.from_env())
    if routing.FleetSettings.from_env().role == "gpu":
        from .accelerated import build_anonymiser

        return metrics.instrument(build_anonymiser(settings, config().weights_dir, on_batch=metrics.observe_batch))
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
    """Best effort: tell the requester we gave up, so they are not left in silence."""
    try:
        client = platform(job.platform)
        request = client.get_post(job.post_id)
        client.direct_message(request.account, messages.APOLOGY, in_reply_to=request, idempotency_key=f"ppb-apology-{job.platform}-{job.post_id}-{job.requester_id}")
    except Exception:  # the platform may be the very thing that is down
        log.warning("apology_failed", extra={"post_id": job.post_id}, exc_info=True)


def backoff_s(attempt: int, exc: PlatformError) -> float:
    """Seconds before the next attempt: the server's reset time for 429s, else exponential."""
    if isinstance(exc, RateLimited):
        return max(1.0, exc.retry_after_s)
    return float(min(300, 2 ** attempt))


@app.task(bind=True, name="bot.handle", max_retries=None)
def handle(self, payload: dict[str, Any]) -> str:  # type: ignore[no-untyped-def]
    """One job from the listener. Never raises except to schedule a retry."""
    job = Job.from_dict(payload)
    timer = logs.Timer()
    ids = {"platform": job.platform, "post_id": job.post_id, "kind": job.kind, "attempt": self.request.retries + 1}
    try:
        outcome = run_job(job)
    except PlatformError as exc:
        attempt = self.request.retries + 1
        if exc.retryable and attempt < config().max_attempts:
            delay = backoff_s(attempt, exc)
            log.warning("retry", extra=ids | {"error": type(exc).__name__, "status": exc.status, "delay_s": delay})
            raise self.retry(countdown=delay, exc=exc)
        store().dead_letter(payload, f"{type(exc).__name__}: {exc}")
        log.error("dead_letter", extra=ids | {"error": type(exc).__name__, "status": exc.status})
        _apologise(job)
        return "dead_letter"
    except Exception as exc:  # a bug or an unexpected input must not kill the worker
        store().dead_letter(payload, f"{type(exc).__name__}: {exc}")
        log.exception("dead_letter", extra=ids | {"error": type(exc).__name__})
        _apologise(job)
        return "dead_letter"
    log.info("job_done", extra=ids | {"outcome": outcome, "s": timer()})
    return outcome
