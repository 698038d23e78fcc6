"""Downloading a post's images into memory only, with caps and address checks.

http(s) only; every address the host resolves to must be public (no loopback, private,
link-local, multicast or reserved ranges) unless a test setting allows it; redirects are
followed by hand so each hop is checked again; the body is read in chunks and abandoned as
soon as it exceeds the byte cap. Nothing touches the disk.

Known gap: the address check and the download resolve the name separately, so a DNS server that
answers differently the second time (rebinding) is not caught; pinning the connection to the
checked address is the fix.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlparse

import requests

MAX_REDIRECTS = 3


class FetchError(Exception):
    """The media could not be fetched safely; the message is safe to show to users."""


class MediaTooLarge(FetchError):
    pass


def _check_address(host: str, allow_private: bool) -> None:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise FetchError("the media server's name does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if allow_private:
            continue
        if not address.is_global or address.is_multicast:
            raise FetchError("the media URL points to a private or local network address")


def check_url(url: str, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and hosts that resolve to non-public addresses."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise FetchError("the media URL is not http(s)")
    _check_address(parsed.hostname, allow_private)


def fetch(url: str, max_bytes: int, timeout_s: float, allow_private: bool = False, session: requests.Session | None = None) -> bytes:
    """The body at ``url``, in memory, at most ``max_bytes``."""
    http = session or requests.Session()
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, allow_private)
        try:
            response = http.get(url, stream=True, timeout=timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            raise FetchError(f"the media could not be downloaded ({type(exc).__name__})") from None
        with response:
            if response.is_redirect:
                url = urljoin(url, response.headers.get("Location", ""))
                continue
            if response.status_code != 200:
                raise FetchError(f"the media server answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise MediaTooLarge(f"the image is larger than {max_bytes // (1024 * 1024)} MiB")
            chunks: list[bytes] = []
            total = 0
            try:
                for chunk in response.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise MediaTooLarge(f"the image is larger than {max_bytes // (1024 * 1024)} MiB")
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise FetchError(f"the media download failed ({type(exc).__name__})") from None
            return b"".join(chunks)
    raise FetchError("the media URL redirects too many times")
