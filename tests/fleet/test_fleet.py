"""The fleet: GPU and CPU queues, routing by live workers, draining after a GPU outage, Prometheus
metrics and the batching GPU worker, with real Redis, real worker processes and a fake Mastodon.

"GPU" workers here are ordinary processes started with ``BOT_WORKER_ROLE=gpu`` on the CPU:
routing, draining and batching do not depend on the device.
"""

from __future__ import annotations

import json
import re
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from bot.config import ConfigError
from bot.routing import (
    CPU_QUEUE,
    GPU_QUEUE,
    HEARTBEAT_PREFIX,
    LEGACY_QUEUE,
    FleetSettings,
    Router,
    queue_depth,
    release_parked,
    restore_expired,
    write_heartbeat,
)
from bot_harness import E2E, JOB_TIMEOUT_S, wait_until
from bot_helpers import jpeg

# --------------------------------------------------------------------------- helpers


def beat(redis_server: Any, name: str, role: str, queues: list[str], ttl_ms: int = 60_000) -> None:
    """A heartbeat as a worker writes it."""
    payload = {"hostname": name, "role": role, "queues": queues, "pid": 1, "ts": time.time()}
    write_heartbeat(redis_server.client, HEARTBEAT_PREFIX + name, payload, ttl_ms)


def mention(fake: Any, who: str, side: int = 128) -> dict[str, Any]:
    person = fake.add_account(who)
    return fake.mention(person, "please", media=[fake.media(jpeg(side, exif=False))])


#: a mention job's payload, as the listener enqueues it
PAYLOAD = {"platform": "mastodon", "post_id": "1", "requester_id": "2", "kind": "mention"}


def deliver(task_id: str, payload: dict[str, Any] = PAYLOAD) -> Any:
    """Run one delivery of ``bot.handle`` in this process, as a CPU worker would: its outcome,
    or what it raised (Celery's Reject, a Retry)."""
    from bot import tasks

    tasks.handle.push_request(id=task_id, retries=0, called_directly=False, is_eager=False, headers={},
                              delivery_info={"exchange": "", "routing_key": CPU_QUEUE})
    try:
        return tasks.handle.run(payload)
    except Exception as exc:
        return exc
    finally:
        tasks.handle.pop_request()


def handled_by(worker: Any, status: dict[str, Any]) -> bool:
    """Whether ``worker`` received the job (its main process logs every message it takes; the
    prefork pool's children's own log lines do not reach the worker's stderr)."""
    return bool(re.search(r"Task bot.handle\[.*'post_id': '%s'" % re.escape(status["id"]), worker.log()))


def one_reply_each(fake: Any, statuses: list[dict[str, Any]], timeout: float = JOB_TIMEOUT_S) -> None:
    for status in statuses:
        fake.wait_for(lambda s=status: fake.replies_to(s["id"]), timeout, what=f"a reply to {status['id']}")
    time.sleep(0.5)  # a duplicate would show up now
    for status in statuses:
        assert len(fake.replies_to(status["id"])) == 1, status["id"]


# --------------------------------------------------------------------------- routing rules


def test_a_heartbeat_landing_after_withdrawal_is_taken_back() -> None:
    """A beat held up in Redis longer than ``stop`` waits for it used to land after the delete,
    so listeners kept routing to the withdrawn worker until the key expired (15 s by default)."""
    from bot.routing import Heartbeat

    class SlowRedis:
        def __init__(self) -> None:
            self.keys: dict[str, str] = {}
            self.hold = threading.Event()
            self.held = threading.Event()
            self.beats = 0

        def set(self, key: str, value: str, px: int) -> None:
            self.beats += 1
            if self.beats > 1:  # the first beat (at start) goes through
                self.held.set()
                self.hold.wait(5)
            self.keys[key] = value

        def delete(self, key: str) -> None:
            self.keys.pop(key, None)

        def pipeline(self) -> Any:
            client = self

            class Pipe:  # the heartbeat's set and delete, in order; the listing is not looked at here
                def __init__(self) -> None:
                    self.calls: list[Any] = []

                def __getattr__(self, name: str) -> Any:
                    return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

                def execute(self) -> None:
                    for name, args, kwargs in self.calls:
                        if name in ("set", "delete"):
                            getattr(client, name)(*args, **kwargs)

            return Pipe()

    client = SlowRedis()
    heartbeat = Heartbeat(client, "gpu-1", lambda: {"role": "gpu"}, FleetSettings(heartbeat_interval_s=0.01)).start()  # type: ignore[arg-type]
    assert client.keys and client.held.wait(5), "the second beat is in flight"
    heartbeat.stop(wait_s=0.05)
    assert client.keys == {}, "withdrawn"
    client.hold.set()  # the slow beat lands now
    heartbeat._thread.join(5)
    assert not heartbeat._thread.is_alive()
    assert client.keys == {}, "and still withdrawn after the late beat"


def test_live_workers_are_listed_without_scanning_the_store(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats were found with SCAN over every key: after a year at 1,000 photos a day, 4.4
    million keys and 4.4 s of Redis time per look, every few seconds. They are listed in a
    sorted set now, whose entries for workers killed without a goodbye go after an hour."""
    from bot.routing import WORKERS, live_workers

    client = redis_server.client
    client.delete(WORKERS)
    beat(redis_server, "listed-1", "cpu", [CPU_QUEUE])
    beat(redis_server, "listed-2", "gpu", [GPU_QUEUE])
    client.delete(HEARTBEAT_PREFIX + "listed-2")  # expired: killed without a goodbye
    monkeypatch.setattr(client, "scan_iter", lambda *a, **k: pytest.fail("live_workers scanned the store"))
    monkeypatch.setattr(client, "scan", lambda *a, **k: pytest.fail("live_workers scanned the store"))
    assert [w["hostname"] for w in live_workers(client)] == ["listed-1"]
    client.zadd(WORKERS, {HEARTBEAT_PREFIX + "listed-2": time.time() * 1000 - 3_700_000})  # over an hour ago
    beat(redis_server, "listed-1", "cpu", [CPU_QUEUE])  # any beat prunes
    assert client.zcard(WORKERS) == 1 and client.zscore(WORKERS, HEARTBEAT_PREFIX + "listed-1")
    assert 0 < client.ttl(WORKERS) <= 3600


def test_router_follows_heartbeats_and_queue_depths(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.routing as routing

    monkeypatch.setattr(routing, "MOVE_BATCH", 2)  # the drain below takes three scripts
    client = redis_server.client
    redis_server.clean()
    router = Router(client, FleetSettings(gpu_queue_limit=2), cache_s=0)
    assert router.choose() == CPU_QUEUE  # nobody alive: wait where CPU workers look

    beat(redis_server, "legacy", "cpu", [LEGACY_QUEUE])
    assert router.choose() == LEGACY_QUEUE

    beat(redis_server, "c1", "cpu", [CPU_QUEUE, LEGACY_QUEUE])
    assert router.choose() == CPU_QUEUE

    beat(redis_server, "g1", "gpu", [GPU_QUEUE])
    assert router.choose() == GPU_QUEUE
    assert router.choose("takedown") == CPU_QUEUE  # no model needed: keep the GPU for photos

    client.lpush(GPU_QUEUE, "a", "b")  # 2 waiting, limit 2 per live GPU worker: spill over
    assert queue_depth(client, GPU_QUEUE) == 2
    assert router.choose() == CPU_QUEUE
    beat(redis_server, "g2", "gpu", [GPU_QUEUE])
    assert router.choose() == GPU_QUEUE  # two GPU workers: room for 4

    # GPU only: always the GPU queue, however deep.
    client.delete(HEARTBEAT_PREFIX + "c1", HEARTBEAT_PREFIX + "legacy")
    client.lpush(GPU_QUEUE, "c", "d", "e")
    assert router.choose() == GPU_QUEUE and router.choose("takedown") == GPU_QUEUE
    assert router.drain() == {}  # the GPU queue is consumed: nothing moves

    # Heartbeats expire: the GPU workers are gone, the CPU worker is back.
    client.delete(HEARTBEAT_PREFIX + "g1", HEARTBEAT_PREFIX + "g2")
    beat(redis_server, "c1", "cpu", [CPU_QUEUE], ttl_ms=300)
    assert router.choose() == CPU_QUEUE
    assert router.drain() == {GPU_QUEUE: 5}
    assert client.lrange(CPU_QUEUE, 0, -1) == [b"e", b"d", b"c", b"b", b"a"]  # oldest ("a") popped first
    time.sleep(0.4)
    assert router.workers(fresh=True) == [] and router.drain() == {}  # nobody alive: nothing moves
    redis_server.clean()


def test_a_job_is_sent_elsewhere_only_to_a_queue_a_live_worker_consumes(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nobody else alive, routing names the CPU queue as the place to wait: a lone GPU
    worker isolating a job after a loss sent it there, the listener's drain brought it back with
    its loss count wiped, and a photo that kills workers was retried for ever."""
    import bot.tasks as tasks

    redis_server.clean()
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(redis_url=redis_server.url))
    monkeypatch.setattr(tasks.routing, "settings_or_exit", lambda: FleetSettings())
    assert tasks._queue_elsewhere("mention") is None
    beat(redis_server, "g2", "gpu", [GPU_QUEUE])
    assert tasks._queue_elsewhere("mention") == GPU_QUEUE
    beat(redis_server, "c1", "cpu", [CPU_QUEUE])
    assert tasks._queue_elsewhere("takedown") == CPU_QUEUE
    redis_server.clean()


