"""Helpers of the web server tests: an in-process server on a free port, raw HTTP requests, test
images with planted metadata, and checks on what comes back.

(Imported by name: ``tests/web`` has no ``__init__.py``, like ``tests/bot``. The top-level
``tests/conftest.py`` fixtures such as ``astronaut`` and ``cf_anonymiser`` are available here;
its helper functions are not importable from this folder, so the few needed are here.)
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from anonymiser.locators.base import Detections
from anonymiser.pipeline import Anonymiser
from anonymiser.web.app import WebApp
from anonymiser.web.gate import Gate
from anonymiser.web.server import WebServer, make_server

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
#: the astronaut's face in skimage's 512x512 photo (same constant as tests/conftest.py)
ASTRONAUT_FACE = (185, 80, 265, 160)
#: planted in the test images' metadata; must never come back or reach a log
SECRET_MAKE = "SECRETCAM-WEB-4711"
SECRET_COMMENT = b"SECRET-WEB-COMMENT-0815"
#: the file name the tests upload under; must never reach a log
SECRET_FILENAME = "secret-person-name-2024.jpg"


# --------------------------------------------------------------------------- images


def jpeg_with_metadata(rgb: np.ndarray, quality: int = 95) -> bytes:
    """A camera-like JPEG: EXIF with make, GPS position and orientation 1, plus a comment."""
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x010F] = SECRET_MAKE  # Make
    exif[0x0112] = 1  # Orientation
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}  # GPS IFD
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif, comment=SECRET_COMMENT, subsampling=0)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    """A plain PNG with a text chunk carrying the planted secret."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET_COMMENT.decode())
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def animated_gif() -> bytes:
    """Two different frames: an animation the anonymiser must refuse."""
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Image bytes as an RGB array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def assert_no_metadata(data: bytes) -> None:
    """The output carries pixels only: no EXIF, ICC, comment or text, nothing planted."""
    assert SECRET_MAKE.encode() not in data and SECRET_COMMENT not in data
    assert b"Exif\x00" not in data
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        assert not image.getexif()
        for key in ("exif", "icc_profile", "comment", "xmp", "Comment", "transparency"):
            assert key not in image.info, f"{key} in the output"
    if data[:3] == b"\xff\xd8\xff":
        i = 2
        while data[i] == 0xFF and data[i + 1] != 0xDA:  # marker segments before the first scan
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
            assert marker != 0xFE, "JPEG comment in the output"
            if 0xE0 <= marker <= 0xEF:
                assert marker == 0xE0, f"APP{marker - 0xE0} segment in the output"
            i += 2 + length
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        i, kinds = 8, set()
        while i < len(data):
            length = struct.unpack(">I", data[i : i + 4])[0]
            kinds.add(data[i + 4 : i + 8])
            i += 12 + length
        assert kinds <= {b"IHDR", b"IDAT", b"IEND", b"pHYs"}, kinds


# --------------------------------------------------------------------------- servers


@dataclass
class RunningServer:
    """An in-process ``WebServer`` on a free loopback port, served from a thread."""

    server: WebServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> WebApp:
        return self.server.app

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_server(anonymiser: Anonymiser, max_concurrent: int = 2, queue: int = 8, host: str = "127.0.0.1",
                 allow_hosts: tuple[str, ...] = ()) -> RunningServer:
    """Serve ``anonymiser`` on ``host`` (a free port) until ``stop()``."""
    server = make_server(WebApp(anonymiser, Gate(max_concurrent, queue)), host, 0, allow_hosts=allow_hosts)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return RunningServer(server, thread)


@dataclass
class SlowLocator:
    """A locator that takes ``delay`` seconds and records how many calls overlapped."""

    delay: float = 0.4
    name: str = "slow"
    kind: str = "head"
    running: int = 0
    most_at_once: int = 0
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def locate(self, rgb: np.ndarray) -> Detections:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            h, w = rgb.shape[:2]
            return Detections(np.array([[w * 0.4, h * 0.2, w * 0.6, h * 0.45]], np.float32), np.ones(1, np.float32))
        finally:
            with self._lock:
                self.running -= 1


# --------------------------------------------------------------------------- raw HTTP


def multipart(fields: dict[str, bytes | str | tuple[str, bytes, str]], boundary: str | None = None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its Content-Type. A tuple value is a file part
    ``(filename, data, content_type)``."""
    boundary = boundary or f"----test{uuid.uuid4().hex}"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, content_type = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
            out.write(f"Content-Type: {content_type}\r\n\r\n".encode())
        else:
            data = value.encode() if isinstance(value, str) else value
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def read_response(sock: socket.socket, timeout: float = 10.0) -> RawResponse:
    """Read one HTTP/1.1 response (with Content-Length) from ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full response header: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, body[:length])


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` bytes as they are and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock, timeout)


def windows(data: bytes, size: int = 64, step: int = 509) -> Iterator[bytes]:
    """Overlapping ``size``-byte windows of ``data`` every ``step`` bytes (and the last one)."""
    for start in range(0, max(1, len(data) - size), step):
        yield data[start : start + size]
    yield data[-size:]
