"""The bot, end to end, with Mastodon faked locally and one CPU worker process.

Prints (1) how many mentions per second the listener turns into queued Celery jobs, and
(2) the time from a mention being posted to the bot's reply appearing, median and 95th
percentile, for a 2 megapixel photo (one request at a time, so it is latency, not queueing).
Uses the test suite's fake Mastodon server, throw-away redis-server and worker harness.

    python bench/bot.py [--mentions 500] [--replies 20]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bot")]

from bot_harness import E2E, RedisServer, Workers, warm_up  # noqa: E402
from fake_mastodon import FakeMastodon  # noqa: E402


def photo_2mp() -> bytes:
    """The public-domain astronaut, upscaled to 1632x1224 (2.0 MP), as a JPEG."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((1632, 1224), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def enqueue_rate(harness: E2E, count: int) -> float:
    """Mentions per second through ``Listener.catch_up`` into a queue no worker reads."""
    from bot.listener import Listener

    fake = harness.fake
    people = [fake.add_account(f"person{i}") for i in range(20)]
    harness.store.set_cursor("mastodon", "mentions", "1")
    for i in range(count):
        fake.mention(people[i % len(people)], f"please anonymise {i}")
    sent = []

    def enqueue(job) -> None:  # type: ignore[no-untyped-def]
        harness.app.send_task("bot.handle", args=[job.to_dict()], queue="bench-sink")
        sent.append(job)

    listener = Listener(harness.platform(), harness.store, enqueue, stream=False)
    start = time.perf_counter()
    listener.catch_up("mentions")
    elapsed = time.perf_counter() - start
    assert len(sent) == count, f"enqueued {len(sent)} of {count}"
    harness.redis.delete("bench-sink")
    return count / elapsed


def reply_latencies(harness: E2E, count: int) -> list[float]:
    """Seconds from mention to reply, one mention at a time, through a streaming listener."""
    fake = harness.fake
    photo = photo_2mp()
    # One account per request: the per-account rate limit (10 an hour) would otherwise answer
    # the later requests with a quick "please wait" text instead of an anonymised copy.
    people = [fake.add_account(f"photographer{i}") for i in range(count)]
    running = harness.listen(stream=True)
    latencies = []
    try:
        for i in range(count):
            start = time.perf_counter()
            status = fake.mention(people[i], f"anonymise this {i}", media=[fake.media(photo)])
            reply = harness.reply_to(status, timeout=120)
            assert reply["media_attachments"], "expected an anonymised copy, got a text answer"
            latencies.append(time.perf_counter() - start)
    finally:
        running.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mentions", type=int, default=500)
    parser.add_argument("--replies", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        redis_server = RedisServer(root)
        fake = FakeMastodon().start()
        workers = Workers(redis_server, fake, root)
        # The worker gets the default locators: the head model too, when the team's copy is here.
        heads = Path(os.environ.get("ANON_TEST_HEADS_DIR", ROOT.parent / "shared" / "models" / "heads"))
        for model in heads.glob("*.onnx"):
            (workers.weights / model.name).symlink_to(model)
        locators = "CenterFace + head model" if any(workers.weights.iterdir()) else "CenterFace only"
        from bot.tasks import app

        app.conf.broker_url = redis_server.url
        harness = E2E(fake, redis_server, workers, app)
        try:
            rate = enqueue_rate(harness, args.mentions)
            harness.reset()
            # The test harness pins ONNX Runtime to one thread; a production worker uses every core.
            workers.start(ANON_ONNX_THREADS="0")
            warm_up(harness)
            latencies = reply_latencies(harness, args.replies)
        finally:
            harness.stop_listeners()
            workers.stop()
            fake.stop()
            redis_server.stop()
    p95 = float(np.percentile(latencies, 95))
    print(f"listener: {rate:.0f} mentions enqueued per second ({args.mentions} mentions, polling catch-up)")
    print(f"mention -> reply, 2 MP photo, one CPU worker ({locators}), {len(latencies)} requests: "
          f"median {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
    print("each (s): " + " ".join(f"{x:.1f}" for x in latencies))


if __name__ == "__main__":
    main()
