"""Nothing is stored: ``anonymise serve`` as a real process writes no file and logs no image byte.

The server runs with its working directory, ``TMPDIR`` and ``HOME`` set to fresh empty folders
and with a Python audit hook that reports every file opened for writing (and every file created,
renamed or removed) anywhere on the machine. After a series of uploads (good, JSON, reviewed,
broken) the folders must still be empty, the hook must have reported nothing, and the captured
log must contain no image data, no metadata and no file name from the uploads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from web_harness import (
    REPO,
    SECRET_COMMENT,
    SECRET_FILENAME,
    SECRET_MAKE,
    jpeg_with_metadata,
    png_bytes,
    windows,
)

#: Runs ``anonymise serve`` under an audit hook that reports writes to the filesystem.
LAUNCHER = r"""
import os, sys
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.truncate",
           "shutil.copyfile", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp", "os.chmod"}
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS):
            sys.__stderr__.write(f"AUDIT open-for-writing {path!r}\n")
    elif event in CHANGES:
        sys.__stderr__.write(f"AUDIT {event} {args[0]!r}\n")
sys.addaudithook(hook)
from anonymiser.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def snapshot(*roots: Path) -> list[str]:
    """Every path below ``roots`` (files and folders)."""
    return sorted(str(p) for root in roots for p in root.rglob("*"))


@pytest.fixture()
def uploads(astronaut: np.ndarray) -> dict[str, bytes]:
    jpeg = jpeg_with_metadata(astronaut)
    return {"jpeg": jpeg, "png": png_bytes(astronaut[::2, ::2]), "truncated": jpeg[: len(jpeg) // 2]}


def test_nothing_is_written_or_logged(centerface_available: None, tmp_path: Path, uploads: dict[str, bytes]) -> None:
    work, temp, home, logs = (tmp_path / name for name in ("cwd", "tmp", "home", "logs"))
    for folder in (work, temp, home, logs):
        folder.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(temp), "TMP": str(temp), "TEMP": str(temp), "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        # not installed in the venv: the package is imported from the checkout
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # compiled bytecode is not user data; keep it out of the audit
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    out_path, err_path = logs / "stdout.log", logs / "stderr.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "--port", "0", "--locator", "centerface"],
                                cwd=work, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            match = re.search(rb"Open (http://127\.0\.0\.1:\d+/)", out_path.read_bytes())
            if match:
                url = match.group(1).decode().rstrip("/")
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start: {err_path.read_text(errors='replace')}")
            else:
                time.sleep(0.1)

        def send(path: str, data: bytes, mime: str, **fields: str) -> requests.Response:
            return requests.post(f"{url}{path}", files={"file": (SECRET_FILENAME, data, mime)}, data=fields, timeout=60)

        assert requests.get(f"{url}/", timeout=10).status_code == 200
        assert send("/api/anonymise", uploads["jpeg"], "image/jpeg").status_code == 200
        answer = send("/api/anonymise", uploads["png"], "image/png", format="json")
        assert answer.status_code == 200
        regions = [r["box"] for r in answer.json()["regions"]] + [[5, 5, 60, 60]]
        assert send("/api/cover", uploads["png"], "image/png", regions=json.dumps(regions), format="json").status_code == 200
        assert send("/api/cover", uploads["jpeg"], "image/jpeg", regions="[[1, 1, 90, 90]]").status_code == 200
        assert send("/api/anonymise", uploads["truncated"], "image/jpeg").status_code == 422
        assert send("/api/anonymise", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml").status_code == 415
        assert send("/api/cover", uploads["jpeg"], "image/jpeg", regions="oops").status_code == 400
        # The server logs a request just after answering it: let the last line land before the
        # stop (under load the SIGINT could overtake it).
        deadline = time.monotonic() + 10
        while sum(line.startswith("{") for line in err_path.read_text().splitlines()) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the server's normal way to stop
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    assert snapshot(work, temp, home) == [], "the server created files"
    log = out_path.read_bytes() + err_path.read_bytes()
    audit = [line for line in log.decode(errors="replace").splitlines() if line.startswith("AUDIT")]
    assert audit == [], audit

    # One structured line per request, with sizes and counts only.
    lines = [json.loads(line) for line in err_path.read_text().splitlines() if line.startswith("{")]
    assert [(l["method"], l["path"], l["status"]) for l in lines] == [
        ("GET", "/", 200),
        ("POST", "/api/anonymise", 200), ("POST", "/api/anonymise", 200),
        ("POST", "/api/cover", 200), ("POST", "/api/cover", 200),
        ("POST", "/api/anonymise", 422), ("POST", "/api/anonymise", 415), ("POST", "/api/cover", 400),
    ]
    assert set(lines[1]) == {"time", "method", "path", "status", "bytes_in", "bytes_out", "heads", "seconds"}
    assert lines[1]["heads"] >= 1

    # No image data in any form, no metadata, no file name.
    for needle in (b"\xff\xd8\xff", b"\x89PNG", b"JFIF", b"Exif", b"IHDR", b"IDAT", rb"\xff\xd8", SECRET_FILENAME.encode(),
                   SECRET_MAKE.encode(), SECRET_COMMENT, b"secret-person"):
        assert needle not in log, f"{needle!r} in the server's log"
    for name, data in uploads.items():
        encoded = base64.b64encode(data)
        for window in windows(data):
            assert window not in log and window.hex().encode() not in log, f"bytes of the {name} upload in the log"
        for window in windows(encoded, step=997):
            assert window not in log, f"base64 of the {name} upload in the log"
