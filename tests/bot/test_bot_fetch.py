"""bot/fetch.py: media downloads stay in memory, within the byte cap, and never reach private
or local addresses (checked again on every redirect hop)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests
import responses

from bot import fetch as fetching
from bot.fetch import FetchError, MediaTooLarge, fetch
from bot.logs import JsonFormatter
from fake_mastodon import FakeMastodon

PUBLIC = {"photos.example": "93.184.216.34", "cdn.example": "151.101.1.140"}
PRIVATE = {"intranet.example": "10.1.2.3", "metadata.example": "169.254.169.254", "mixed.example": None}


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names resolve without the network: public ones to public addresses, others not."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def entry(address: str) -> tuple:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 0))

        if host in PUBLIC:
            return [entry(PUBLIC[host])]
        if host == "mixed.example":  # one public and one private A record
            return [entry("93.184.216.34"), entry("192.168.0.7")]
        if host in PRIVATE:
            return [entry(PRIVATE[host])]  # type: ignore[arg-type]
        if host.endswith(".example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(fetching.socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def server() -> Iterator[FakeMastodon]:
    fake = FakeMastodon().start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/photo.jpg",
    "http://localhost/photo.jpg",
    "http://10.0.0.8/photo.jpg",
    "http://192.168.1.20/photo.jpg",
    "http://172.16.5.4/photo.jpg",
    "http://100.64.0.1/photo.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/photo.jpg",
    "http://[::1]/photo.jpg",
    "http://[::ffff:127.0.0.1]/photo.jpg",
    "http://[fd00::1]/photo.jpg",
    "http://224.0.0.1/photo.jpg",
    "http://intranet.example/photo.jpg",
    "http://metadata.example/photo.jpg",
    "http://mixed.example/photo.jpg",
])
@responses.activate
def test_private_and_local_addresses_are_refused(dns: None, url: str) -> None:
    with pytest.raises(FetchError, match="private or local network address") as caught:
        fetch(url, 1024, 5.0)
    assert len(responses.calls) == 0, "refused before any connection"
    assert url not in str(caught.value)


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 (RFC 6052): a gateway translates it to 169.254.169.254
    "64:ff9b::a00:5",  # ... and this one to 10.0.0.5, inside the gateway's network
    "64:ff9b::7f00:1",
    "64:ff9b:1::a00:5",  # NAT64 local-use prefix (RFC 8215)
    "2002:a9fe:a9fe::1",  # 6to4: the IPv4 relay is 169.254.169.254
    "::a9fe:a9fe",  # IPv4-compatible (deprecated; Linux's sit tunnel sends it to the IPv4 address)
    "fec0::1",  # site-local (deprecated, still routed inside some networks)
])
@responses.activate
def test_ipv6_addresses_that_reach_a_private_ipv4_one_are_refused(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Python's ``is_global`` calls these global (a NAT64 address is, as far as IPv6 goes), but
    in an IPv6-only network with NAT64 (AWS, Google Cloud) they reach the IPv4 address they
    embed: the cloud's metadata service and the private network behind the gateway. Whether
    the media URL names the address or a name answers it (an AAAA record) makes no difference."""
    _answers(monkeypatch, "nat64.example", [address])
    for url in (f"http://[{address}]/photo.jpg", "http://nat64.example/photo.jpg"):
        with pytest.raises(FetchError, match="private or local network address"):
            fetch(url, 1024, 5.0)
    assert len(responses.calls) == 0


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "2606:2800:220:1::1"])
def test_ipv6_addresses_of_public_servers_are_allowed(address: str) -> None:
    """An IPv6-only worker reaches an IPv4-only media server through NAT64 (and 6to4): the
    public IPv4 address it embeds (93.184.216.34) passes."""
    fetching.check_url(f"http://[{address}]/photo.jpg", allow_private=False)


def test_loopback_server_is_refused_unless_allowed(server: FakeMastodon) -> None:
    url = server.add_file(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(FetchError, match="private or local"):
        fetch(url, 1024, 5.0)
    assert server.media_requests() == []
    assert fetch(url, 1024, 5.0, allow_private=True) == b"\xff\xd8\xff not really a jpeg"


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:8080/internal.jpg",
    "http://intranet.example/photo.jpg",
    "http://[::1]/x",
    "http://169.254.169.254/latest/meta-data/iam/",
])
@responses.activate
def test_redirect_to_a_private_address_is_refused(dns: None, target: str) -> None:
    responses.get("https://photos.example/a.jpg", status=302, headers={"Location": target})
    with pytest.raises(FetchError, match="private or local"):
        fetch("https://photos.example/a.jpg", 1024, 5.0)
    assert [c.request.url for c in responses.calls] == ["https://photos.example/a.jpg"]


