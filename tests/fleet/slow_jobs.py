"""Imported before Celery starts a test worker (``Fleet.launch(preload=...)``): every job first
waits ``PPB_TEST_JOB_SECONDS`` (after saying so on stderr), then runs for real."""

from __future__ import annotations

import os
import sys
import time

import bot.tasks as tasks

_real = tasks.run_job


def _slow_run_job(job):  # type: ignore[no-untyped-def]
    print(f"slow_job_started {job.post_id}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("PPB_TEST_JOB_SECONDS", "5")))
    return _real(job)


tasks.run_job = _slow_run_job
