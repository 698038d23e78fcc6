"""Imported before Celery starts a test worker (``Fleet.launch(preload=...)``): a job for a post
whose id is listed in the file ``PPB_TEST_STUCK_POSTS`` sits in what looks to Python like one
long native call (a huge decode, a CPU forward pass): SIGUSR1, the soft time limit's signal, is
blocked, so only Celery's hard time limit can end it. Others run for real."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import bot.tasks as tasks

_real = tasks.run_job


def _stuck_run_job(job):  # type: ignore[no-untyped-def]
    if job.post_id in Path(os.environ["PPB_TEST_STUCK_POSTS"]).read_text().split():
        print(f"stuck_job_started {job.post_id}", file=sys.stderr, flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        time.sleep(600)
    return _real(job)


tasks.run_job = _stuck_run_job