@responses.activate
def test_public_redirects_are_followed_each_hop_checked(dns: None) -> None:
    responses.get("https://photos.example/a.jpg", status=301, headers={"Location": "/b.jpg"})
    responses.get("https://photos.example/b.jpg", status=307, headers={"Location": "https://cdn.example/c.jpg"})
    responses.get("https://cdn.example/c.jpg", body=b"image bytes")
    assert fetch("https://photos.example/a.jpg", 1024, 5.0) == b"image bytes"


@responses.activate
def test_too_many_redirects(dns: None) -> None:
    responses.get("https://photos.example/loop.jpg", status=302, headers={"Location": "/loop.jpg"})
    with pytest.raises(FetchError, match="redirects too many times"):
        fetch("https://photos.example/loop.jpg", 1024, 5.0)
    assert len(responses.calls) == fetching.MAX_REDIRECTS + 1


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "ftp://photos.example/a.jpg",
    "gopher://photos.example/a.jpg",
    "data:image/jpeg;base64,/9j/4AAQ",
    "javascript:alert(1)",
    "//photos.example/a.jpg",
    "http:///a.jpg",
    "",
])
@responses.activate
def test_non_http_urls_are_refused(dns: None, url: str) -> None:
    with pytest.raises(FetchError, match="not http"):
        fetch(url, 1024, 5.0)
    assert len(responses.calls) == 0


@pytest.mark.parametrize("location", ["http://[::1/x.jpg", "http://[abc]/x.jpg", "//[zz]/x.jpg"])
@responses.activate
def test_a_redirect_to_a_malformed_address_fails_that_image_only(dns: None, location: str) -> None:
    """``urljoin`` raised ValueError, which no caller expects: the whole post was dead-lettered
    (its other photos never anonymised) and the requester heard only "try again later"."""
    responses.get("https://photos.example/a.jpg", status=302, headers={"Location": location})
    with pytest.raises(FetchError, match="could not be downloaded") as caught:
        fetch("https://photos.example/a.jpg", 1024, 5.0)
    assert location not in str(caught.value)


@responses.activate
def test_redirect_to_a_non_http_scheme_is_refused(dns: None) -> None:
    responses.get("https://photos.example/a.jpg", status=302, headers={"Location": "file:///etc/shadow"})
    with pytest.raises(FetchError, match="not http"):
        fetch("https://photos.example/a.jpg", 1024, 5.0)


@pytest.mark.parametrize("url", [
    "https://" + "a" * 64 + ".invalid/a.jpg",  # IDNA refuses labels over 63 characters (UnicodeError)
    "https://[::1/a.jpg",  # an unclosed IPv6 literal (ValueError from urlparse)
    "https://[::zz]/a.jpg",  # an invalid one (ValueError from .hostname)
])
def test_malformed_media_urls_fail_that_image_only(url: str) -> None:
    """A FetchError is one image's failure; anything else would fail the whole post."""
    with pytest.raises(FetchError, match="invalid"):
        fetch(url, 1024, 5.0)


def test_unknown_host(dns: None) -> None:
    with pytest.raises(FetchError, match="does not resolve"):
        fetch("https://nowhere.example/a.jpg", 1024, 5.0)


def _answers(monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> list[str]:
    """``name`` resolves to each of ``answers`` in turn (then the last one again); returns the log
    of answers given, so a test can see how many lookups were made."""
    real = socket.getaddrinfo
    given: list[str] = []

    def getaddrinfo(host: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if host != name:
            return real(host, *args, **kwargs)
        address = answers[min(len(given), len(answers) - 1)]
        given.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 0))]

    monkeypatch.setattr(fetching.socket, "getaddrinfo", getaddrinfo)
    return given


