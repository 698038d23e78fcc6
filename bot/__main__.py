"""``python -m bot listen`` (the listener) and ``python -m bot run`` (listener + one worker)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from . import logs
from .config import BotConfig, ConfigError, check_startup, load_env_file


def _checked(worker: bool) -> BotConfig | None:
    """The start-up check; None (and every problem on stderr) when it fails."""
    try:
        return check_startup(worker=worker)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` from now on: a signal before the listener runs must end
    the bot cleanly (and ``run``'s worker with it), not kill the process with the default action."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def listener_platform(config: BotConfig) -> str:
    """The platform a listener process reads (one process per platform): ``BOT_PLATFORM``, else
    Mastodon if configured, else the one that is."""
    named = os.environ.get("BOT_PLATFORM", "").strip().lower()
    return named or ("mastodon" if "mastodon" in config.platforms else config.platforms[0])


def listen(config: BotConfig | None = None, stop: threading.Event | None = None) -> int:
    """Run the listener until SIGINT/SIGTERM or ``stop`` is set (``config``: already checked by
    the caller)."""
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    logs.setup()
    config = config or _checked(worker=False)
    if config is None:
        return 2
    for risk in config.risks():
        logging.getLogger("bot").warning("config_risk", extra={"risk": risk})
    from .listener import Listener
    from .platforms.registry import make
    from .routing import FleetSettings, Router, release_parked, restore_expired
    from .store import Store
    from .tasks import app

    fleet = FleetSettings.from_env()  # validated above

    platform = make(listener_platform(config), config)
    store = Store.from_url(config.redis_url)
    app.conf.broker_url = config.redis_url

    # Each job goes to the queue of a live worker (GPU first, CPU when no GPU worker is alive or
    # the GPU queue is full); a thread moves jobs out of queues nobody consumes any more.
    def publish(payload: dict, retries: int = 0) -> None:
        app.send_task("bot.handle", args=[payload], queue=router.choose(payload.get("kind", "mention")), retries=retries)

    # Its drain also queues the retries that were parked to wait out a long rate limit.
    router = Router.from_url(config.redis_url, fleet, restore=lambda: restore_expired(app),
                             release=lambda: release_parked(store, publish))

    def enqueue(job) -> None:  # type: ignore[no-untyped-def]
        publish(dict(job.to_dict(), enqueued_at=round(time.time(), 3)))  # enqueued_at: latency metric

    listener = Listener(platform, store, enqueue, config.hashtags, config.stream, config.poll_interval_s,
                        late_window_s=config.late_window_s)
    listener.stop = stop
    threading.Thread(target=router.run, args=(listener.stop,), name="drain", daemon=True).start()
    # Copies follow their originals: deleted when the author deletes, locks or opts out (with
    # the checks off, the thread only drops watches that ran out).
    from . import withdrawal

    threading.Thread(target=withdrawal.run, args=(platform, store, listener.stop),
                     kwargs={"per_round": config.withdrawal_checks}, name="withdrawal", daemon=True).start()
    from .platforms.base import PlatformError

    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["me"] = platform.me()
        except BaseException as exc:  # handed to the main thread below
            answer["error"] = exc

    # Asked in a thread, so that a stop (docker stop's SIGTERM, a refused worker) while the
    # server is slow to answer ends the listener at once instead of after the request's timeout.
    asking = threading.Thread(target=ask, name="me", daemon=True)
    asking.start()
    while asking.is_alive():
        if stop.wait(0.1):
            return 0
    if stop.is_set():
        return 0
    error = answer.get("error")
    if isinstance(error, PlatformError):
        # Wrong token or unreachable server: say so plainly instead of a traceback.
        stop.set()
        print(f"Cannot reach the {platform.name} account: {error}. Check the credentials and URL.", file=sys.stderr)
        return 1
    if isinstance(error, BaseException):
        raise error
    me = answer["me"]
    logging.getLogger("bot").info("listening", extra={"account": me.acct, "channels": ",".join(listener.channels)})
    listener.run()
    return 0


class WorkerSupervisor(threading.Thread):
    """Keeps a process of ``run`` running (its worker, or another platform's listener), as a
    process supervisor would on a fleet.

    A GPU worker exits on purpose (status 69) after repeated GPU failures, for a supervisor to
    restart it; without one, the listener would go on queueing jobs nobody takes. Restarts back
    off from 1 s to 5 minutes; a process that ends with a status in ``fatal`` (2: a worker
    refusing to start for bad configuration or missing weights; a listener also 1, its account
    unreachable) would not start on retrying, so ``on_fatal`` ends the whole bot instead."""

    def __init__(self, command: list[str], on_fatal: Callable[[], None], first_delay_s: float = 1.0,
                 max_delay_s: float = 300.0, env: dict[str, str] | None = None,
                 fatal: frozenset[int] = frozenset({2})) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.command = command
        self.env = env
        self.fatal = fatal
        self.on_fatal = on_fatal
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.stopping = threading.Event()
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        log = logging.getLogger("bot")
        delay = self.first_delay_s
        while not self.stopping.is_set():
            with self._lock:
                if self.stopping.is_set():
                    return
                self._process = subprocess.Popen(self.command, env=self.env)
                self.starts += 1
            started = time.monotonic()
            status = self._process.wait()
            if self.stopping.is_set():
                return
            if status in self.fatal:
                log.error("worker_refused_to_start", extra={"status": status, "command": " ".join(self.command[1:4])})
                self.on_fatal()
                return
            if time.monotonic() - started > 10 * self.max_delay_s:
                delay = self.first_delay_s  # it ran a long while: a new failure, not a loop
            log.warning("worker_exited", extra={"status": status, "restart_in_s": delay})
            if self.stopping.wait(delay):
                return
            delay = min(2 * delay, self.max_delay_s)

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def run_all() -> int:
    """One worker process beside the listener: the single-machine way to run the bot. With more
    than one platform configured (and no ``BOT_PLATFORM`` to choose one), each other platform's
    listener runs as a process of its own beside them: with both credential sets, only
    Mastodon used to be read, and X's mentions and DMs were never seen, without a word."""
    # The listener's settings; the worker process checks its own (ANON_*) when it starts, and a
    # worker that refuses to start ends the bot (scripts/run checks both beforehand with
    # `python -m bot check`, in a process of its own: on a GPU machine that check loads torch).
    config = _checked(worker=False)
    if config is None:
        return 2
    command = [sys.executable, "-m", "celery", "-A", "bot.tasks", "worker", "--loglevel", "INFO"]
    if os.environ.get("BOT_WORKER_ROLE", "").strip().lower() == "gpu":
        command += ["--pool", "threads", "--concurrency", "32"]  # one model, one GPU, many tasks
    refused, stop = threading.Event(), threading.Event()

    def end_bot() -> None:
        refused.set()
        stop.set()

    _stop_on_signals(stop)  # before the worker exists: it is never left behind
    supervisors = [WorkerSupervisor(command, on_fatal=end_bot)]
    own = listener_platform(config)
    if not os.environ.get("BOT_PLATFORM", "").strip():
        for name in config.platforms:
            if name != own:
                supervisors.append(WorkerSupervisor([sys.executable, "-m", "bot", "listen"], on_fatal=end_bot,
                                                    env=dict(os.environ, BOT_PLATFORM=name), fatal=frozenset({1, 2})))
    for supervisor in supervisors:
        supervisor.start()
    try:
        status = listen(config, stop)
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    # Ended because the worker refused to start: not a clean stop, whatever the listener says
    # (a supervisor restarting on failure must see it; the worker has printed why).
    return 2 if refused.is_set() else status


USAGE = """usage: python -m bot listen | run | check

  listen   the listener: reads mentions and direct messages, queues jobs, drains queues
  run      the listener (one per configured platform) and one worker process (restarted when
           it exits): one machine
  check    validate the configuration and exit 0 when a worker and a listener would start, 2
           with every problem listed

Settings come from the environment, then from .env in the working directory (BOT_ENV_FILE names
another file; empty: none) for names the environment does not set.

Workers: celery -A bot.tasks worker (see the README, "N workers on M machines, one Redis")."""


def check() -> int:
    """Validate every setting a worker and a listener read; print the problems or ``ok``."""
    config = _checked(worker=True)
    if config is None:
        return 2
    for risk in config.risks():
        print(f"warning: {risk}", file=sys.stderr)
    print("configuration ok")
    return 0


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    commands: dict[str, Callable[[], int]] = {"listen": listen, "run": run_all, "check": check}
    if len(argv) == 1 and argv[0] in commands:
        try:
            load_env_file()  # before anything reads a setting; ``run``'s worker inherits it
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        return commands[argv[0]]()
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
