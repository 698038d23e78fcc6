"""``python -m bot listen`` (the listener) and ``python -m bot run`` (listener + one worker)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from . import logs
from .config import BotConfig, ConfigError


def listen() -> int:
    """Run the listener until SIGINT/SIGTERM."""
    logs.setup()
    try:
        config = BotConfig.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for risk in config.risks():
        logging.getLogger("bot").warning("config_risk", extra={"risk": risk})
    from .listener import Listener
    from .platforms.registry import make
    from .routing import FleetSettings, Router, release_parked, restore_expired
    from .store import Store
    from .tasks import app

    try:
        fleet = FleetSettings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    # One listener process per platform; without BOT_PLATFORM, Mastodon if configured, else X.
    name = os.environ.get("BOT_PLATFORM", "").strip().lower() or ("mastodon" if "mastodon" in config.platforms else config.platforms[0])
    platform = make(name, config)
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

    listener = Listener(platform, store, enqueue, config.hashtags, config.stream, config.poll_interval_s)
    threading.Thread(target=router.run, args=(listener.stop,), name="drain", daemon=True).start()
    from .platforms.base import PlatformError

    try:
        me = platform.me()
    except PlatformError as exc:
        # Wrong token or unreachable server: say so plainly instead of a traceback.
        listener.stop.set()
        print(f"Cannot reach the {platform.name} account: {exc}. Check the credentials and URL.", file=sys.stderr)
        return 1
    logging.getLogger("bot").info("listening", extra={"account": me.acct, "channels": ",".join(listener.channels)})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: listener.stop.set())
    listener.run()
    return 0


def run_all() -> int:
    """One worker process beside the listener: the single-machine way to run the bot."""
    try:
        BotConfig.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "celery", "-A", "bot.tasks", "worker", "--loglevel", "INFO"]
    if os.environ.get("BOT_WORKER_ROLE", "").strip().lower() == "gpu":
        command += ["--pool", "threads", "--concurrency", "32"]  # one model, one GPU, many tasks
    worker = subprocess.Popen(command)
    try:
        return listen()
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def main(argv: list[str]) -> int:
    if argv[:1] == ["listen"]:
        return listen()
    if argv[:1] == ["run"]:
        return run_all()
    print("usage: python -m bot listen | run", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
