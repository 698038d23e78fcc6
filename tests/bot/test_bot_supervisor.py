"""``python -m bot run``: the worker beside the listener is restarted when it exits, as a
process supervisor would restart it on a fleet, and a worker that cannot start ends the bot."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bot.__main__ import WorkerSupervisor

REPO = Path(__file__).resolve().parents[2]


def _counting(tmp_path: Path, status: int) -> list[str]:
    """A stand-in worker that notes each start in a file and exits with ``status``."""
    starts = tmp_path / "starts"
    return [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit({status})"]


def test_a_worker_that_exits_is_started_again_with_growing_pauses(tmp_path: Path) -> None:
    # A GPU worker exits with 69 after repeated GPU failures, for its supervisor to restart it.
    fatal = threading.Event()
    supervisor = WorkerSupervisor(_counting(tmp_path, 69), on_fatal=fatal.set, first_delay_s=0.05, max_delay_s=0.2)
    supervisor.start()
    starts = tmp_path / "starts"
    deadline = time.monotonic() + 30
    while (not starts.exists() or starts.read_text().count("x") < 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    supervisor.stop()
    supervisor.join(timeout=10)
    assert starts.read_text().count("x") >= 4 and supervisor.starts >= 4
    assert not fatal.is_set() and not supervisor.is_alive()


def test_a_worker_that_refuses_to_start_ends_the_bot(tmp_path: Path) -> None:
    # Status 2: bad configuration or missing weights, which no restart mends.
    fatal = threading.Event()
    supervisor = WorkerSupervisor(_counting(tmp_path, 2), on_fatal=fatal.set, first_delay_s=0.05)
    supervisor.start()
    assert fatal.wait(30)
    supervisor.join(timeout=10)
    assert supervisor.starts == 1


def test_stopping_ends_a_running_worker(tmp_path: Path) -> None:
    supervisor = WorkerSupervisor([sys.executable, "-c", "import time; time.sleep(60)"], on_fatal=lambda: None)
    supervisor.start()
    deadline = time.monotonic() + 10
    while supervisor.starts < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    supervisor.stop()
    supervisor.join(timeout=10)
    assert not supervisor.is_alive() and time.monotonic() - started < 10 and supervisor.starts == 1


def test_the_bot_ends_with_status_2_when_its_worker_refuses_to_start(workers: Any) -> None:
    """``python -m bot run`` whose worker refuses to start (a locator without its weights) ends
    with status 2, not 0: a supervisor set to restart on failure must not see a clean stop."""
    env = workers.env(ANON_LOCATORS="lsccnn")  # the harness's weights folder has no checkpoint
    done = subprocess.run([sys.executable, "-m", "bot", "run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "weights for lsccnn are not in" in done.stderr


def test_a_stop_while_the_server_is_slow_to_answer_ends_the_listener_at_once(workers: Any) -> None:
    """SIGTERM (docker stop) while the platform has not answered the first request yet: a clean,
    prompt stop, not the request's whole timeout and a "cannot reach" message."""
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = workers.env(MASTODON_BASE_URL=f"http://127.0.0.1:{silent.getsockname()[1]}", BOT_STREAM="0")
        process = subprocess.Popen([sys.executable, "-m", "bot", "listen"], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(4)  # started, and waiting for the server
            assert process.poll() is None, process.communicate()
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
    assert time.monotonic() - started < 3, "stopped at once, not after the request's timeout"
    assert process.returncode == 0 and "Cannot reach" not in err, err[-2000:]


class _Recorded:
    """Stands in for ``WorkerSupervisor`` in ``run_all``: notes what would be started."""

    made: list["_Recorded"] = []

    def __init__(self, command: list[str], on_fatal: Any, env: dict[str, str] | None = None,
                 fatal: frozenset[int] = frozenset({2})) -> None:
        self.command, self.env, self.fatal, self.started, self.stopped = command, env, fatal, False, False
        _Recorded.made.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


def test_run_reads_every_configured_platform(monkeypatch: Any) -> None:
    """With Mastodon and X both configured, ``python -m bot run`` listened to Mastodon only and
    never read a mention or DM on X, without a word. Now each other platform gets a listener
    process of its own (ending the bot if its account cannot be reached, like the first);
    ``BOT_PLATFORM`` still chooses one platform alone."""
    import bot.__main__ as main
    from bot.config import X_VARIABLES, BotConfig

    config = BotConfig.from_env({"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t",
                                 **{name: "k" for name, _ in X_VARIABLES}})
    assert config.platforms == ("mastodon", "x")
    listened: list[str] = []
    monkeypatch.setattr(main, "_checked", lambda worker: config)
    monkeypatch.setattr(main, "listen", lambda config, stop: listened.append(main.listener_platform(config)) or 0)
    monkeypatch.setattr(main, "WorkerSupervisor", _Recorded)
    monkeypatch.setattr(main, "_stop_on_signals", lambda stop: None)
    for chosen, others in (("", ["x"]), ("mastodon", []), ("x", [])):
        _Recorded.made.clear()
        monkeypatch.setenv("BOT_PLATFORM", chosen)
        assert main.run_all() == 0
        worker, *listeners = _Recorded.made
        assert worker.command[1:4] == ["-m", "celery", "-A"] and worker.env is None
        assert [l.env["BOT_PLATFORM"] for l in listeners if l.env] == others
        assert all(l.command[1:] == ["-m", "bot", "listen"] and 1 in l.fatal for l in listeners)
        assert all(s.started and s.stopped for s in _Recorded.made)
    assert listened == ["mastodon", "mastodon", "x"]


def test_a_process_ending_with_a_fatal_status_ends_the_bot_without_a_restart(tmp_path: Path) -> None:
    """A second platform's listener that cannot reach its account exits 1: that is fatal to it."""
    fatal = threading.Event()
    supervisor = WorkerSupervisor(_counting(tmp_path, 1), on_fatal=fatal.set, first_delay_s=0.05,
                                  fatal=frozenset({1, 2}))
    supervisor.start()
    assert fatal.wait(20)
    supervisor.join(timeout=5)
    assert not supervisor.is_alive() and (tmp_path / "starts").read_text() == "x"


def _marked(marker: str) -> list[str]:
    """Command lines of the processes whose environment carries ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_a_sigterm_to_scripts_run_stops_the_whole_bot(workers: Any, tmp_path: Path) -> None:
    """``kill <pid of scripts/run>``: the script ended (stopping its Redis) and left the bot and
    its worker running, orphaned. The signal is now passed on and the script waits for them."""
    marker = f"PPB_TEST_MARKER_{time.monotonic_ns()}"
    env = workers.env(**{marker: "1"})
    with open(tmp_path / "out", "wb") as out:
        script = subprocess.Popen([str(REPO / "scripts" / "run")], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not any("celery" in c for c in _marked(marker)) and time.monotonic() < deadline:
                assert script.poll() is None, (tmp_path / "out").read_text()[-3000:]
                time.sleep(0.2)
            assert any("bot run" in c for c in _marked(marker)) and any("celery" in c for c in _marked(marker))
            script.send_signal(signal.SIGTERM)  # the script's own process only, as `kill PID` does
            script.wait(timeout=90)
            deadline = time.monotonic() + 10
            while _marked(marker) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _marked(marker) == [], "nothing of the bot is left running"
        finally:
            try:
                os.killpg(script.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
