"""Downloading a post's images into memory only, with caps and address checks.

http(s) only; every address the host resolves to must be public (no loopback, private,
link-local, multicast or reserved ranges, nor an IPv6 address that leads to such an IPv4 one
through NAT64, 6to4 or IPv4-compatible form) unless a test setting allows it; redirects are
followed by hand so each hop is checked again; the body is read in chunks and abandoned as
soon as it exceeds the byte cap. Nothing touches the disk.

The check is made where the connection is opened, on the very addresses it connects to: the
connection resolves the name once, checks every address, and connects to a checked one. So a DNS
server that answers "public" to a first lookup and "private" to the next (rebinding) gains
nothing. (Through an HTTP proxy from the environment the proxy connects instead, and only the
check before the request applies: start-up warns, ``BotConfig.risks``.)

The download's deadline covers the name lookups too: ``getaddrinfo`` cannot be interrupted and
a resolver that does not answer holds it for its own timeouts (5 s a try, per name server, per
redirect hop), so each lookup runs on a thread of its own, which is left to finish alone when
the deadline passes first.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from socket import SHUT_RDWR
from functools import lru_cache
from urllib.parse import urljoin, urlparse

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from anonymiser.int_settings import decimal_value

MAX_REDIRECTS = 3


class FetchError(Exception):
    """The media could not be fetched safely; the message is safe to show to users."""


class MediaTooLarge(FetchError):
    pass


#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address a gateway reaches
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: IPv6 ranges that lead into a local network, which Python's ``is_global`` (3.11) calls global:
#: NAT64's local-use prefix (RFC 8215) and the deprecated site-local one
_LOCAL_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one is a way to reach (NAT64, 6to4, IPv4-compatible), if any."""
    if address in _NAT64 or int(address) >> 32 == 0:  # ::a.b.c.d, deprecated, still tunnelled
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour or address.ipv4_mapped


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` reaches the public internet only: an IPv6 address that carries an
    IPv4 one reaches that one too (a NAT64 gateway in an IPv6-only cloud network turns
    64:ff9b::a9fe:a9fe into the metadata service at 169.254.169.254)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _LOCAL_V6):
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return _is_public(embedded)
    return True


def _lookup(host: str) -> list[tuple]:  # type: ignore[type-arg]
    """``host``'s addresses, within the current download's deadline when there is one."""
    watch: _Watch | None = getattr(_watched, "watch", None)
    if watch is None:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    answer: queue.SimpleQueue[tuple[bool, object]] = queue.SimpleQueue()

    def resolve() -> None:
        try:
            answer.put((True, socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)))
        except BaseException as exc:  # handed to the caller, who raises it
            answer.put((False, exc))

    threading.Thread(target=resolve, name="media-dns", daemon=True).start()
    try:
        found, value = answer.get(timeout=max(0.0, watch.deadline - time.monotonic()))
    except queue.Empty:
        watch.cut()
        raise FetchError("deadline") from None
    if not found:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _check_address(host: str, allow_private: bool) -> str:
    """Resolve ``host`` once; refuse it if any address is not public; return the first one."""
    try:
        infos = _lookup(host)
    except socket.gaierror:
        raise FetchError("the media server's name does not resolve") from None
    except (UnicodeError, ValueError):
        # IDNA refuses labels over 63 characters, and so on: a malformed name, not our failure.
        raise FetchError("the media URL is invalid") from None
    if not infos:
        raise FetchError("the media server's name does not resolve")
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if allow_private:
            continue
        if not _is_public(address):
            raise FetchError("the media URL points to a private or local network address")
    return str(infos[0][4][0])


class _Watch:
    """The sockets of one download, shut down together when its deadline passes."""

    def __init__(self, deadline: float) -> None:
        #: ``time.monotonic()`` at which the download must be over
        self.deadline = deadline
        self.expired = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
        if self.expired.is_set():
            self.cut()  # opened after the deadline (a redirect's connection)

    def cut(self) -> None:
        self.expired.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(SHUT_RDWR)
            except OSError:
                pass  # already closed


#: the current thread's download, whose connections its deadline cuts
_watched = threading.local()


class _CheckedConnection:
    """Mixed into urllib3's connections: the socket goes to an address checked in this very call."""

    allow_private = False
    _dns_host: str

    def _new_conn(self):  # type: ignore[no-untyped-def]
        name = self._dns_host
        self._dns_host = _check_address(name, self.allow_private)
        try:
            sock = super()._new_conn()  # type: ignore[misc]
        finally:
            self._dns_host = name  # TLS (SNI, certificate) and the Host header keep the name
        watch = getattr(_watched, "watch", None)
        if watch is not None:
            watch.add(sock)
        return sock


@lru_cache(maxsize=2)
def _checked_pools(allow_private: bool) -> dict[str, type]:
    flag = {"allow_private": allow_private}
    http = type("CheckedHTTPConnection", (_CheckedConnection, HTTPConnection), flag)
    https = type("CheckedHTTPSConnection", (_CheckedConnection, HTTPSConnection), flag)
    return {
        "http": type("CheckedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("CheckedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _checked_pools(self._allow_private)


def checked_session(allow_private: bool, session: requests.Session | None = None) -> requests.Session:
    """A session whose connections only ever reach addresses that pass the check."""
    http = session or requests.Session()
    adapter = _CheckedAdapter(allow_private)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def check_url(url: str, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and hosts that resolve to non-public addresses."""
    try:
        parsed = urlparse(url)
        host = parsed.hostname  # parsing an IPv6 literal like "[::zz]" happens here
    except ValueError:
        raise FetchError("the media URL is invalid") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise FetchError("the media URL is not http(s)")
    _check_address(host, allow_private)


def fetch(url: str, max_bytes: int, timeout_s: float, allow_private: bool = False, session: requests.Session | None = None) -> bytes:
    """The body at ``url``, in memory, at most ``max_bytes``, within ``timeout_s`` for the whole
    download, redirects and name lookups included.

    A per-read timeout alone would let a server that sends a byte a second hold a worker for as
    long as it likes, and a read can be kept waiting by bytes that never complete anything (a
    header line, a chunk-size line, a gzip header's file name): at the deadline a watchdog shuts
    the download's sockets down, which ends any read at once."""
    watch = _Watch(time.monotonic() + timeout_s)
    watchdog = threading.Timer(timeout_s, watch.cut)
    watchdog.daemon = True
    _watched.watch = watch
    watchdog.start()
    try:
        return _download(url, max_bytes, timeout_s, allow_private, checked_session(allow_private, session), watch.expired)
    except MediaTooLarge:
        raise
    except FetchError:
        if watch.expired.is_set():
            raise FetchError(f"the media download took longer than {timeout_s:g} s") from None
        raise
    finally:
        watchdog.cancel()
        _watched.watch = None


def _download(url: str, max_bytes: int, timeout_s: float, allow_private: bool, http: requests.Session,
              expired: threading.Event) -> bytes:
    """:func:`fetch`'s requests, redirect by redirect, until ``expired``."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, allow_private)
        if expired.is_set():
            raise FetchError("deadline")
        try:
            # Images need no compression, and a decoder is one more place for bytes to pile up.
            response = http.get(url, stream=True, timeout=timeout_s, allow_redirects=False,
                                headers={"Accept-Encoding": "identity"})
        except (requests.RequestException, ValueError) as exc:
            # ValueError: requests parses a redirect's Location while answering, and
            # "http://[::1/x" is no address at all
            raise FetchError(f"the media could not be downloaded ({type(exc).__name__})") from None
        with response:
            if response.is_redirect:
                url = urljoin(url, response.headers.get("Location", ""))
                continue
            if response.status_code != 200:
                raise FetchError(f"the media server answered HTTP {response.status_code}")
            declared = decimal_value((response.headers.get("Content-Length") or "").strip())
            if declared is not None and declared > max_bytes:
                raise MediaTooLarge(f"the image is larger than {max_bytes // (1024 * 1024)} MiB")
            chunks: list[bytes] = []
            total = 0
            try:
                # read1 returns what one socket read brings, so a trickle is checked against the
                # deadline between reads too, not only by the watchdog.
                while chunk := response.raw.read1(64 * 1024, decode_content=True):
                    total += len(chunk)
                    if total > max_bytes:
                        raise MediaTooLarge(f"the image is larger than {max_bytes // (1024 * 1024)} MiB")
                    chunks.append(chunk)
                    if expired.is_set():
                        raise FetchError("deadline")
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise FetchError(f"the media download failed ({type(exc).__name__})") from None
            if expired.is_set():
                raise FetchError("deadline")  # the cut socket reads as a (truncated) end of file
            return b"".join(chunks)
    raise FetchError("the media URL redirects too many times")