def test_jobs_in_the_legacy_queue_are_drained_when_nobody_consumes_it(redis_server: Any, client_app: Any) -> None:
    """Jobs an older listener left in Celery's default queue reach a fleet whose workers all
    run with -Q (here GPU only), oldest first; another Celery app's tasks in that shared queue
    (and anything that is not a Celery message) stay where they are, in their order; while a
    worker consumes the queue, nothing moves."""
    client = redis_server.client
    redis_server.clean()
    router = Router(client, FleetSettings(), cache_s=0)
    beat(redis_server, "g1", "gpu", [GPU_QUEUE])
    client_app.send_task("bot.handle", args=[{"n": 1}], queue=LEGACY_QUEUE)
    client_app.send_task("billing.invoice", args=[1], queue=LEGACY_QUEUE)
    client_app.send_task("bot.handle", args=[{"n": 2}], queue=LEGACY_QUEUE)
    client.lpush(LEGACY_QUEUE, b"not json")
    client_app.send_task("billing.invoice", args=[2], queue=LEGACY_QUEUE)
    assert router.drain() == {LEGACY_QUEUE: 2}
    moved = [json.loads(m) for m in client.lrange(GPU_QUEUE, 0, -1)]
    assert [m["headers"]["task"] for m in moved] == ["bot.handle", "bot.handle"]
    assert [m["headers"]["argsrepr"] for m in moved] == ["[{'n': 2}]", "[{'n': 1}]"]  # n=1 popped first
    left = client.lrange(LEGACY_QUEUE, 0, -1)
    assert left[1] == b"not json"
    assert [json.loads(m)["headers"]["argsrepr"] for m in (left[0], left[2])] == ["[2]", "[1]"]

    beat(redis_server, "old", "cpu", [LEGACY_QUEUE])
    client_app.send_task("bot.handle", args=[{"n": 3}], queue=LEGACY_QUEUE)
    assert router.drain() == {} and client.llen(LEGACY_QUEUE) == 4
    redis_server.clean()


def test_drained_jobs_name_the_queue_they_were_moved_to(redis_server: Any, client_app: Any) -> None:
    """A drained Celery message is rewritten to name its new queue (Kombu puts a delivery back,
    and Celery sends a retry, where it names): only that field changes, a job's own text that
    quotes the field is left alone, and a restored delivery (``redelivered``) is rewritten too.
    Kombu's own lookup then sends it to the new queue."""
    from kombu.transport.redis import Channel

    client = redis_server.client
    redis_server.clean()
    router = Router(client, FleetSettings(), cache_s=0)
    beat(redis_server, "c1", "cpu", [CPU_QUEUE])
    sneaky = {"text": f'"delivery_info": {{"exchange": "", "routing_key": "{GPU_QUEUE}"}}'}
    client_app.send_task("bot.handle", args=[sneaky], queue=GPU_QUEUE)
    client_app.send_task("bot.handle", args=[{"n": 2}], queue=GPU_QUEUE)
    restored = json.loads(client.lpop(GPU_QUEUE))  # as Kombu writes a restored delivery back
    restored["properties"]["delivery_info"]["redelivered"] = True
    client.lpush(GPU_QUEUE, json.dumps(restored))
    client_app.send_task("bot.handle", args=[{"n": 3}], queue=LEGACY_QUEUE)
    sent = [json.loads(m) for m in client.lrange(GPU_QUEUE, 0, -1) + client.lrange(LEGACY_QUEUE, 0, -1)]

    assert router.drain() == {GPU_QUEUE: 2, LEGACY_QUEUE: 1}
    moved = [json.loads(m) for m in client.lrange(CPU_QUEUE, 0, -1)]
    assert [m["headers"]["argsrepr"] for m in moved] == ["[{'n': 3}]", "[{'n': 2}]", f"[{sneaky!r}]"]
    by_id = {m["headers"]["id"]: m for m in moved}
    for before in sent:
        after = by_id[before["headers"]["id"]]
        assert after["properties"]["delivery_info"] == {**before["properties"]["delivery_info"], "exchange": "",
                                                        "routing_key": CPU_QUEUE}
        assert {k: v for k, v in after.items() if k != "properties"} == {k: v for k, v in before.items() if k != "properties"}
        assert {k: v for k, v in after["properties"].items() if k != "delivery_info"} == \
            {k: v for k, v in before["properties"].items() if k != "delivery_info"}
    info = moved[0]["properties"]["delivery_info"]
    assert Channel._lookup(SimpleNamespace(deadletter_queue=None), info["exchange"], info["routing_key"]) == [CPU_QUEUE]
    redis_server.clean()