def test_dns_rebinding_to_a_local_address_is_refused(server: FakeMastodon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name answers a public address to the first lookup and loopback (where a server really
    listens) to the next: the connection checks the address it is about to use, so nothing is
    requested from the loopback server."""
    url = server.add_file(b"\xff\xd8\xff internal").replace("127.0.0.1", "rebind.example")
    given = _answers(monkeypatch, "rebind.example", ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(FetchError, match="private or local"):
        fetch(url, 1024, 5.0)
    assert given == ["93.184.216.34", "127.0.0.1"]
    assert server.media_requests() == []


def test_connection_goes_to_the_address_that_was_checked(server: FakeMastodon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name no real DNS knows reaches the local server only through the checked lookup (allowed
    here, as in tests), and the server still sees the name in the Host header."""
    url = server.add_file(b"\xff\xd8\xff pinned").replace("127.0.0.1", "pinned.example")
    given = _answers(monkeypatch, "pinned.example", ["127.0.0.1"])
    assert fetch(url, 1024, 5.0, allow_private=True) == b"\xff\xd8\xff pinned"
    assert len(given) == 2  # the check before the request, and the connection's own
    hosts = [{k.lower(): v for k, v in r.headers.items()}["host"] for r in server.media_requests()]
    assert hosts == [f"pinned.example:{server.port}"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_to_the_checked_address_still_verifies_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket goes to the checked address, but TLS (SNI and certificate check) still uses the
    name: a certificate for the name is accepted, and one for another name is not."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=pinned.example", "-addext", "subjectAltName=DNS:pinned.example"],
                   check=True, capture_output=True)

    class Photo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"tls payload")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Photo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        _answers(monkeypatch, "pinned.example", ["127.0.0.1"])
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE would replace the test's trust anchor
        session.verify = str(cert)
        assert fetch(f"https://pinned.example:{port}/a.jpg", 1024, 5.0, allow_private=True, session=session) == b"tls payload"
        _answers(monkeypatch, "other.example", ["127.0.0.1"])
        with pytest.raises(FetchError, match="could not be downloaded"):
            fetch(f"https://other.example:{port}/a.jpg", 1024, 5.0, allow_private=True, session=session)
    finally:
        server.shutdown()
        server.server_close()


def test_declared_length_over_the_cap_is_refused_before_reading(server: FakeMastodon) -> None:
    url = server.add_file(b"\xff\xd8\xff", declared_length=50 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge):
        fetch(url, 1024 * 1024, 5.0, allow_private=True)
    assert time.monotonic() - started < 5


def test_a_length_too_long_for_int_is_refused_as_too_large() -> None:
    """A media server's Content-Length of 5,000 nines: ``int()`` refuses over 4,300 digits, and
    the ValueError escaped the downloader's typed errors; it is simply too large."""

    class Photo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "9" * 5000)
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MediaTooLarge):
            fetch(f"http://127.0.0.1:{server.server_address[1]}/a.jpg", 1024 * 1024, 5.0, allow_private=True)
    finally:
        server.shutdown()
        server.server_close()


def test_size_cap_enforced_while_streaming_without_content_length(server: FakeMastodon) -> None:
    url = server.add_file(b"\xff\xd8\xff" + b"x" * 1021, endless=True)  # chunked, never ends
    started = time.monotonic()
    with pytest.raises(MediaTooLarge):
        fetch(url, 256 * 1024, 5.0, allow_private=True)
    assert time.monotonic() - started < 10, "abandoned as soon as the cap is passed"


def test_a_trickling_server_cannot_hold_the_download_past_its_deadline(server: FakeMastodon) -> None:
    # One byte every 0.1 s never trips the 1-second read timeout; only an overall deadline
    # stops it (the old per-read timeout let it run the 100 s the body takes).
    url = server.add_file(b"\xff" * 1000, trickle_s=0.1)
    started = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s") as caught:
        fetch(url, 1024 * 1024, 1.0, allow_private=True)
    assert time.monotonic() - started < 3
    assert "media/files" not in str(caught.value)
    # a slow but complete download within the deadline is fine
    assert fetch(server.add_file(b"\xff\xd8\xff", trickle_s=0.05), 1024, 5.0, allow_private=True) == b"\xff\xd8\xff"


def _raw_server(head: bytes, trickle: bytes, seconds: float) -> str:
    """A server that sends ``head``, then ``trickle`` every 0.2 s for ``seconds``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            conn.sendall(head)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(trickle)
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            conn.close()
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/photo.jpg"


@pytest.mark.parametrize("head", [
    # a gzip header whose file name never ends: a decoder reads on without yielding a byte
    b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x08\x00\x00\x00\x00\x00\xff",
    b"HTTP/1.1 200 OK\r\nX-Slow: ",  # a header line that never ends
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=",  # nor does a chunk-size line
], ids=["gzip-name", "header", "chunk-size"])
def test_no_trickle_outlasts_the_deadline(head: bytes) -> None:
    """Bytes that never complete anything keep a read waiting without a read timeout; the
    deadline's watchdog shuts the socket down."""
    url = _raw_server(head, b"a", seconds=8.0)
    started = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s"):
        fetch(url, 1024 * 1024, 1.0, allow_private=True)
    assert time.monotonic() - started < 2.5


