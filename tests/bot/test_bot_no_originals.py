"""The promise to the people in the photos: the bot never keeps an original.

A full run (JPEG with EXIF, PNG, WebP, a reply to a photo post, a damaged file, a takedown) with
the real Redis, the real worker process and the listener; then every place the bot could have
left something is searched: every command sent to Redis while it ran (MONITOR) and every key
left in it (DUMP and values, Celery's queues included), the worker's TMPDIR, new files in its
working directory, and the worker and listener logs. None may hold 64 bytes of any original
(raw or base64), an image magic number, or a media URL.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from bot_harness import REPO, E2E
from bot_helpers import (
    RedisMonitor,
    astronaut,
    files_changed_since,
    jpeg,
    png,
    redis_snapshot,
    scan_blob,
    truncated_jpeg,
)


def webp() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(astronaut(384)).save(buffer, "WEBP", quality=90)
    return buffer.getvalue()


def kombu_bodies(commands: list[list[bytes]]) -> list[bytes]:
    """The decoded bodies of every message Celery put into Redis (they travel base64-encoded)."""
    bodies = []
    for command in commands:
        for arg in command[1:]:
            if arg.startswith(b"{") and b'"body"' in arg:
                try:
                    bodies.append(base64.b64decode(json.loads(arg)["body"]))
                except (ValueError, KeyError, TypeError):
                    continue
            elif arg.startswith(b"["):  # unacked entries: [message, exchange, routing key]
                try:
                    bodies.append(base64.b64decode(json.loads(arg)[0]["body"]))
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
    return bodies


@pytest.fixture
def workdir(e2e: E2E, tmp_path: Path) -> Iterator[Path]:
    """A worker of its own, in an empty working directory (so that whatever it writes there is
    seen exactly, while other processes write into the checkout) and with a fresh TMPDIR."""
    folder = tmp_path / "worker-cwd"
    folder.mkdir()
    e2e.workers.stop()
    e2e.workers.start(cwd=folder)
    yield folder
    e2e.workers.stop()
    e2e.workers.start()


def test_no_original_is_kept_anywhere(e2e: E2E, listener_log: Path, workdir: Path) -> None:
    fake = e2e.fake
    originals = [jpeg(1024), png(512), webp(), jpeg(512, quality=80)]
    broken = truncated_jpeg(512)
    started = time.time() - 1  # file systems keep coarse mtimes
    tree_before = {p: p.stat().st_mtime for p in files_changed_since(REPO, 0)}

    with RedisMonitor("127.0.0.1", e2e.redis_server.port) as monitor:
        e2e.listen(hashtags=("protest",))
        alice, bob, carol, dave = (fake.add_account(n) for n in ("alice", "bob", "carol", "dave"))
        jpeg_request = fake.mention(alice, "the march", media=[fake.media(originals[0])])
        png_request = fake.mention(bob, "a png", media=[fake.media(originals[1], "image/png")])
        tagged = fake.post(carol, "#protest today", media=[fake.media(originals[2], "image/webp")])
        parent = fake.post(dave, "crowd", media=[fake.media(originals[3]), fake.media(broken)])
        child = fake.mention(carol, "please", in_reply_to=parent)
        replies = [e2e.reply_to(s) for s in (jpeg_request, png_request, tagged, child)]
        dm = fake.mention(bob, f"delete {replies[1]['url']}", visibility="direct")
        e2e.reply_to(dm)
        e2e.settle()
    assert all(r["media_attachments"] for r in replies)
    assert fake.deleted == [replies[1]["id"]]
    assert "image 2: the image file is damaged or empty" in replies[3]["content"]
    # the bot really did handle these originals: its uploads are covered copies, not the originals
    for reply, original in zip(replies, originals):
        uploaded = fake.upload_of(reply["media_attachments"][0])
        assert uploaded != original and not scan_blob(uploaded, "upload", [original], magic=False)

    everything = originals + [broken]
    media_urls = list(fake.all_file_urls)
    leaks = []

    # 1. everything sent to Redis while the bot ran, and every message body Celery queued
    assert monitor.commands, "MONITOR saw nothing"
    for number, command in enumerate(monitor.commands):
        for arg in command[1:]:
            leaks += scan_blob(arg, f"redis command #{number} {command[0]!r}", everything)
    bodies = kombu_bodies(monitor.commands)
    assert bodies, "no Celery message seen"
    for body in bodies:
        leaks += scan_blob(body, "Celery message body", everything)
    # 2. what is left in Redis: DUMP of every key (uncompressed) and every value
    snapshot = redis_snapshot(e2e.redis)
    assert any(key.startswith("ppb:") for key in snapshot), "the bot's records are in this Redis"
    for where, blob in snapshot.items():
        leaks += scan_blob(blob, f"redis key {where}", everything)
    # 3. the worker's temporary folders (this worker's fresh one and the session's others); ONNX
    #    Runtime leaves a small session-id file (.ses) there, nothing else may appear
    assert {p.name for p in e2e.workers.tmpdirs[-1].rglob("*")} <= {".ses"}
    for folder in e2e.workers.tmpdirs:
        for path in folder.rglob("*"):
            if path.is_file():
                leaks += scan_blob(path.read_bytes(), f"worker temp file {path}", everything)
    # 4. the worker's working directory stays empty; nothing changed in the checkout holds an original
    assert [p for p in workdir.rglob("*")] == [], "the worker wrote into its working directory"
    for path in files_changed_since(REPO, started):
        if tree_before.get(path) != path.stat().st_mtime:
            # other processes may legitimately write images here: look for the originals only
            leaks += scan_blob(path.read_bytes(), f"file in the checkout {path.relative_to(REPO)}", everything, magic=False)
    # 5. the logs of every worker of the session and of the listener
    logs = {str(p): p.read_bytes() for p in [*e2e.workers.logs, listener_log] if p.exists()}
    assert any(b'"msg": "image_done"' in blob for blob in logs.values()), "the worker log is captured"
    for where, blob in logs.items():
        leaks += scan_blob(blob, f"log {where}", everything)
    assert leaks == [], "\n".join(f"{leak.where}: {leak.what}" for leak in leaks)

    # No media URL (nor its unguessable file name) in the logs or in Redis, ever.
    redis_text = [arg for command in monitor.commands for arg in command] + list(snapshot.values())
    for url in media_urls:
        name = url.rsplit("/", 1)[1].split(".")[0].encode()
        assert not any(name in blob for blob in logs.values()), f"a media URL is in the logs: {url}"
        assert not any(name in blob for blob in redis_text), f"a media URL is in Redis: {url}"


def _core_limit(pid: int) -> str:
    line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max core file size"))
    return " ".join(line.split()[4:6])


def test_worker_processes_write_no_core_dumps(e2e: E2E) -> None:
    """A crash in a native library must not write the worker's memory, originals included, to
    disk: the worker (and its pool's children, if any) runs with a core limit of 0, although it
    was started with no limit (as Docker and many systemd services start it). The dumpable flag
    that also stops pipe handlers is checked in ``tests/test_process.py``."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        e2e.workers.stop()
        e2e.workers.start()
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)
    main = e2e.workers.process.pid
    children = [int(p) for p in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
    assert {pid: _core_limit(pid) for pid in [main, *children]} == {pid: "0 0" for pid in [main, *children]}


def test_scanner_finds_what_it_looks_for() -> None:
    """The scan above would notice a leak: raw windows, base64 and magic numbers."""
    original = jpeg(256)
    quarter = len(original) // 4
    assert scan_blob(b"log line " + original + b"\n", "raw", [original])
    assert scan_blob(b"log line " + original[quarter:2 * quarter], "raw", [original], magic=False)
    for shift in range(3):
        assert scan_blob(base64.b64encode(b"xy"[:shift] + original[quarter:2 * quarter]), "base64", [original], magic=False)
    assert scan_blob(b"...\x89PNG\r\n...", "magic", [])
    assert scan_blob(b"RIFF\x00\x00\x00\x00WEBPVP8 ", "magic", [])
    assert not scan_blob(np.zeros(1000, np.uint8).tobytes(), "zeros", [original])
