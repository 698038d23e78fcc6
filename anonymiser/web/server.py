"""``anonymise serve``: a small local web server with one page and a two-call HTTP API.

- ``GET /`` and ``/static/*``: the page (plain HTML, CSS and JavaScript shipped in the package).
- ``POST /api/anonymise``: one image in (multipart field ``file``), the anonymised image out, or
  JSON ``{report, image (base64), regions, ...}`` with ``format=json``/``Accept: application/json``.
- ``POST /api/cover``: the ORIGINAL image again plus the person-reviewed region list; covers
  exactly those regions (``pipeline.cover_given``). This is how review works without the server
  keeping anything between requests: the browser keeps the person's own file.
- ``GET /api/health``, ``GET /api/openapi.json``.

Nothing is stored: bodies are read into memory, never written to disk, and never logged (the log
has one line per request with sizes, counts and timings only). A request larger than the limits
is refused from its ``Content-Length`` before its body is read. Memory is bounded by counting
bodies as they arrive against room for ``max_concurrent + queue`` whole bodies, by admitting at
most that many image requests, once their body is in, to wait or run (the rest get 503 with
``Retry-After``, before their body is read when the queue is already full), and by running at
most ``max_concurrent`` anonymisations at once.

This module is the HTTP side (handler, server, command line); what the handlers share is in
:mod:`.app`, admission in :mod:`.gate`, and reads bounded by a deadline in :mod:`.deadline_reader`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import SplitResult, parse_qs, urlsplit

from .. import emoji
from ..cover import STYLES, CoverStyle
from ..errors import AnonymiserError
from ..int_settings import decimal_value
from ..locators.registry import REGISTRY, WEIGHTS_DIR_HELP
from ..pipeline import Anonymiser, Result
from ..process import forbid_core_dumps
from . import multipart
from .app import (
    FORM_ALLOWANCE,
    RETRY_AFTER_S,
    HttpError,
    WebApp,
    busy,
    coverage_warning,
    http_error_for,
    parse_regions,
    result_json,
)
from .deadline_reader import MAX_HEADER_BYTES, SOCKET_TIMEOUT_S, DeadlineReader
from .gate import DEFAULT_QUEUE, Busy, Gate
from .hosts import HostPolicy, is_loopback

LOG = logging.getLogger("anonymiser.web")

DEFAULT_HOST = "127.0.0.1"
#: the log's status for a request whose client left before its photo's turn (nginx's
#: "client closed request"); nothing is sent
ABANDONED = 499
DEFAULT_PORT = 8321
#: a whole body must arrive within this time (a slow client must not hold a place for ever)
BODY_DEADLINE_S = 120.0
#: a request line and its headers must arrive within this time of the server starting to wait
#: for them (the same as the idle timeout of a kept-alive connection)
HEADER_DEADLINE_S = 30.0
#: connections served at once; one more is answered 503 at once. Each holds a thread and, while
#: its headers arrive, up to MAX_HEADER_BYTES; image bodies are bounded by the Gate.
MAX_CONNECTIONS = 64
#: after refusing a body we did not read, discard what the client still sends for this long,
#: so that closing the socket does not reset the connection before the client reads our answer
LINGER_S = 2.0
READ_CHUNK = 1024 * 1024
#: an answer goes out in pieces, each within the socket's idle timeout: one ``sendall`` of the
#: whole answer had to finish within that timeout, cutting off any client slower than 20 MB per
#: 30 s (a JSON answer near the output limit is ~22 MB) with a truncated 200
SEND_PIECE = 64 * 1024
#: ...and the whole answer within the idle timeout plus its size at this rate (a slow mobile
#: link), so that a client reading a byte at a time cannot hold its place for ever
MIN_SEND_BYTES_PER_S = 32 * 1024
#: trailer fields accepted after a chunked body (clients send none or one or two)
MAX_TRAILER_LINES = 64
# a chunk's size line: at most 16 hex digits (more would only ever be a lie or an attack)
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
    "script-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_EXTENSION = {"image/jpeg": "jpg", "image/png": "png"}


def split_url(url: str) -> SplitResult | None:
    """A request target or an Origin split into its parts; None when it is not a URL
    (``urlsplit`` raises ValueError on a broken IPv6 address such as ``http://[::1/x``)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def exposure_warning(host: str) -> str | None:
    """A loud warning when ``host`` makes the server reachable from other machines."""
    if is_loopback(host):
        return None
    bar = "!" * 78
    return (
        f"\n{bar}\nWARNING: listening on {host}, not only on this computer (127.0.0.1).\n"
        "Anyone who can reach this address can use the server, and photos travel over the\n"
        f"network unencrypted (plain HTTP). Only do this on a network you trust.\n{bar}\n"
    )



# --------------------------------------------------------------------------- HTTP handler


class Handler(BaseHTTPRequestHandler):
    """One connection; requests are dispatched by ``_dispatch`` and logged in one line each."""

    server: "WebServer"
    server_version = "anonymiser"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    # -- plumbing ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    rfile: DeadlineReader  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.rfile = DeadlineReader(self.rfile, self.connection)  # type: ignore[arg-type]

    def handle_one_request(self) -> None:
        """The request line and headers must all arrive within ``HEADER_DEADLINE_S`` (a timeout
        there closes the connection quietly, as the base class does)."""
        self.rfile.start(HEADER_DEADLINE_S)
        try:
            super().handle_one_request()
        finally:
            self.rfile.stop()

    def parse_request(self) -> bool:
        """The base class, with the header section bounded to ``MAX_HEADER_BYTES`` in all."""
        self.rfile.budget = MAX_HEADER_BYTES
        try:
            return super().parse_request()
        finally:
            self.rfile.budget = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        """Silenced: the default line carries the client address and the whole request line;
        ``_log`` writes one structured line with nothing from the upload instead."""

    @property
    def app(self) -> WebApp:
        return self.server.app

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              *, cache: str = "no-store", close: bool = False) -> None:
        self._status = status  # logged as answered even if the client has gone meanwhile
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self._bytes_out = 0
        if self.command != "HEAD":
            self._write_body(body)
        self._status, self._bytes_out = status, len(body)

    def _write_body(self, body: bytes) -> None:
        """Send ``body`` in pieces; ``TimeoutError`` when the client reads it too slowly (the
        log then shows how many bytes went out)."""
        deadline = time.monotonic() + SOCKET_TIMEOUT_S + len(body) / MIN_SEND_BYTES_PER_S
        view = memoryview(body)
        for start in range(0, len(body), SEND_PIECE):
            if time.monotonic() > deadline:
                raise TimeoutError("the client read the answer too slowly")
            piece = view[start : start + SEND_PIECE]
            self.wfile.write(piece)
            self._bytes_out = start + len(piece)

    def _send_json(self, status: int, value: Any, headers: dict[str, str] | None = None, *, close: bool = False) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", headers, close=close)

    def _send_error_json(self, error: HttpError) -> None:
        self._send_json(error.status, {"error": error.code, "message": error.message}, error.headers, close=error.close)
        if error.close:
            self._linger()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON errors also for what the base class refuses itself (bad request line, headers too
        long...), with the security headers; logged like any other request."""
        status = HTTPStatus(code)
        try:
            text = message or status.description
            if explain:
                text = f"{text} ({explain})"
            self._send_json(code, {"error": status.phrase.lower().replace(" ", "_"), "message": text}, close=True)
        except OSError:  # the client left before this answer: not an error of ours
            self.close_connection = True
        finally:
            self._log(getattr(self, "command", None) or "-", "-", time.perf_counter())

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` (curl sends it for uploads) is answered with the final 413 at
        once when the declared size is over the limit, so the client never sends that body."""
        declared = decimal_value((self.headers.get("Content-Length") or "").strip())
        if declared is not None and declared > self.app.max_request_bytes:
            started = time.perf_counter()
            self._bytes_in = declared
            self._send_error_json(self._too_large(declared))
            self._log(self.command or "-", getattr(split_url(self.path), "path", "-"), started)
            return False
        return super().handle_expect_100()

    def _linger(self) -> None:
        """Discard (never keep) what the client still sends of a body we refused, for a short
        while, then let the connection close. Closing with unread data would make the kernel
        reset the connection, and the client could lose our answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            scratch = bytearray(64 * 1024)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv_into(scratch):
                    break
        except OSError:
            pass

    def _log(self, method: str, path: str, started: float) -> None:
        """One structured line per request: never image bytes, never an uploaded file name."""
        LOG.info(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": method[:16],
            "path": path[:120],
            "status": getattr(self, "_status", None),
            "bytes_in": getattr(self, "_bytes_in", 0),
            "bytes_out": getattr(self, "_bytes_out", 0),
            "heads": getattr(self, "_heads", None),
            "seconds": round(time.perf_counter() - started, 3),
        }))

    # -- dispatch ------------------------------------------------------------------------

    def _routes(self) -> dict[str, dict[str, Callable[[], None]]]:
        api: dict[str, dict[str, Callable[[], None]]] = {
            "/api/anonymise": {"POST": self._anonymise},
            "/api/cover": {"POST": self._cover},
            "/api/health": {"GET": lambda: self._send_json(200, self.app.health())},
            "/api/openapi.json": {"GET": lambda: self._send(200, self.app.openapi, "application/json")},
        }
        for path, (body, content_type) in self.app.static.items():
            api[path] = {"GET": lambda b=body, c=content_type: self._send(200, b, c, cache="no-cache")}
        return api

    def _dispatch(self, method: str) -> None:
        self.rfile.stop()  # the headers are in; a body gets its own deadline
        started = time.perf_counter()
        self._status, self._bytes_in, self._bytes_out, self._heads = 500, 0, 0, None
        target = split_url(self.path)
        path = target.path if target else "-"
        answer: HttpError | None = None
        try:
            if target is None:
                raise HttpError(400, "bad_request_target", "The request's target is not a valid URL.",
                                close=self._has_body())
            self._check_framing()
            self._check_host()
            methods = self._routes().get(path)
            if methods is None:
                raise HttpError(404, "not_found", "There is nothing at this address.", close=self._has_body())
            if method == "HEAD" and "GET" in methods:
                method_handler = methods["GET"]
            elif method in methods:
                method_handler = methods[method]
            else:
                allowed = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed here; use {allowed}.",
                                close=self._has_body(), headers={"Allow": allowed})
            if method in ("GET", "HEAD") and self._has_body():
                raise HttpError(400, "unexpected_body", f"A {method} request has no body.", close=True)
            method_handler()
        except HttpError as error:
            answer = error
        except multipart.MultipartError as error:  # a form field that is too long or not UTF-8
            answer = HttpError(400, error.code, str(error))
        except AnonymiserError as error:
            answer = http_error_for(error)
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away; nothing to answer
        except Exception as error:  # noqa: BLE001 - answer 500 and keep serving
            # Only the exception's type: a message could quote bytes of the input.
            LOG.error(json.dumps({"internal_error": type(error).__name__}))
            answer = HttpError(500, "internal_error", "Something went wrong on our side.", close=True)
        try:
            if answer is not None:
                self._send_error_json(answer)
        except OSError:  # the client went away before our answer (e.g. after a stalled upload)
            self.close_connection = True
        finally:
            self._log(method, path, started)

    def _has_body(self) -> bool:
        return bool(self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"))

    def _check_framing(self) -> None:
        """One way to find where a request ends, for every method: a ``Content-Length`` stated
        twice with different values, or not a number, is refused and the connection closed. A
        GET with "0" and "39" was taken as bodiless and its 39 bytes answered as a second
        request; a proxy in front that took the other value would frame them differently
        (request smuggling)."""
        declared = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if len(declared) > 1 or any(decimal_value(value) is None for value in declared):
            raise HttpError(400, "bad_content_length", "The Content-Length header is not a single number.", close=True)

    def _check_host(self) -> None:
        """Refuse DNS-rebinding (a foreign name resolving to 127.0.0.1) and cross-site posts: a
        web page elsewhere must not be able to use this server."""
        host = (self.headers.get("Host") or "").lower()
        if self.app.hosts is not None and not self.app.hosts.accepts(host):
            raise HttpError(403, "forbidden_host", "This server only answers requests for its own address "
                            "(its operator can allow another name with --allow-host).", close=self._has_body())
        origin = self.headers.get("Origin")
        if origin is not None and self.command not in ("GET", "HEAD"):
            sender = split_url(origin)
            if sender is None or sender.netloc.lower() != host:
                raise HttpError(403, "forbidden_origin", "Requests from other web sites are refused.",
                                close=self._has_body())

    # -- request bodies ------------------------------------------------------------------

    def _read_body(self, take: Callable[[int], None]) -> bytearray:
        """The whole body in memory, refused (413) from its declared size before it is read;
        ``take`` counts each piece as it arrives (:class:`~.gate.BodyBudget`)."""
        limit = self.app.max_request_bytes
        if self.headers.get("Transfer-Encoding") is not None:
            if self.headers.get("Content-Length") is not None:
                # Two framings: a proxy in front may pick the other one, and what it takes for
                # the next request we would read as this body, or the reverse (smuggling).
                raise HttpError(400, "bad_framing", "A request cannot have both Content-Length and "
                                "Transfer-Encoding.", close=True)
            if self.headers["Transfer-Encoding"].strip().lower() != "chunked":
                raise HttpError(501, "unsupported_transfer_encoding", "Only chunked transfer encoding is supported.", close=True)
            return self._read_chunked(limit, take)
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise HttpError(411, "length_required", "The request needs a Content-Length header.", close=True)
        length = decimal_value(declared.strip())
        if length is None:  # _check_framing refuses it first; never read an unknown length
            raise HttpError(400, "bad_content_length", "The Content-Length header is not a number.", close=True)
        self._bytes_in = length
        if length > limit:
            raise self._too_large(length)
        body = bytearray()
        with self._body_deadline():
            if not self._receive(body, length, take):
                raise HttpError(400, "incomplete_body", "The connection closed before the whole body arrived.", close=True)
        return body

    def _receive(self, body: bytearray, size: int, take: Callable[[int], None]) -> bool:
        """Append the next ``size`` bytes of the body to ``body``, a piece at a time, each
        counted by ``take`` once it has arrived: memory grows with what the client has sent,
        never with what it declared (a buffer of the declared size, allocated up front, let
        a client that sent one byte hold 50 MB). False if the connection ends first."""
        while size:
            piece = self.rfile.read1(min(READ_CHUNK, size))
            if not piece:
                return False
            take(len(piece))
            body += piece
            size -= len(piece)
        return True

    @contextmanager
    def _body_deadline(self) -> Iterator[None]:
        """Reads within end at ``BODY_DEADLINE_S`` (or after ``SOCKET_TIMEOUT_S`` without a byte)
        with a 408, however slowly the body trickles in."""
        self.rfile.start(BODY_DEADLINE_S)
        try:
            yield
        except TimeoutError:
            self.rfile.stop()
            raise HttpError(408, "request_timeout", "The upload took too long or stalled.", close=True) from None
        finally:
            self.rfile.stop()

    def _too_large(self, size: int) -> HttpError:
        limit = self.app.limits.max_input_bytes
        return HttpError(
            413, "request_too_large",
            f"The upload is {size:,} bytes; this server accepts images of up to {limit:,} bytes.", close=True,
        )

    def _read_chunked(self, limit: int, take: Callable[[int], None]) -> bytearray:
        """A chunked body, refused as soon as it grows beyond ``limit``."""
        with self._body_deadline():
            return self._read_chunks(limit, take)

    def _read_chunks(self, limit: int, take: Callable[[int], None]) -> bytearray:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise HttpError(400, "bad_chunk", "A chunk header is malformed or the body is truncated.", close=True)
            # Hex digits only (RFC 9112 7.1), then optional whitespace before extensions: int(x, 16)
            # alone also takes "0x", "_", a sign and leading spaces, which a stricter proxy in front
            # would frame differently.
            digits = line.split(b";", 1)[0].rstrip(b"\r\n").rstrip(b" \t")
            if not CHUNK_SIZE.fullmatch(digits):
                raise HttpError(400, "bad_chunk", "A chunk size is not a hexadecimal number.", close=True)
            size = int(digits, 16)
            if size == 0:
                self._skip_trailers()
                self._bytes_in = len(body)
                return body
            if len(body) + size > limit:
                self._bytes_in = len(body) + size
                raise self._too_large(len(body) + size)
            if not self._receive(body, size, take) or self.rfile.read(2) != b"\r\n":
                raise HttpError(400, "bad_chunk", "The chunked body is truncated.", close=True)

    def _skip_trailers(self) -> None:
        """Read the trailer fields after the last chunk, up to the empty line that ends the
        request. More than ``MAX_TRAILER_LINES`` is refused with the connection closed: stopping
        there and going on left the rest to be read as the next request."""
        for _ in range(MAX_TRAILER_LINES):
            line = self.rfile.readline(1024)
            if line in (b"\r\n", b"\n"):
                return
            if not line.endswith(b"\n"):
                break  # too long, or the connection ended
        raise HttpError(400, "bad_chunk", "The chunked body's trailer is too long or truncated.", close=True)

    def _read_form(self, take: Callable[[int], None]) -> dict[str, multipart.Part]:
        try:
            multipart.boundary_of(self.headers.get("Content-Type"))  # before reading the body
        except multipart.MultipartError as error:
            raise HttpError(415, "not_multipart", str(error), close=self._has_body()) from None
        body = self._read_body(take)
        try:
            return multipart.parse(body, self.headers.get("Content-Type"))
        except multipart.MultipartError as error:
            raise HttpError(400, error.code, str(error)) from None

    def _options(self, form: dict[str, multipart.Part]) -> tuple[bytes, CoverStyle, bool]:
        """The image, the style and whether JSON was asked for, from the form and the query."""
        try:
            query = parse_qs(getattr(split_url(self.path), "query", ""), max_num_fields=16)
        except ValueError:
            raise HttpError(400, "bad_parameter", "Too many query parameters.") from None

        def option(name: str) -> str | None:
            if name in form:
                return form[name].text(256).strip()
            values = query.get(name)
            return values[0].strip() if values else None

        part = form.get("file")
        if part is None:
            raise HttpError(400, "missing_file", "Send the image as a multipart form field named 'file'.")
        style = self.app.style_for(option("style"), option("skin_tone"))
        fmt = option("format")
        if fmt not in (None, "json", "image"):
            raise HttpError(400, "bad_parameter", "'format' is 'json' or 'image'.")
        want_json = fmt == "json" or (fmt is None and "application/json" in (self.headers.get("Accept") or "").lower())
        return part.data, style, want_json

    def _send_result(self, result: Result, want_json: bool) -> None:
        self._heads = result.report.heads_covered
        if want_json:
            self._send_json(200, result_json(result))
            return
        name = f"anonymised.{_EXTENSION.get(result.mime, 'jpg')}"
        self._send(200, result.data, result.mime, {
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Heads-Covered": str(result.report.heads_covered),
        })

    # -- endpoints -----------------------------------------------------------------------

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """A slot to run a photo in, unless its client left while it waited (a closed tab, a
        cancelled upload): its photo is then dropped unprocessed, and the slot goes to the next
        photo instead of minutes of work nobody will receive."""
        with self.app.gate.slot():
            if self._client_gone():
                self._status = ABANDONED
                raise ConnectionAbortedError("the client left while its photo waited")
            yield

    def _client_gone(self) -> bool:
        """Whether the client has closed the connection (the whole body was read, so anything
        readable is either the end of the stream or its next, pipelined request). A client that
        only closes its sending side and still waits looks the same; HTTP clients do not."""
        # poll, not select: select refuses descriptors past 1023, which a busy process with a
        # raised file limit reaches, and would have every photo there dropped.
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        try:
            if not poller.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True

    @contextmanager
    def _upload(self) -> Iterator[Callable[[int], None]]:
        """Room for this request's body while it arrives (``take`` counts it, see
        :class:`~.gate.BodyBudget`); refused before any of it is read when the gate's queue is
        already full. The place in the queue itself is taken once the body is in."""
        if self.app.gate.full:
            raise Busy()
        with self.app.bodies.hold() as take:
            yield take

    def _anonymise(self) -> None:
        try:
            with self._upload() as take:
                form = self._read_form(take)
                with self.app.gate.admit():
                    data, style, want_json = self._options(form)
                    del form  # only the image bytes stay referenced while the models run
                    with self._turn():
                        result = self.app.anonymise(data, style)
                    del data
                    self._send_result(result, want_json)
        except Busy:
            raise busy() from None

    def _cover(self) -> None:
        try:
            with self._upload() as take:
                form = self._read_form(take)
                with self.app.gate.admit():
                    data, style, want_json = self._options(form)
                    if "regions" not in form:
                        raise HttpError(400, "bad_regions", "Send the final list of covers as a form field named 'regions'.")
                    regions = parse_regions(form["regions"].text(FORM_ALLOWANCE))
                    del form
                    with self._turn():
                        result = self.app.cover(data, regions, style)
                    del data
                    self._send_result(result, want_json)
        except Busy:
            raise busy() from None


class WebServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; the ``Gate`` bounds what
    the threads may hold and run."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the listen backlog (the base class has 5)

    def __init__(self, address: tuple[str, int], app: WebApp, max_connections: int = MAX_CONNECTIONS) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        self.max_connections = max_connections
        self._connections = 0
        self._connections_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def connections(self) -> int:
        """Connections being served now."""
        with self._connections_lock:
            return self._connections

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, or, past ``max_connections``, a 503 at once: without a
        bound, every connection that trickles its headers holds a thread and their bytes."""
        with self._connections_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 without reading the request and close; never blocks the accepting thread."""
        body = json.dumps({"error": "busy", "message": "The anonymiser has too many open connections; "
                           "please try again in a few seconds."}).encode()
        head = [
            "HTTP/1.1 503 Service Unavailable", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Cache-Control: no-store", f"Retry-After: {RETRY_AFTER_S}",
            "Connection: close", *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
        ]
        try:
            request.setblocking(False)
            request.send("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        LOG.info(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "method": "-",
                             "path": "-", "status": 503, "refused": "too_many_connections"}))
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An exception that escaped a handler: one line with its type. The base class prints
        the client's address and a traceback to stderr; neither belongs in this log. A client
        that hung up (a reset or broken pipe, met reading its next request or sending an answer
        the standard library builds itself) is its own doing, not an internal error."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            LOG.info(json.dumps({"client_gone": type(error).__name__}))
            return
        LOG.error(json.dumps({"internal_error": type(error).__name__}))


def make_server(app: WebApp, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_connections: int = MAX_CONNECTIONS, allow_hosts: Sequence[str] = ()) -> WebServer:
    """Bind (port 0: any free port) and set the Host names the server answers to
    (:class:`~anonymiser.web.hosts.HostPolicy`)."""
    server = WebServer((host, port), app, max_connections)
    app.hosts = HostPolicy.for_address(host, allow_hosts)
    return server


def url_of(server: WebServer, host: str) -> str:
    """The address to open in a browser."""
    port = server.server_address[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anonymise serve",
        description="Start the local web page and HTTP API. Photos are processed in memory on this "
        "computer and never stored.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: 127.0.0.1, this computer only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: 8321; 0 picks a free one)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="another name the server may be reached by (repeatable); requests for names it "
                        "does not know are refused, so that no web site can point its own name at it")
    parser.add_argument("--max-concurrent", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="photos processed at once (default: number of CPUs, at most 2)")
    parser.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                        help="photos that may wait for their turn; more get 503 (default: 8)")
    parser.add_argument("--weights", type=Path, default=None, help=WEIGHTS_DIR_HELP)
    parser.add_argument("--locator", action="append", choices=sorted(REGISTRY),
                        help="locator to use (repeatable; default: every one whose weights are present)")
    parser.add_argument("--style", choices=STYLES, default="emoji", help="default cover style")
    parser.add_argument("--skin-tone", choices=sorted(emoji.SKIN_TONES), default=emoji.DEFAULT_TONE)
    parser.add_argument("--no-safeguard", action="store_true", help="do not fill gaps between packed heads")
    parser.add_argument("--no-residual", action="store_true", help="skip the second face pass over the covered image")
    return parser


def main(argv: Sequence[str]) -> int:
    """``anonymise serve ...``: load the models once, then serve until interrupted."""
    args = _parser().parse_args(argv)
    forbid_core_dumps()  # the page holds people's originals in memory
    if args.max_concurrent < 1 or args.queue < 0:
        print("anonymise serve: --max-concurrent must be >= 1 and --queue >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:  # bind() raises OverflowError for it, not OSError
        print("anonymise serve: --port must be between 0 and 65535", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    from ..cli import settings_from_args  # the CLI imports this module lazily, so no cycle

    settings = settings_from_args(args)
    try:
        anonymiser = Anonymiser(settings, weights_dir=args.weights)
    except AnonymiserError as exc:
        print(f"anonymise serve: {exc}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    missing_heads = coverage_warning([l.name for l in anonymiser.locators])
    if missing_heads:
        print(f"\n{'!' * 78}\nWARNING: {missing_heads}\n{'!' * 78}\n", file=sys.stderr, flush=True)
    try:
        server = make_server(WebApp(anonymiser, Gate(args.max_concurrent, args.queue)), args.host, args.port,
                             allow_hosts=args.allow_host)
    except OSError as exc:
        print(f"anonymise serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    names = ", ".join(l.name for l in anonymiser.locators)
    print(f"Anonymiser running with locators {names}. Nothing is stored.", flush=True)
    print(f"Open {url_of(server, args.host)} in your browser (Ctrl+C stops it).", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
