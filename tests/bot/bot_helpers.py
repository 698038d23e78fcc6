"""Test images, image checks and the "no originals anywhere" scanners for the bot tests.

Every image is generated at test time from scikit-image's public-domain astronaut photo (a real
face); nothing binary is committed and nothing is read from the team's shared photos.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

#: the astronaut's face (brows to mouth) in the 512 x 512 photo; see tests/conftest.py
FACE_512 = (185, 80, 265, 160)
MAGIC = re.compile(rb"\xff\xd8\xff|\x89PNG|RIFF....WEBP", re.DOTALL)


@lru_cache(maxsize=None)
def astronaut(side: int = 512) -> np.ndarray:
    """The astronaut photo as RGB, resized to ``side`` x ``side``, with faint noise that is new
    on every run: its encoded bytes exist nowhere else, so finding them anywhere is a leak."""
    from skimage import data

    rgb = np.ascontiguousarray(data.astronaut())
    if side != rgb.shape[0]:
        rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.LANCZOS))
    noise = np.random.default_rng().integers(-2, 3, rgb.shape)
    return np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def face_box(side: int) -> tuple[int, int, int, int]:
    scale = side / 512
    return tuple(int(round(v * scale)) for v in FACE_512)  # type: ignore[return-value]


def exif_with_secrets() -> bytes:
    """An EXIF block with a camera make, a serial number and GPS coordinates."""
    exif = Image.Exif()
    exif[0x010F] = "SECRETCAM"  # Make
    exif[0x0131] = "SECRET-SOFTWARE"
    ifd = exif.get_ifd(0x8769)
    ifd[0xA431] = "SECRET-SERIAL-1234"  # BodySerialNumber
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (52.0, 31.0, 12.34), "E", (13.0, 24.0, 56.78)
    return exif.tobytes()


def jpeg(side: int = 512, quality: int = 92, exif: bool = True) -> bytes:
    """The astronaut as a camera-like JPEG (with EXIF: make, serial number, GPS)."""
    buffer = io.BytesIO()
    kwargs = {"exif": exif_with_secrets()} if exif else {}
    Image.fromarray(astronaut(side)).save(buffer, "JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def png(side: int = 512) -> bytes:
    """The astronaut as a PNG, compressed at zlib level 1: written like the bot's own PNGs (level
    6), a copy whose rows below the covered head are the original's (as they should be) could
    compress to the same bytes there, and 64 of them (a leak scan's window) matched in about one
    covered copy in ten, a false leak that depended on where the fist's edge fell. Level 1 is
    another deflate strategy: 0 in 300 covered variants share a window."""
    buffer = io.BytesIO()
    Image.fromarray(astronaut(side)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def truncated_jpeg(side: int = 512) -> bytes:
    """A JPEG cut off in the middle of its scan data, as an interrupted upload leaves it."""
    data = jpeg(side, exif=False)
    return data[: len(data) // 3]


def decode(data: bytes) -> tuple[np.ndarray, Image.Image]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB")), image


def assert_anonymised(uploaded: bytes, original_rgb: np.ndarray, face: tuple[int, int, int, int]) -> None:
    """``uploaded`` decodes, carries no EXIF, and its face region no longer shows the face."""
    rgb, image = decode(uploaded)
    assert image.format in ("JPEG", "PNG"), image.format
    assert not image.getexif(), "the uploaded image still has EXIF"
    assert "exif" not in image.info and "icc_profile" not in image.info
    for secret in (b"SECRETCAM", b"SECRET-SERIAL", b"SECRET-SOFTWARE"):
        assert secret not in uploaded
    assert rgb.shape == original_rgb.shape, (rgb.shape, original_rgb.shape)
    x1, y1, x2, y2 = face
    before = original_rgb[y1:y2, x1:x2].astype(np.int16)
    after = rgb[y1:y2, x1:x2].astype(np.int16)
    changed = (np.abs(after - before).max(axis=2) > 40).mean()
    assert changed > 0.6, f"only {changed:.0%} of the face region changed"
    # ...while the rest of the photo is still the photo (it is a copy, not a blank image)
    mask = np.ones(rgb.shape[:2], bool)
    mask[max(0, y1 - 150):y2 + 150, max(0, x1 - 150):x2 + 150] = False
    outside = np.abs(rgb.astype(np.int16) - original_rgb.astype(np.int16)).max(axis=2)[mask]
    assert np.median(outside) < 20


# --------------------------------------------------------------------------- leak scanning


def windows(data: bytes, count: int = 32, size: int = 64) -> list[bytes]:
    """``count`` windows of ``size`` bytes spread over the body of ``data`` (headers skipped:
    quantisation and Huffman tables are shared by many JPEGs and prove nothing)."""
    start, stop = len(data) // 10, len(data) * 9 // 10 - size
    return [data[o:o + size] for o in np.linspace(start, stop, count).astype(int)]


def base64_needles(window: bytes) -> list[bytes]:
    """Base64 forms of ``window`` that appear in any base64 text containing it, whatever the
    alignment (one of three shifts is aligned to the encoder's 3-byte groups)."""
    return [base64.b64encode(window[s:s + 48]) for s in range(3)]


@dataclass
class Leak:
    where: str
    what: str


def scan_blob(blob: bytes, where: str, originals: list[bytes], magic: bool = True) -> list[Leak]:
    """Windows of any original (raw or base64) and image magic numbers found in ``blob``."""
    leaks: list[Leak] = []
    for number, original in enumerate(originals):
        for window in windows(original):
            if window in blob:
                leaks.append(Leak(where, f"64 raw bytes of original #{number}"))
                break
            if any(needle in blob for needle in base64_needles(window)):
                leaks.append(Leak(where, f"base64 of original #{number}"))
                break
    if magic:
        found = MAGIC.search(blob)
        if found:
            leaks.append(Leak(where, f"image magic {found.group(0)[:12]!r} at byte {found.start()}"))
    return leaks


def redis_snapshot(client) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Every key's DUMP and every value read by type, as bytes, keyed ``key:how``."""
    out: dict[str, bytes] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        dumped = client.dump(key)
        if dumped is not None:
            out[f"{name}:DUMP"] = dumped
        kind = client.type(key).decode()
        if kind == "string":
            value = [client.get(key) or b""]
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == "set":
            value = list(client.smembers(key))
        elif kind == "zset":
            value = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            value = []
        out[f"{name}:{kind}"] = b"\n".join(value)
    return out


def unescape_monitor(line: bytes) -> list[bytes]:
    """The arguments of one MONITOR line (``ts [db addr] "CMD" "arg" ...``) as raw bytes."""
    body = line.split(b"] ", 1)[1] if b"] " in line else line
    args: list[bytes] = []
    i = 0
    while i < len(body):
        if body[i:i + 1] != b'"':
            i += 1
            continue
        i += 1
        arg = bytearray()
        while i < len(body) and body[i:i + 1] != b'"':
            c = body[i:i + 1]
            if c == b"\\":
                nxt = body[i + 1:i + 2]
                if nxt == b"x":
                    arg += bytes([int(body[i + 2:i + 4], 16)])
                    i += 4
                    continue
                arg += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}.get(nxt, nxt)
                i += 2
                continue
            arg += c
            i += 1
        args.append(bytes(arg))
        i += 1
    return args


@dataclass
class RedisMonitor:
    """Every command any client sends to Redis while it runs (MONITOR on a raw socket)."""

    host: str
    port: int
    commands: list[list[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-monitor")

    def __enter__(self) -> "RedisMonitor":
        self._thread.start()
        assert self._ready.wait(5), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        sock = socket.create_connection((self.host, self.port))
        sock.settimeout(0.2)
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                buffer += chunk
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    if line == b"+OK":
                        self._ready.set()
                    elif line.startswith(b"+"):
                        self.commands.append(unescape_monitor(line[1:]))
        finally:
            sock.close()

    def writes(self, command: bytes) -> list[list[bytes]]:
        return [c for c in self.commands if c and c[0].upper() == command.upper()]


def files_changed_since(root: Path, since: float, skip: tuple[str, ...] = (".git", ".venv", "__pycache__", ".pytest_cache")) -> list[Path]:
    """Regular files under ``root`` created or modified at or after ``since`` (``skip``: folder names)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            path = Path(folder) / name
            try:
                if path.is_file() and path.stat().st_mtime >= since:
                    found.append(path)
            except OSError:
                continue
    return found
