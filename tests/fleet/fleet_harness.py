"""Several real Celery worker processes at once, each with its own role, queues, pool and metrics
port (the fleet tests and ``bench/gpu.py``). Built on the bot suite's harness (``tests/bot``),
which must be importable (its folder on ``sys.path``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from bot_harness import REPO, RedisServer, Workers, free_port, terminate, wait_until
from fake_mastodon import FakeMastodon

#: heartbeats every half second (alive for 1.5 s after the last one) keep the tests short
HEARTBEAT_S = "0.5"


class Worker:
    """One ``celery -A bot.tasks worker`` process of the fleet."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], out: Path, err: Path, metrics_port: int | None) -> None:
        self.name = name
        self.process = process
        self.out, self.err = out, err
        self.metrics_port = metrics_port

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return b"".join(p.read_bytes() for p in (self.out, self.err) if p.exists()).decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no heartbeat removal, no requeue."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        terminate(self.process)

    def scrape(self) -> str:
        assert self.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()


class Fleet:
    """Starts and tracks worker processes; their environment is the bot suite's (``Workers.env``)."""

    def __init__(self, redis_server: RedisServer, fake: FakeMastodon, root: Path) -> None:
        self.harness = Workers(redis_server, fake, root)  # environment and empty weights folder
        self.root = root
        self.workers: list[Worker] = []

    def launch(self, name: str, *, queues: str | None = None, pool: str = "solo", concurrency: int = 1,
               metrics: bool = False, weights: Path | None = None, preload: str | None = None, **env: str) -> Worker:
        """Start a worker (does not wait for it to be ready; see :meth:`ready`).

        ``preload``: a module of ``tests/fleet`` imported before Celery starts (fault injection).
        """
        tmpdir = self.root / f"tmp-{name}"
        tmpdir.mkdir(exist_ok=True)
        out, err = self.root / f"{name}.out", self.root / f"{name}.err"
        port = free_port() if metrics else None
        extra = {"TMPDIR": str(tmpdir), "PYTHONPATH": Workers.python_path(), "BOT_HEARTBEAT_INTERVAL": HEARTBEAT_S, **env}
        if port is not None:
            extra["BOT_METRICS_PORT"] = str(port)
        if weights is not None:
            extra["ANON_WEIGHTS_DIR"] = str(weights)
        python = [sys.executable, "-m", "celery"]
        if preload is not None:
            extra["PYTHONPATH"] = os.pathsep.join((str(Path(__file__).parent), extra["PYTHONPATH"]))
            python = [sys.executable, "-c", f"import {preload}; from celery.__main__ import main; main()"]
        command = [*python, "-A", "bot.tasks", "worker", "--pool", pool,
                   "--concurrency", str(concurrency), "--loglevel", "INFO", "-n", f"{name}-{os.getpid()}@%h",
                   "--without-mingle", "--without-gossip"]
        if queues:
            command += ["-Q", queues]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(command, cwd=REPO, env=self.harness.env(**extra), stdout=stdout, stderr=stderr)
        worker = Worker(name, process, out, err, port)
        self.workers.append(worker)
        return worker

    @staticmethod
    def ready(*workers: Worker, timeout: float = 90.0) -> None:
        def all_ready() -> bool:
            for w in workers:
                if not w.alive():
                    raise AssertionError(f"worker {w.name} exited with {w.process.returncode}:\n{w.log()[-4000:]}")
            return all(b" ready." in w.err.read_bytes() for w in workers)

        wait_until(all_ready, timeout, "the Celery workers to be ready", interval=0.1)

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()