def answer_once(response: bytes) -> int:
    """A loopback server that answers one request with the raw ``response``; its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:  # read the whole request first: no reset races
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            conn.sendall(response)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_a_length_in_odd_digits_is_no_crash() -> None:
    """HTTP headers are decoded as Latin-1, so a server can declare its length as "²", which
    ``str.isdigit`` accepts and ``int()`` refuses (a ValueError that dead-lettered the job): the
    declared length is ignored and the body read under the cap, as without one."""
    port = answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n\xff\xd8\xff")
    url = f"http://127.0.0.1:{port}/photo.jpg"
    assert fetch(url, 1024, 5.0, allow_private=True) == b"\xff\xd8\xff"


def test_a_librarys_warning_about_a_media_server_does_not_log_its_url() -> None:
    """urllib3 warns "Failed to parse headers (url=...)" with the whole URL when a header line
    has no colon: in the worker's JSON log, the path and query (a capability link) are cut."""
    port = answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nno colon here\r\n"
                       b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        fetch(f"http://127.0.0.1:{port}/media/7f3c9a1e-capability/photo.jpg?token=s3cr3t", 1024, 5.0, allow_private=True)
    except FetchError:
        pass
    finally:
        root.removeHandler(handler)
    [warning] = [json.loads(line) for line in written.getvalue().splitlines()]
    assert warning["msg"].startswith(f"Failed to parse headers (url=http://127.0.0.1:{port}/…")
    assert "capability" not in written.getvalue() and "s3cr3t" not in written.getvalue()


def test_body_of_exactly_the_cap_is_accepted(server: FakeMastodon) -> None:
    body = bytes(range(256)) * 1024
    assert fetch(server.add_file(body), len(body), 5.0, allow_private=True) == body
    with pytest.raises(MediaTooLarge):
        fetch(server.add_file(body + b"!"), len(body), 5.0, allow_private=True)


def test_http_errors_and_timeouts_become_safe_messages(server: FakeMastodon) -> None:
    missing = server.base_url + "/media/files/does-not-exist.jpg"
    with pytest.raises(FetchError, match="answered HTTP 404") as caught:
        fetch(missing, 1024, 5.0, allow_private=True)
    assert missing not in str(caught.value) and "does-not-exist" not in str(caught.value)
    slow = server.add_file(b"late")
    server.hold_media()
    try:
        with pytest.raises(FetchError, match=r"took longer than 0.5 s") as caught:
            fetch(slow, 1024, 0.5, allow_private=True)
    finally:
        server.release_media()
    assert slow not in str(caught.value)


def test_a_compression_bomb_is_cut_at_the_cap_without_decompressing_it_all() -> None:
    """A server may send a compressed body though the fetch asks for none. 1 KB of gzip inside
    gzip ("Content-Encoding: gzip, gzip") unpacks to 256 MB: urllib3 before 2.6 decoded all
    that a read brought at once, and more layers (it had no limit on them) reach any size, so
    one post could take a worker's memory. The cap must stop it while its memory stays small."""
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)
    layer = b"".join(inner.compress(bytes(1024 * 1024)) for _ in range(256)) + inner.flush()
    body = gzip.compress(layer, 9)
    port = answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Encoding: gzip, gzip\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    tracemalloc.start()
    try:
        with pytest.raises(MediaTooLarge):
            fetch(f"http://127.0.0.1:{port}/photo.jpg", 1024 * 1024, 10.0, allow_private=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """``slow.example`` answers (with a public address) only after 10 s or when the test ends;
    the n-th lookup of it is slow when ``n`` is listed in the returned dict's ``"slow"``."""
    real = socket.getaddrinfo
    released = threading.Event()
    state: dict = {"lookups": 0, "slow": {1}}

    def getaddrinfo(host: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if host != "slow.example":
            return real(host, *args, **kwargs)
        state["lookups"] += 1
        if state["lookups"] in state["slow"]:
            released.wait(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("93.184.216.34", 0))]

    monkeypatch.setattr(fetching.socket, "getaddrinfo", getaddrinfo)
    yield state
    released.set()


@pytest.mark.parametrize("slow_lookup", [1, 2], ids=["before the request", "as the connection opens"])
def test_a_name_lookup_that_hangs_ends_at_the_download_deadline(slow_dns: dict, slow_lookup: int) -> None:
    """A resolver that does not answer held the worker for its own timeouts (5 s a try, per
    name server, per redirect hop), outside the download's deadline."""
    slow_dns["slow"] = {slow_lookup}
    started = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 0.5 s"):
        fetch("http://slow.example/photo.jpg", 1024, 0.5)
    assert time.monotonic() - started < 3
    assert slow_dns["lookups"] == slow_lookup


def test_a_failed_lookup_inside_the_deadline_is_still_its_own_error(dns: None) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="does not resolve"):
        fetch("https://nowhere.example/a.jpg", 1024, 30.0)
    assert time.monotonic() - started < 3
