"""A connection's reads that end at a deadline, however slowly a client sends (slow-loris)."""

from __future__ import annotations

import http.client
import io
import math
import socket
import time
from typing import Any

#: bytes of header lines allowed per request (the standard library alone allows 100 lines of
#: 64 KiB each, 6.5 MB held per connection while they trickle in)
MAX_HEADER_BYTES = 64 * 1024
#: idle time allowed on a connection's socket between reads
SOCKET_TIMEOUT_S = 30.0


class DeadlineReader:
    """A connection's ``rfile`` whose reads end at a deadline, however slowly bytes trickle in.

    A socket timeout alone bounds each ``recv``, not a read: a buffered ``readline`` or
    ``readinto`` keeps waiting as long as one byte arrives within every timeout, so a client
    sending a byte every 29 seconds held its place (and its admission to the Gate) for ever.
    Here every ``recv`` is armed with the time left, and a read made of several ``recv`` calls
    re-arms before each. ``budget`` (when set) bounds the bytes ``readline`` may return in all,
    for the header section of a request.
    """

    def __init__(self, raw: io.BufferedReader, sock: socket.socket) -> None:
        self._raw, self._sock = raw, sock
        self.deadline = math.inf
        self.budget: int | None = None

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def stop(self) -> None:
        """No deadline; the socket is back to the idle timeout (which also bounds writes)."""
        self.deadline = math.inf
        self._sock.settimeout(SOCKET_TIMEOUT_S)

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.stop()
            raise TimeoutError("the deadline for this request passed")
        self._sock.settimeout(min(SOCKET_TIMEOUT_S, left))

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while limit < 0 or len(line) < limit:
            self._arm()
            ahead = self._raw.peek(1)  # at most one recv
            if not ahead:
                break
            if limit >= 0:
                ahead = ahead[: limit - len(line)]
            end = ahead.find(b"\n")
            line += self._raw.read(end + 1 if end >= 0 else len(ahead))  # already buffered
            if self.budget is not None and len(line) > self.budget:
                # parse_request answers 431 for it
                raise http.client.HTTPException(f"the headers are longer than {MAX_HEADER_BYTES:,} bytes in all")
            if end >= 0:
                break
        if self.budget is not None:
            self.budget -= len(line)
        return bytes(line)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill ``buffer``; fewer bytes only at the end of the stream."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            self._arm()
            count = self._raw.readinto1(view[filled:])  # at most one recv
            if not count:
                break
            filled += count
        return filled

    def read1(self, size: int) -> bytes:
        """At most ``size`` bytes, from at most one receive: what the client has sent so far
        (``b""`` at the end of the stream)."""
        self._arm()
        return self._raw.read1(size)

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def __getattr__(self, name: str) -> Any:  # close(), closed, ... of the buffered reader
        return getattr(self._raw, name)