def test_draining_the_legacy_queue_leaves_another_apps_backlog_untouched(redis_server: Any, client_app: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another app's backlog in the shared default queue is not rewritten by each drain (it was
    popped and pushed back whole, every BOT_DRAIN_INTERVAL, keeping Redis busy in proportion to
    its length): a drain looks at a bounded number of messages and writes only the bot's own;
    one buried deeper than a drain looks is moved by a later drain."""
    import bot.routing as routing

    monkeypatch.setattr(routing, "LEGACY_WINDOW", 100)
    monkeypatch.setattr(routing, "LEGACY_WINDOWS_PER_DRAIN", 2)
    client = redis_server.client
    redis_server.clean()
    router = Router(client, FleetSettings(), cache_s=0)
    beat(redis_server, "g1", "gpu", [GPU_QUEUE])
    client_app.send_task("bot.handle", args=[{"n": "deep"}], queue=LEGACY_QUEUE)  # oldest: consumers' end
    client_app.send_task("billing.invoice", args=[0], queue=LEGACY_QUEUE)
    foreign = client.lpop(LEGACY_QUEUE)
    client.lpush(LEGACY_QUEUE, *[foreign] * 450)  # the other app's backlog, newer than "deep"
    client_app.send_task("bot.handle", args=[{"n": "new"}], queue=LEGACY_QUEUE)  # newest
    before = [m for m in client.lrange(LEGACY_QUEUE, 0, -1) if m == foreign]

    def calls(command: str) -> int:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    client.config_resetstat()
    moved = router.drain()  # looks at the 200 oldest: finds "deep" only
    # The backlog is not rewritten (the LPOPs, one per key, find the unconsumed CPU queue empty).
    assert calls("lpop") <= len(routing._queue_keys(CPU_QUEUE)) and calls("rpop") == 0 and calls("rpush") == 0
    assert moved == {LEGACY_QUEUE: 1} and calls("lpush") == 1
    assert [json.loads(m)["headers"]["argsrepr"] for m in client.lrange(GPU_QUEUE, 0, -1)] == ["[{'n': 'deep'}]"]
    for _ in range(3):
        router.drain()
    assert [json.loads(m)["headers"]["argsrepr"] for m in client.lrange(GPU_QUEUE, 0, -1)] == ["[{'n': 'new'}]", "[{'n': 'deep'}]"]
    assert client.lrange(LEGACY_QUEUE, 0, -1) == before
    redis_server.clean()


def test_fleet_settings_are_validated() -> None:
    assert FleetSettings.from_env({}) == FleetSettings()
    settings = FleetSettings.from_env({"BOT_WORKER_ROLE": "GPU", "BOT_METRICS_PORT": "9808", "BOT_HEARTBEAT_INTERVAL": "2",
                                       "BOT_DEVICE_FAILURE_LIMIT": "5"})
    assert (settings.role, settings.queue, settings.metrics_port, settings.heartbeat_ttl_s,
            settings.device_failure_limit) == ("gpu", GPU_QUEUE, 9808, 6.0, 5)
    with pytest.raises(ConfigError) as raised:
        FleetSettings.from_env({"BOT_WORKER_ROLE": "tpu", "BOT_METRICS_PORT": "99999", "BOT_GPU_QUEUE_LIMIT": "many",
                                "BOT_DRAIN_INTERVAL": "0", "BOT_DEVICE_FAILURE_LIMIT": "0"})
    for name in ("BOT_WORKER_ROLE", "BOT_METRICS_PORT", "BOT_GPU_QUEUE_LIMIT", "BOT_DRAIN_INTERVAL", "BOT_DEVICE_FAILURE_LIMIT"):
        assert name in str(raised.value)


# --------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def cpu_worker(fleet: Any) -> Any:
    """A CPU worker with the prefork pool (tasks in a child process) and metrics on."""
    worker = fleet.launch("cpu", queues=f"{CPU_QUEUE},{LEGACY_QUEUE}", pool="prefork", metrics=True, BOT_WORKER_ROLE="cpu")
    return worker


def test_gpu_outage_degrades_to_cpu_workers(fleet: Any, fake: Any, redis_server: Any, client_app: Any, cpu_worker: Any) -> None:
    client = redis_server.client
    redis_server.clean()
    fake.reset()
    gpu = fleet.launch("gpu", queues=GPU_QUEUE, BOT_WORKER_ROLE="gpu")
    fleet.ready(gpu, cpu_worker)
    router = Router(client, FleetSettings(drain_interval_s=0.3), cache_s=0, restore=lambda: restore_expired(client_app))
    wait_until(lambda: len(router.workers()) == 2, 10, "both heartbeats")

    def send(status: dict[str, Any]) -> str:
        queue = router.choose()
        client_app.send_task("bot.handle", args=[E2E.job(status)], queue=queue)
        return queue

    # While the GPU worker is alive, photos go to it.
    first = [mention(fake, f"early{k}") for k in range(2)]
    assert [send(s) for s in first] == [GPU_QUEUE, GPU_QUEUE]
    one_reply_each(fake, first)
    assert all(handled_by(gpu, s) and not handled_by(cpu_worker, s) for s in first)

    # The GPU worker takes a job and hangs in its download; another waits in its queue.
    fake.hold_media()
    taken = mention(fake, "taken")
    assert send(taken) == GPU_QUEUE
    fake.wait_for(lambda: len(fake.media_requests()) == 3, 30, what="the GPU worker to start downloading")
    waiting = mention(fake, "waiting")
    assert send(waiting) == GPU_QUEUE
    gpu.kill()  # no warm shutdown: its heartbeat just stops
    fake.release_media()
    before = cpu_worker.scrape()
    assert client.llen(GPU_QUEUE) == 1 and client.hlen("unacked") == 1

    # Within three heartbeat intervals the router sees the outage: new jobs go to the CPU queue...
    wait_until(lambda: router.choose() == CPU_QUEUE, 5, "the GPU worker's heartbeat to expire")
    late = mention(fake, "late")
    assert send(late) == CPU_QUEUE

    # ...and the listener's drain moves the stranded ones there (the taken one once Redis's
    # visibility timeout has expired and it is back in the GPU queue).
    stop = threading.Event()
    drainer = threading.Thread(target=router.run, args=(stop,), daemon=True)
    drainer.start()
    try:
        one_reply_each(fake, [waiting, late, taken])
    finally:
        stop.set()
        drainer.join(5)
    assert all(handled_by(cpu_worker, s) for s in (waiting, late, taken))
    assert queue_depth(client, GPU_QUEUE) == 0 and client.hlen("unacked") == 0
    assert len(fake.bot_posts()) == 5
    # The drained jobs are counted as the CPU queue's, where they ran (a run is counted just
    # after its reply is posted, hence the wait).
    replied = {"kind": "mention", "outcome": "replied"}

    def counted(text: str, queue: str) -> float:
        return _metric(text, "ppb_jobs_total", missing=0.0, queue=queue, **replied)

    wait_until(lambda: counted(cpu_worker.scrape(), CPU_QUEUE) >= counted(before, CPU_QUEUE) + 3, 10, "the runs' counts")
    after = cpu_worker.scrape()
    assert counted(after, CPU_QUEUE) == counted(before, CPU_QUEUE) + 3
    assert counted(after, GPU_QUEUE) == counted(before, GPU_QUEUE)


def _metric(text: str, name: str, missing: float | None = None, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels (``missing`` if there are none)."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found and missing is not None:
        return missing
    assert found, f"{name}{labels} not in the scrape:\n{text}"
    return total


def test_worker_serves_prometheus_metrics(fleet: Any, fake: Any, redis_server: Any, client_app: Any, cpu_worker: Any) -> None:
    fleet.ready(cpu_worker)
    before = cpu_worker.scrape()
    # Alerts take increase() of these: they must exist at 0 before the first failure.
    for reason in ("retry", "device", "dead_letter"):
        assert _metric(before, "ppb_job_failures_total", reason=reason) == 0
    assert _metric(before, "ppb_photos_total", result="failed") == 0
    replied = {"kind": "mention", "outcome": "replied", "queue": CPU_QUEUE}
    replied_before = _metric(before, "ppb_jobs_total", missing=0.0, **replied)
    photos_before = _metric(before, "ppb_photos_total", missing=0.0, result="ok")

    status = mention(fake, "measured")
    client_app.send_task("bot.handle", args=[dict(E2E.job(status), enqueued_at=time.time())], queue=CPU_QUEUE)
    one_reply_each(fake, [status])
    redis_server.client.lpush(GPU_QUEUE, "x", "y")  # a stranded backlog shows in the depth gauge

    after = cpu_worker.scrape()  # served by the main process, counted in the pool's child
    assert _metric(after, "ppb_jobs_total", **replied) == replied_before + 1
    assert _metric(after, "ppb_photos_total", result="ok") == photos_before + 1
    assert _metric(after, "ppb_job_seconds_count", kind="mention") >= 1
    assert _metric(after, "ppb_job_latency_seconds_count") >= 1
    assert _metric(after, "ppb_photo_seconds_count") >= 1
    assert _metric(after, "ppb_queue_depth", queue=GPU_QUEUE) == 2
    assert _metric(after, "ppb_queue_depth", queue=CPU_QUEUE) == 0
    assert _metric(after, "ppb_workers_alive", role="cpu") == 1
    assert _metric(after, "ppb_worker_up", role="cpu") == 1
    assert _metric(after, "ppb_redis_up") == 1
    assert _metric(after, "ppb_dead_letters") == 0
    redis_server.client.delete(GPU_QUEUE)


def test_gpu_worker_batches_lsccnn_calls_of_concurrent_jobs(fleet: Any, fake: Any, redis_server: Any, client_app: Any,
                                                              lsccnn_weights: Any) -> None:
    """Four jobs at once in a thread-pool GPU worker: their LSC-CNN calls share batches, and each
    job is still its own task (one reply each; a redelivered job is not answered twice). In bf16,
    every photo (the warm-up's too) is also checked in float32, and the checks are counted."""
    redis_server.clean()
    fake.reset()
    weights, md5 = lsccnn_weights
    worker = fleet.launch("batching", queues=GPU_QUEUE, pool="threads", concurrency=4, metrics=True, weights=weights,
                          BOT_WORKER_ROLE="gpu", ANON_LSCCNN_MD5=md5, ANON_LSCCNN_MAX_BATCH="4",
                          ANON_LSCCNN_BATCH_WAIT_MS="1500", ANON_LSCCNN_DEVICE="cpu", ANON_LSCCNN_PRECISION="bf16",
                          ANON_LSCCNN_CHECK_EVERY="1", ANON_LSCCNN_CHECK_ACTION="count")
    fleet.ready(worker)
    # It loaded and ran its models before announcing itself, so no job waits behind loading.
    log_text = worker.log()
    assert "worker_warm" in log_text and log_text.index("worker_warm") < log_text.index("worker_alive")
    router = Router(redis_server.client, FleetSettings(), cache_s=0)
    wait_until(lambda: router.choose() == GPU_QUEUE, 10, "the GPU worker's heartbeat")
    statuses = [mention(fake, f"crowd{k}", side=96) for k in range(4)]
    for status in statuses:
        client_app.send_task("bot.handle", args=[E2E.job(status)], queue=GPU_QUEUE)
    one_reply_each(fake, statuses, timeout=120)

    text = worker.scrape()
    assert _metric(text, "ppb_jobs_total", outcome="replied") == 4
    batches = _metric(text, "ppb_batch_size_count") - 1  # the first batch was the warm-up's
    assert _metric(text, "ppb_batch_size_sum") == 1 + 4  # the warm-up, then every photo once
    assert batches < 4, "the four calls should have met in fewer than four batches"
    assert _metric(text, "ppb_precision_checks_total") == 1 + 4
    assert _metric(text, "ppb_precision_check_boxes_total", kind="reference") > 0  # random weights: many
    assert _metric(text, "ppb_precision_fallbacks_total") == 0  # counted, not acted on
    for reply in (fake.replies_to(s["id"])[0] for s in statuses):
        assert len(reply["media_attachments"]) == 1

    # Redelivery of a finished job: same idempotency rules as any worker.
    client_app.send_task("bot.handle", args=[E2E.job(statuses[0])], queue=GPU_QUEUE)
    wait_until(lambda: _metric(worker.scrape(), "ppb_jobs_total", missing=0.0, outcome="already_done") == 1, 30,
               "the redelivery")
    assert len(fake.bot_posts()) == 4
    assert list(redis_server.client.scan_iter(HEARTBEAT_PREFIX + "batching-*"))
    worker.stop()  # a clean shutdown removes the heartbeat at once
    assert not list(redis_server.client.scan_iter(HEARTBEAT_PREFIX + "batching-*"))


def test_gpu_worker_that_cannot_load_its_models_stops_at_start(fleet: Any, redis_server: Any) -> None:
    """A GPU worker loads its models before it announces itself: bad model settings stop it at
    start, with the reason, and no listener ever routes a job to it."""
    redis_server.clean()
    worker = fleet.launch("unloadable", queues=GPU_QUEUE, pool="threads", concurrency=2, BOT_WORKER_ROLE="gpu",
                          ANON_LSCCNN_PRECISION="fp8")
    worker.process.wait(60)
    assert worker.process.returncode != 0
    # Refused by the start-up check, with the other settings, before any model is loaded.
    assert "Invalid configuration" in worker.log() and "ANON_LSCCNN_PRECISION" in worker.log()
    assert not list(redis_server.client.scan_iter(HEARTBEAT_PREFIX + "unloadable-*"))


def test_worker_runs_only_the_locators_it_is_given(fleet: Any, fake: Any, redis_server: Any, client_app: Any,
                                                   lsccnn_weights: Any) -> None:
    """With LSC-CNN weights in its folder, a worker told ``ANON_LOCATORS=centerface`` never runs
    LSC-CNN (no batch at all, not even the warm-up's) and still answers; a GPU or CPU worker told
    to use a locator whose weights are missing stops at start with the reason."""
    redis_server.clean()
    fake.reset()
    weights, md5 = lsccnn_weights
    worker = fleet.launch("chosen", queues=GPU_QUEUE, pool="threads", concurrency=2, metrics=True, weights=weights,
                          BOT_WORKER_ROLE="gpu", ANON_LSCCNN_MD5=md5, ANON_LSCCNN_DEVICE="cpu",
                          ANON_LOCATORS="centerface")
    fleet.ready(worker)
    status = mention(fake, "crowd", side=96)
    client_app.send_task("bot.handle", args=[E2E.job(status)], queue=GPU_QUEUE)
    one_reply_each(fake, [status], timeout=120)
    text = worker.scrape()
    assert _metric(text, "ppb_jobs_total", outcome="replied") == 1
    assert _metric(text, "ppb_batch_size_count", missing=0.0) == 0
    worker.stop()

    for role, pool in (("gpu", "threads"), ("cpu", "prefork")):
        missing = fleet.launch(f"missing-{role}", pool=pool, concurrency=2, BOT_WORKER_ROLE=role,
                               ANON_LOCATORS="centerface,lsccnn")
        missing.process.wait(60)
        assert missing.process.returncode != 0, role
        assert "cannot load the models" in missing.log() and "weights for lsccnn are not in" in missing.log()


def test_a_worker_started_without_queues_also_consumes_its_roles_queue(fleet: Any, fake: Any, redis_server: Any,
                                                                         client_app: Any) -> None:
    """``celery worker`` without ``-Q`` (as ``scripts/run`` starts it) consumes Celery's default
    queue and its role's: its heartbeat says so and a job routed to the role's queue is answered."""
    redis_server.clean()
    fake.reset()
    worker = fleet.launch("noq", BOT_WORKER_ROLE="cpu")
    fleet.ready(worker)
    [key] = redis_server.client.scan_iter(HEARTBEAT_PREFIX + "noq-*")
    assert sorted(json.loads(redis_server.client.get(key))["queues"]) == [CPU_QUEUE, LEGACY_QUEUE]
    status = mention(fake, "crowd", side=96)
    client_app.send_task("bot.handle", args=[E2E.job(status)], queue=CPU_QUEUE)
    one_reply_each(fake, [status], timeout=120)
    worker.stop()


def test_prefork_children_share_the_cores_among_their_onnx_threads(fleet: Any, redis_server: Any) -> None:
    """Without ``ANON_ONNX_THREADS`` a prefork worker gives each child its share of the cores
    (ONNX Runtime's own default, every core in every child, oversubscribed them); a value the
    operator set is kept."""
    from bot.tasks import onnx_threads_per_child

    assert [onnx_threads_per_child(n, cores=16) for n in (1, 2, 4, 16, 32)] == [16, 8, 4, 1, 1]
    redis_server.clean()
    worker = fleet.launch("shared", pool="prefork", concurrency=2, ANON_ONNX_THREADS="")
    fleet.ready(worker)
    expected = onnx_threads_per_child(2)
    assert re.search(rf'"msg": "onnx_threads".*"per_child": "{expected}"', worker.log()), worker.log()[-2000:]
    worker.stop()
    kept = fleet.launch("kept", pool="prefork", concurrency=2, ANON_ONNX_THREADS="3")
    fleet.ready(kept)
    assert '"onnx_threads"' not in kept.log()
    kept.stop()


def test_worker_refuses_bad_fleet_settings(fleet: Any) -> None:
    worker = fleet.launch("bad", BOT_WORKER_ROLE="tpu")
    worker.process.wait(60)
    assert worker.process.returncode != 0
    assert "BOT_WORKER_ROLE must be cpu or gpu" in worker.log()


def test_gpu_worker_refuses_the_prefork_pool(fleet: Any, redis_server: Any) -> None:
    """Prefork children could not batch together, nor take a failing GPU worker out of
    rotation: a GPU-role worker on that pool stops at start and says which pool to use."""
    worker = fleet.launch("forked", pool="prefork", concurrency=2, BOT_WORKER_ROLE="gpu")
    worker.process.wait(60)
    assert worker.process.returncode == 2
    assert "--pool threads" in worker.log()
    assert not list(redis_server.client.scan_iter(HEARTBEAT_PREFIX + "forked-*"))


def test_gpu_worker_whose_device_fails_hands_its_jobs_over_and_withdraws(fleet: Any, fake: Any, redis_server: Any,
                                                                       client_app: Any, lsccnn_weights: Any) -> None:
    """A GPU that fails after start-up is the worker's fault, not the jobs': every job goes to a
    CPU worker and is answered once (none dead-lettered, no "could not process" reply), and after
    BOT_DEVICE_FAILURE_LIMIT failures in a row the GPU worker withdraws its heartbeat and stops with
    status 69 for its supervisor to restart it."""
    redis_server.clean()
    fake.reset()
    weights, md5 = lsccnn_weights
    rescuer = fleet.launch("rescuer", queues=CPU_QUEUE, BOT_WORKER_ROLE="cpu")
    sick = fleet.launch("sick", queues=GPU_QUEUE, pool="threads", concurrency=1, weights=weights,
                        preload="broken_device", BOT_WORKER_ROLE="gpu", ANON_LSCCNN_MD5=md5,
                        ANON_LSCCNN_DEVICE="cpu", BOT_DEVICE_FAILURE_LIMIT="3")
    fleet.ready(rescuer, sick)
    assert "worker_warm" in sick.log()  # the device worked at start: the failure comes later
    statuses = [mention(fake, f"bystander{k}", side=96) for k in range(3)]
    for status in statuses:
        client_app.send_task("bot.handle", args=[E2E.job(status)], queue=GPU_QUEUE)
    one_reply_each(fake, statuses, timeout=120)
    for status in statuses:
        # The sick worker took every job and could answer none (its every batch fails): the
        # replies came from a CPU worker (this one, or the module's other CPU worker).
        assert handled_by(sick, status), status["id"]
        reply = fake.replies_to(status["id"])[0]
        assert len(reply["media_attachments"]) == 1  # the anonymised photo, not an apology
    assert redis_server.client.llen("ppb:dead") == 0

    sick.process.wait(60)
    assert sick.process.returncode == 69, sick.log()[-3000:]
    log_text = sick.log()
    assert log_text.count("RuntimeError") >= 3 and "worker_withdrawn" in log_text
    assert not list(redis_server.client.scan_iter(HEARTBEAT_PREFIX + "sick-*"))
    rescuer.stop()


def test_clean_shutdown_withdraws_at_once_and_finishes_running_jobs(fleet: Any, fake: Any, redis_server: Any,
                                                                   client_app: Any) -> None:
    """A warm shutdown waits for running tasks (on a thread pool, however long they take), and
    the worker takes no new job meanwhile: its heartbeat must go when the shutdown starts, so
    listeners route around it at once, and the running job must still be answered."""
    import signal

    redis_server.clean()
    fake.reset()
    worker = fleet.launch("leaving", queues=GPU_QUEUE, pool="threads", concurrency=2, preload="slow_jobs",
                          BOT_WORKER_ROLE="cpu", PPB_TEST_JOB_SECONDS="8")
    fleet.ready(worker)
    key_pattern = HEARTBEAT_PREFIX + "leaving-*"
    wait_until(lambda: bool(list(redis_server.client.scan_iter(key_pattern))), 10, "the heartbeat")
    status = mention(fake, "leaving", side=96)
    client_app.send_task("bot.handle", args=[E2E.job(status)], queue=GPU_QUEUE)
    wait_until(lambda: f"slow_job_started {status['id']}" in worker.log(), 30, "the job to start")

    worker.process.send_signal(signal.SIGTERM)
    wait_until(lambda: not list(redis_server.client.scan_iter(key_pattern)), 3, "the heartbeat to be withdrawn")
    assert worker.alive(), "withdrawn while its job still runs"
    one_reply_each(fake, [status], timeout=90)
    worker.process.wait(60)
    assert worker.process.returncode == 0
    assert len(fake.replies_to(status["id"])[0]["media_attachments"]) == 1


def faulty_worker(fleet: Any, fake: Any, redis_server: Any, tmp_path: Any, preload: str, queue: str,
                  **env: str) -> tuple[Any, Any]:
    """A clean world and one prefork worker on ``queue`` with a fault-injection ``preload``
    (``crash_jobs``, ``stuck_jobs``, ``late_replies``); returns it and the file listing the posts it trips on."""
    redis_server.clean()
    fake.reset()
    posts = tmp_path / f"{preload}-posts"
    posts.write_text("")
    variable = {"crash_jobs": "PPB_TEST_CRASH_POSTS", "stuck_jobs": "PPB_TEST_STUCK_POSTS",
                "late_replies": "PPB_TEST_LATE_POSTS"}[preload]
    worker = fleet.launch(preload, queues=queue, pool="prefork", concurrency=1, preload=preload, **{variable: str(posts)}, **env)
    fleet.ready(worker)
    return worker, posts


def test_a_job_that_kills_its_worker_is_given_up_and_the_others_are_answered(
        fleet: Any, fake: Any, redis_server: Any, client_app: Any, tmp_path: Any) -> None:
    """A photo that makes the kernel kill the worker (out of memory) never reaches a handler:
    Redis hands the job to the next worker, which it kills too. After BOT_MAX_WORKER_LOSSES lost
    runs the job is dead-lettered and its requester told; the worker stays up for other jobs."""
    from bot import messages
    from bot.store import Store

    queue = "ppb.crash-test"
    worker, crash_list = faulty_worker(fleet, fake, redis_server, tmp_path, "crash_jobs", queue, BOT_MAX_WORKER_LOSSES="2")
    hostile, ordinary = mention(fake, "mallory", side=96), mention(fake, "carol", side=96)
    crash_list.write_text(hostile["id"])
    client_app.send_task("bot.handle", args=[E2E.job(hostile)], queue=queue)
    client_app.send_task("bot.handle", args=[E2E.job(ordinary)], queue=queue)

    one_reply_each(fake, [ordinary], timeout=120)
    [apology] = fake.wait_for(lambda: fake.replies_to(hostile["id"]), 60, what="the apology")
    assert apology["visibility"] == "direct" and messages.APOLOGY in apology["content"]
    [dead] = Store.from_url(redis_server.url).dead_letters()
    assert dead["job"]["post_id"] == hostile["id"] and dead["reason"].startswith("WorkerLost:")
    assert worker.log().count(f"crash_job_started {hostile['id']}") == 2
    assert worker.alive()
    assert not list(redis_server.client.scan_iter("ppb:running:*")), "run counters are cleared"
    worker.stop()


def test_bystanders_of_a_job_that_kills_a_thread_pool_worker_are_answered(
        fleet: Any, fake: Any, redis_server: Any, client_app: Any, tmp_path: Any) -> None:
    """A GPU worker runs its jobs side by side in one process: a photo that kills it takes the
    others down too, and each would be charged the loss, so innocent jobs restored and taken
    together again were dead-lettered with the hostile one. A job whose run was lost goes to a
    CPU worker instead, which runs each job in its own process: there only the hostile job's
    runs are lost, and it alone is given up."""
    from bot import messages
    from bot.store import Store

    redis_server.clean()
    fake.reset()
    crash_list = tmp_path / "crash-posts"
    hostile, innocent = mention(fake, "mallory", side=96), mention(fake, "carol", side=96)
    crash_list.write_text(hostile["id"])
    faults = dict(preload="crash_jobs", PPB_TEST_CRASH_POSTS=str(crash_list), PPB_TEST_CRASH_AFTER_S="2",
                  BOT_MAX_WORKER_LOSSES="2")
    cpu = fleet.launch("isolating", queues=CPU_QUEUE, pool="prefork", concurrency=1, BOT_WORKER_ROLE="cpu", **faults)
    gpu = fleet.launch("shared", queues=GPU_QUEUE, pool="threads", concurrency=2, BOT_WORKER_ROLE="gpu", **faults)
    fleet.ready(cpu, gpu)
    fake.hold_media()  # the innocent job is mid-download when the hostile one kills the process
    for status in (hostile, innocent):
        client_app.send_task("bot.handle", args=[E2E.job(status)], queue=GPU_QUEUE)
    wait_until(lambda: not gpu.alive(), 60, "the hostile photo to kill the GPU worker")
    fake.release_media()
    assert handled_by(gpu, innocent)
    time.sleep(6)  # past the tests' 5 s visibility timeout; a listener's drain would restore them
    restore_expired(client_app)
    again = fleet.launch("shared-again", queues=GPU_QUEUE, pool="threads", concurrency=2, BOT_WORKER_ROLE="gpu", **faults)
    fleet.ready(again)

    [reply] = fake.wait_for(lambda: fake.replies_to(innocent["id"]), 120, what="the innocent job's reply")
    assert reply["media_attachments"], "its anonymised copy, not an apology"
    # The hostile job kills the CPU worker's child until it is given up, unless a CPU worker of
    # another test (without the fault) took it first.
    [answer] = fake.wait_for(lambda: fake.replies_to(hostile["id"]), 120, what="the hostile job's answer")
    dead = {d["job"]["post_id"]: d["reason"] for d in Store.from_url(redis_server.url).dead_letters()}
    assert innocent["id"] not in dead
    if messages.APOLOGY in answer["content"]:
        assert dead[hostile["id"]].startswith("WorkerLost")
    assert again.log().count("isolated_after_loss") == 2 and cpu.alive()
    for worker in (cpu, again):
        worker.stop()


def test_a_job_killed_by_the_hard_time_limit_is_counted_as_a_loss_not_dropped(
        fleet: Any, fake: Any, redis_server: Any, client_app: Any, tmp_path: Any) -> None:
    """A run stuck where the soft time limit cannot reach it (a long native call) is killed by
    the hard limit (soft + 30 s). Celery acknowledged such a run by default: the job vanished,
    with no dead letter and no word to the requester. It must come back like a run whose worker
    died, be counted as a loss and, past BOT_MAX_WORKER_LOSSES, be given up with an apology."""
    from bot import messages
    from bot.store import Store

    queue = "ppb.stuck-test"
    worker, stuck_list = faulty_worker(fleet, fake, redis_server, tmp_path, "stuck_jobs", queue,
                                       BOT_TASK_TIME_LIMIT="1", BOT_MAX_WORKER_LOSSES="1")
    stuck = mention(fake, "mallory", side=96)
    stuck_list.write_text(stuck["id"])
    client_app.send_task("bot.handle", args=[E2E.job(stuck)], queue=queue)

    [apology] = fake.wait_for(lambda: fake.replies_to(stuck["id"]), 120, what="the apology")
    assert apology["visibility"] == "direct" and messages.APOLOGY in apology["content"]
    assert "Hard time limit" in worker.log()
    [dead] = Store.from_url(redis_server.url).dead_letters()
    assert dead["job"]["post_id"] == stuck["id"] and dead["reason"].startswith("WorkerLost:")
    assert worker.log().count(f"stuck_job_started {stuck['id']}") == 1, "given up without a second run"
    assert worker.alive()
    worker.stop()


def test_the_soft_time_limit_passing_between_reply_and_record_cuts_neither(
        fleet: Any, fake: Any, redis_server: Any, client_app: Any, tmp_path: Any) -> None:
    """Celery's soft time limit raises wherever the run is. Between posting the copy and
    recording it, that left a copy the takedown flow could not find, a dead letter, and an
    apology by direct message to someone who had just been answered."""
    from bot import messages
    from bot.store import Store

    queue = "ppb.late-test"
    worker, late_list = faulty_worker(fleet, fake, redis_server, tmp_path, "late_replies", queue, PPB_TEST_LATE_S="5")
    warm, late = mention(fake, "erin", side=96), mention(fake, "dora", side=96)
    # The first job loads the models (10-20 s here): under the default limit.
    client_app.send_task("bot.handle", args=[E2E.job(warm)], queue=queue)
    one_reply_each(fake, [warm], timeout=120)
    late_list.write_text(late["id"])
    # A soft limit of 3 s for this job alone passes during the 5 s its reply takes to come back.
    client_app.send_task("bot.handle", args=[E2E.job(late)], queue=queue, soft_time_limit=3, time_limit=40)

    [reply] = fake.wait_for(lambda: fake.replies_to(late["id"]), 60, what="the reply")
    assert reply["media_attachments"]
    store = Store.from_url(redis_server.url)
    wait_until(lambda: store.reply_for("mastodon", late["id"], late["account"]["id"]) == reply["id"], 20,
               "the reply to be recorded")
    time.sleep(1)
    assert fake.replies_to(late["id"]) == [reply], "no apology"
    assert store.dead_letters() == []
    assert "late_reply_posted" in worker.log() and "Hard time limit" not in worker.log()
    assert worker.alive()
    worker.stop()


def test_a_gpu_failure_is_not_counted_as_a_refused_photo() -> None:
    """A DeviceFailure is the GPU's fault and the photo is handed to another worker, which counts
    it; as a refused photo it would fire PPBManyRefusedPhotos, which blames the files."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from anonymiser.errors import DeviceFailure, UnsupportedImage
    from bot import metrics

    def failed() -> float:
        return REGISTRY.get_sample_value("ppb_photos_total", {"result": "failed"}) or 0.0

    def raising(error: Exception) -> Any:
        def anonymise(data: bytes, **budgets: Any) -> Any:
            raise error
        return metrics.instrument(SimpleNamespace(anonymise=anonymise))

    before = failed()
    with pytest.raises(DeviceFailure):
        raising(DeviceFailure("LSC-CNN on cuda:0 failed")).anonymise(b"x")
    assert failed() == before
    with pytest.raises(UnsupportedImage):
        raising(UnsupportedImage("not an image")).anonymise(b"x")
    assert failed() == before + 1


def test_a_metrics_port_in_use_is_logged_not_swallowed(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Two workers on one machine with one shared .env name the same port; the second cannot
    serve it, and Celery swallows errors of signal handlers: the log must say so."""
    import socket
    from types import SimpleNamespace

    from bot import metrics

    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen(1)
    try:
        monkeypatch.setenv("BOT_METRICS_PORT", str(taken.getsockname()[1]))
        monkeypatch.setattr(metrics, "_server", None)
        sender = SimpleNamespace(hostname="second@host", app=SimpleNamespace(conf=SimpleNamespace(broker_url="redis://127.0.0.1:1/0")))
        with caplog.at_level("INFO", logger="bot.metrics"):
            metrics._serve(sender)
        assert [r.getMessage() for r in caplog.records if r.name == "bot.metrics"] == ["metrics_port_unavailable"]
        assert metrics._server is None
    finally:
        taken.close()


def test_device_hand_overs_are_counted_apart_from_platform_errors() -> None:
    """A job handed over because this worker's GPU failed is neither a platform error (which
    PPBPlatformErrors watches) nor an answer (no latency is observed for it)."""
    from types import SimpleNamespace

    from celery.exceptions import Retry
    from prometheus_client import REGISTRY

    from anonymiser.errors import DeviceFailure
    from bot import metrics
    from bot.platforms.base import RateLimited

    task = SimpleNamespace(name="bot.handle", request=SimpleNamespace(delivery_info={"routing_key": GPU_QUEUE}))
    job = {"kind": "mention", "enqueued_at": time.time()}

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {r: sample("ppb_job_failures_total", reason=r) for r in ("device", "retry")}
    latency_before = sample("ppb_job_latency_seconds_count")
    metrics._task_finished("t1", task, args=(job,), retval=Retry(exc=DeviceFailure("GPU gone")), state="RETRY")
    assert sample("ppb_job_failures_total", reason="device") == before["device"] + 1
    assert sample("ppb_job_failures_total", reason="retry") == before["retry"]
    assert sample("ppb_jobs_total", kind="mention", outcome="handed_over", queue=GPU_QUEUE) >= 1
    metrics._task_finished("t2", task, args=(job,), retval=Retry(exc=RateLimited("slow down", 60.0)), state="RETRY")
    assert sample("ppb_job_failures_total", reason="retry") == before["retry"] + 1
    assert sample("ppb_job_latency_seconds_count") == latency_before
    # A job sent on to a CPU worker after a loss beside others (tasks._isolate: Celery's Retry
    # with no exc) is no platform error either: PPBPlatformErrors must not count it.
    metrics._task_finished("t3", task, args=(job,), retval=Retry(), state="RETRY")
    assert sample("ppb_job_failures_total", reason="retry") == before["retry"] + 1
    assert sample("ppb_jobs_total", kind="mention", outcome="requeued", queue=GPU_QUEUE) >= 1
    assert sample("ppb_job_latency_seconds_count") == latency_before
    # Put back in its queue (Redis failed under the run): not answered, so not timed yet.
    metrics._task_finished("t4", task, args=(job,), retval=None, state="REJECTED")
    assert sample("ppb_job_latency_seconds_count") == latency_before
    metrics._task_finished("t5", task, args=(job,), retval="replied", state="SUCCESS")
    assert sample("ppb_job_latency_seconds_count") == latency_before + 1


def test_a_long_rate_limit_parks_the_job_instead_of_holding_it_past_the_visibility_timeout(
        fleet: Any, fake: Any, redis_server: Any, client_app: Any, cpu_worker: Any) -> None:
    """A countdown longer than the visibility timeout would sit unacknowledged in a worker and be
    handed to another worker (and again, each visibility timeout): the job is parked in Redis
    instead, held by nobody, and the listeners' drain queues it when it is due."""
    from bot.store import Store

    redis_server.clean()
    fake.reset()
    fleet.ready(cpu_worker)
    store = Store.from_url(redis_server.url)
    status = mention(fake, "patient", side=96)
    reset_s = 8.0  # beyond half of the tests' 5 s visibility timeout
    limited = fake.fail("GET", r"/api/v1/statuses/\d+", 429, times=1, reset_in_s=reset_s)
    sent_at = time.time()
    client_app.send_task("bot.handle", args=[E2E.job(status)], queue=CPU_QUEUE)
    wait_until(lambda: store.parked(), 60, "the job to be parked")
    [(entry, due)] = store.parked()
    assert entry["job"]["post_id"] == status["id"] and entry["retries"] == 1
    assert sent_at + reset_s - 5 <= due <= time.time() + reset_s + 5
    assert len(limited.hits) == 1
    assert release_parked(store, lambda job, retries: None, now=due - 1) == 0, "not due yet"

    # Nothing is held: no delivery waits unacknowledged, so no visibility timeout can duplicate
    # it (a countdown would have been redelivered twice by now).
    time.sleep(2 * 5 + 1)
    assert time.time() > due
    assert redis_server.client.hlen("unacked") == 0
    assert queue_depth(redis_server.client, CPU_QUEUE) == 0 and fake.replies_to(status["id"]) == []

    published: list[int] = []

    def publish(job: dict[str, Any], retries: int) -> None:
        published.append(retries)
        client_app.send_task("bot.handle", args=[job], queue=CPU_QUEUE, retries=retries)

    router = Router(redis_server.client, FleetSettings(), cache_s=0,
                    release=lambda: release_parked(store, publish))
    router.drain()  # what the listener runs every BOT_DRAIN_INTERVAL
    assert published == [1] and store.parked() == []
    one_reply_each(fake, [status], timeout=90)
    assert len(fake.replies_to(status["id"])[0]["media_attachments"]) == 1
    assert len(limited.hits) == 1


def test_a_countdown_whose_run_could_end_past_the_visibility_timeout_is_parked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kombu starts a delivery's visibility timeout when the worker receives the message, and a
    countdown retry is received at once and held unacknowledged until it is due and through its
    run: with the defaults (900 s timeout, 600 s limit + 30 s), a 300 s countdown followed by a
    long run is past the timeout, so the job would run twice (and the first run's
    acknowledgement would drop the second delivery's record, same delivery tag). Such a retry
    is parked; a short one stays a countdown."""
    from types import SimpleNamespace

    from celery.exceptions import Retry

    from bot import tasks
    from bot.platforms.base import RateLimited

    monkeypatch.setattr(tasks, "_VISIBILITY_TIMEOUT_S", 900)
    monkeypatch.setattr(tasks, "_TIME_LIMIT_S", 600)
    parked: list[tuple[int, float]] = []
    monkeypatch.setattr(tasks, "store", lambda: SimpleNamespace(park=lambda payload, attempt, due: parked.append((attempt, due))))
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(max_attempts=5))
    countdowns: list[float] = []

    class Task:
        request = SimpleNamespace(retries=0)

        def retry(self, countdown: float, exc: Exception) -> Retry:
            countdowns.append(countdown)
            return Retry(exc=exc)

    def outcome(retry_after_s: float) -> str:
        def run_job(job: Any) -> str:
            raise RateLimited("slow down", retry_after_s)
        monkeypatch.setattr(tasks, "run_job", run_job)
        try:
            return tasks._run(Task(), SimpleNamespace(kind="mention"), {"post_id": "1"}, {}, lambda: 0.0)
        except Retry:
            return "countdown"

    assert outcome(300.0) == "parked" and [a for a, _ in parked] == [1]
    assert outcome(20.0) == "countdown" and countdowns == [20.0]
    # Where the run alone may outlast the timeout (a config_risk), only the half applies.
    monkeypatch.setattr(tasks, "_VISIBILITY_TIMEOUT_S", 5)
    assert outcome(2.0) == "countdown" and outcome(3.0) == "parked"


def test_a_run_that_redis_fails_goes_back_to_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's Task.retry turns a retry it cannot publish (Redis restarting, or refusing writes at
    maxmemory) into Reject(requeue=False), and a task that fails is acknowledged: acknowledged
    late, either dropped the job without a dead letter or a word. The task puts it back instead."""
    from types import SimpleNamespace

    import redis
    from celery.canvas import Signature
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError

    from bot import tasks
    from bot.platforms.base import RateLimited

    def run_job(job: Any) -> str:
        raise RateLimited("slow down", 10.0)  # a short countdown: a retry Celery publishes

    def unpublishable(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("Error 111 connecting to redis:6379. Connection refused.")

    finished: list[str] = []
    fake_store = SimpleNamespace(run_started=lambda task_id, ttl_s: 1, run_finished=finished.append)
    monkeypatch.setattr(tasks, "run_job", run_job)
    monkeypatch.setattr(tasks, "store", lambda: fake_store)
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(max_attempts=5, max_worker_losses=2))
    monkeypatch.setattr(Signature, "apply_async", unpublishable)
    rejected = deliver("t1")
    assert isinstance(rejected, Reject) and rejected.requeue is True, rejected
    assert finished == ["t1"]

    def redis_gone(task_id: str, ttl_s: int) -> int:
        raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    monkeypatch.setattr(fake_store, "run_started", redis_gone)
    rejected = deliver("t1")
    assert isinstance(rejected, Reject) and rejected.requeue is True, rejected


@pytest.mark.parametrize("refusal", [
    "connection",  # a restart or failover mid-run, and Redis back before the dead letter
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "NOREPLICAS Not enough good replicas to write.",
])
def test_a_run_redis_refuses_is_requeued_not_dead_lettered(monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    """Redis going away or refusing writes in the middle of a job (recording the reply, taking
    a claim) says nothing about the job: it goes back to its queue, without a dead letter or an
    apology. Dead-lettering it would tell the requester we gave up on a photo that may even have
    been answered; and under maxmemory the dead letter itself is refused while the late
    acknowledgement (a deletion) is not, so the job was lost without a trace."""
    import redis
    from celery.exceptions import Reject
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    from bot import tasks

    if refusal == "connection":
        error: Exception = redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
    elif refusal.startswith("OOM"):
        error = OutOfMemoryError(refusal)
    elif refusal.startswith("READONLY"):
        error = ReadOnlyError(refusal)
    else:
        error = redis.ResponseError(refusal)

    def run_job(job: Any) -> str:
        raise error

    dead: list[Any] = []
    apologies: list[Any] = []

    def dead_letter(payload: Any, reason: str) -> None:
        if refusal != "connection":  # refused like every other write
            raise error
        dead.append(reason)

    fake_store = SimpleNamespace(run_started=lambda task_id, ttl_s: 1, run_finished=lambda task_id: None,
                                 dead_letter=dead_letter)
    monkeypatch.setattr(tasks, "run_job", run_job)
    monkeypatch.setattr(tasks, "store", lambda: fake_store)
    monkeypatch.setattr(tasks, "_apologise", apologies.append)
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(max_attempts=5, max_worker_losses=2))
    outcome = deliver("t1")
    assert isinstance(outcome, Reject) and outcome.requeue is True, outcome
    assert dead == [] and apologies == []


def test_a_run_that_redis_failed_under_is_not_counted_as_a_lost_worker(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run ended by Redis going away could not record its end either, and the job's next
    delivery took it for a worker lost with it: two such blips dead-lettered a healthy photo
    with an apology. The end is recorded once Redis answers (by a thread, and before the
    worker's next run)."""
    import redis
    from celery.exceptions import Reject

    from bot import tasks
    from bot.store import Store

    redis_server.clean()
    real = Store.from_url(redis_server.url)
    down = threading.Event()

    class Flaky:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def run_finished(self, task_id: str) -> None:
            if down.is_set():
                raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
            real.run_finished(task_id)

    def run_job(job: Any) -> str:
        if down.is_set():
            raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return "replied"

    apologies: list[Any] = []
    monkeypatch.setattr(tasks, "run_job", run_job)
    monkeypatch.setattr(tasks, "store", lambda: Flaky())
    monkeypatch.setattr(tasks, "_apologise", apologies.append)
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(max_attempts=5, max_worker_losses=2))
    monkeypatch.setattr(tasks, "UNFINISHED_RETRY_S", 0.05)

    for _ in range(2):  # two blips under one job, each over by its next delivery
        down.set()
        assert isinstance(deliver("t9"), Reject)
        assert redis_server.client.scard("ppb:running:t9") == 1
        down.clear()
        wait_until(lambda: redis_server.client.scard("ppb:running:t9") == 0, 10, "the end to be recorded")
    assert deliver("t9") == "replied"
    assert real.dead_letters() == [] and apologies == []

    # and the worker's next run records it even before the thread does
    monkeypatch.setattr(tasks, "UNFINISHED_RETRY_S", 60.0)
    down.set()
    assert isinstance(deliver("t9"), Reject)
    down.clear()
    assert deliver("t9") == "replied"
    assert redis_server.client.scard("ppb:running:t9") == 0 and real.dead_letters() == []


def test_a_redis_error_that_is_not_a_refusal_is_still_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command Redis rejects for what it is (a bug: WRONGTYPE, a script error) would fail the
    same way on every run: it is dead-lettered once, not requeued for ever."""
    import redis

    from bot import tasks

    def run_job(job: Any) -> str:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    dead: list[str] = []
    fake_store = SimpleNamespace(run_started=lambda task_id, ttl_s: 1, run_finished=lambda task_id: None,
                                 dead_letter=lambda payload, reason: dead.append(reason))
    monkeypatch.setattr(tasks, "run_job", run_job)
    monkeypatch.setattr(tasks, "store", lambda: fake_store)
    monkeypatch.setattr(tasks, "_apologise", lambda job: None)
    monkeypatch.setattr(tasks, "config", lambda: SimpleNamespace(max_attempts=5, max_worker_losses=2))
    outcome = deliver("t2")
    assert outcome == "dead_letter" and dead and dead[0].startswith("ResponseError: WRONGTYPE")


def test_parked_jobs_survive_a_failed_release(redis_server: Any) -> None:
    """Jobs taken out of the parked set are put back when publishing them fails (the broker
    hiccups): the next drain queues them, none is lost."""
    from bot.store import Store

    redis_server.clean()
    store = Store.from_url(redis_server.url)
    for k in range(3):
        store.park({"post_id": str(k), "kind": "mention"}, 1, time.time() - 10 + k)
    published: list[str] = []

    def flaky(job: dict[str, Any], retries: int) -> None:
        if len(published) == 1:
            raise ConnectionError("broker unreachable")
        published.append(job["post_id"])

    with pytest.raises(ConnectionError):
        release_parked(store, flaky)
    assert published == ["0"]
    assert sorted(entry["job"]["post_id"] for entry, _ in store.parked()) == ["1", "2"]
    assert release_parked(store, lambda job, retries: published.append(job["post_id"])) == 2
    assert sorted(published) == ["0", "1", "2"] and store.parked() == []


def test_parked_jobs_taken_by_a_listener_that_died_are_parked_again(redis_server: Any) -> None:
    """A listener killed between taking due jobs and publishing them (a restart, an OOM kill)
    must not lose them: taken entries wait in a releasing set, and a later drain parks them
    again once the grace period has passed."""
    from bot.store import RELEASE_GRACE_S, Store

    redis_server.clean()
    store = Store.from_url(redis_server.url)
    now = time.time()
    for k in range(2):
        store.park({"post_id": str(k), "kind": "mention"}, 1, now - 10)
    taken = store.take_due(now)  # ... and the listener dies here
    assert len(taken) == 2 and store.parked() == []
    published: list[str] = []
    assert release_parked(store, lambda job, retries: published.append(job["post_id"]), now=now + 1) == 0
    assert release_parked(store, lambda job, retries: published.append(job["post_id"]),
                          now=now + RELEASE_GRACE_S + 1) == 2
    assert sorted(published) == ["0", "1"]
    assert release_parked(store, lambda job, retries: published.append(job["post_id"]),
                          now=now + 3 * RELEASE_GRACE_S) == 0, "each published once"


def test_precision_checks_are_counted_by_result_boxes_and_fallbacks() -> None:
    from prometheus_client import REGISTRY

    from anonymiser.batching.agreement import Agreement, PrecisionCheck
    from bot import metrics

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = [("ppb_precision_checks_total", {"result": r}) for r in ("agreed", "failed")]
    names += [("ppb_precision_check_boxes_total", {"kind": k}) for k in ("reference", "identical", "uncovered")]
    names += [("ppb_precision_fallbacks_total", {})]
    before = [sample(name, **labels) for name, labels in names]
    metrics.observe_check(PrecisionCheck("fp16", Agreement(10, 10, 10, 0), 0.1, failed=False, fell_back=False))
    metrics.observe_check(PrecisionCheck("fp16", Agreement(7, 8, 5, 2), 0.1, failed=True, fell_back=True))
    after = [sample(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 17, 15, 2, 1]
