"""Imported before Celery starts a test worker (``Fleet.launch(preload=...)``): a job for a post
whose id is listed in the file ``PPB_TEST_CRASH_POSTS`` kills the process running it with
SIGKILL, as the kernel's out-of-memory killer does (after saying so on stderr), after
``PPB_TEST_CRASH_AFTER_S`` seconds of work (0 by default); others run for real."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import bot.tasks as tasks

_real = tasks.run_job


def _crashing_run_job(job):  # type: ignore[no-untyped-def]
    if job.post_id in Path(os.environ["PPB_TEST_CRASH_POSTS"]).read_text().split():
        print(f"crash_job_started {job.post_id}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("PPB_TEST_CRASH_AFTER_S", "0")))
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(job)


tasks.run_job = _crashing_run_job
