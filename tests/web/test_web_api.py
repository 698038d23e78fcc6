"""The HTTP API of ``anonymise serve``: good and bad inputs, limits, methods, headers, the
concurrency bound and the OpenAPI document. An in-process server on a free loopback port."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import requests

from anonymiser import emoji
from anonymiser.cover import CoverStyle, cover
from anonymiser.limits import Limits
from anonymiser.pipeline import Anonymiser, Settings
from anonymiser.web import multipart as mp
from anonymiser.web.app import HttpError, parse_regions
from anonymiser.web.gate import BodyBudget, Busy
from anonymiser.web.server import CSP

from web_harness import (
    ASTRONAUT_FACE,
    SECRET_FILENAME,
    RunningServer,
    SlowLocator,
    animated_gif,
    assert_no_metadata,
    decode,
    multipart,
    raw_exchange,
    read_response,
    start_server,
)


def post(web: RunningServer, path: str, data: bytes, *, name: str = SECRET_FILENAME, mime: str = "image/jpeg",
         fields: dict[str, str] | None = None, params: dict[str, str] | None = None,
         headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{web.url}{path}", files={"file": (name, data, mime)}, data=fields or {},
                         params=params or {}, headers=headers or {}, timeout=60)


def contains(box: list[int] | tuple[int, ...], inner: tuple[int, int, int, int]) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def assert_security_headers(response: requests.Response) -> None:
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


# --------------------------------------------------------------------------- good inputs


def test_jpeg_comes_back_covered_and_clean(web: RunningServer, astronaut_jpeg: bytes, astronaut: np.ndarray) -> None:
    """A camera JPEG with EXIF/GPS gives a JPEG with no metadata whose face is covered."""
    response = post(web, "/api/anonymise", astronaut_jpeg)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.headers["Cache-Control"] == "no-store"
    assert int(response.headers["X-Heads-Covered"]) >= 1
    assert SECRET_FILENAME not in response.headers.get("Content-Disposition", "")
    assert_security_headers(response)
    assert_no_metadata(response.content)
    out = decode(response.content)
    assert out.shape == astronaut.shape
    x1, y1, x2, y2 = ASTRONAUT_FACE
    # The face is replaced, not blurred: far from the original, near the opaque cover.
    assert np.abs(out[y1:y2, x1:x2].astype(int) - astronaut[y1:y2, x1:x2].astype(int)).mean() > 40


def test_png_json_form_reports_regions_painted_exactly(web: RunningServer, astronaut_png: bytes, astronaut: np.ndarray) -> None:
    """``Accept: application/json`` gives the report, the base64 image and the regions; on PNG
    every reported region is pixel-for-pixel the opaque fist cover and the rest is untouched."""
    response = post(web, "/api/anonymise", astronaut_png, mime="image/png", headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["mime"] == "image/png" and (body["width"], body["height"]) == (512, 512)
    assert body["heads_covered"] >= 1 and body["report"]["heads_covered"] == body["heads_covered"]
    assert body["report"]["input_format"] == "png" and body["report"]["locators"] == ["centerface"]
    assert "SECRET" not in json.dumps(body["report"])
    data = base64.b64decode(body["image"])
    assert_no_metadata(data)
    out = decode(data)
    boxes = [r["box"] for r in body["regions"]]
    assert any(contains(b, ASTRONAUT_FACE) for b in boxes), boxes
    mask = np.zeros(out.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = True
    assert np.array_equal(out[~mask], astronaut[~mask])
    expected = cover(astronaut, np.array(boxes), CoverStyle())
    assert np.array_equal(out, expected)


def test_format_parameter_wins_over_accept(web: RunningServer, astronaut_jpeg: bytes) -> None:
    """``format=image`` gives the image even with ``Accept: application/json``; ``format=json``
    gives JSON with ``Accept: */*``."""
    image = post(web, "/api/anonymise", astronaut_jpeg, params={"format": "image"}, headers={"Accept": "application/json"})
    assert image.headers["Content-Type"] == "image/jpeg"
    as_json = post(web, "/api/anonymise", astronaut_jpeg, fields={"format": "json"})
    assert as_json.headers["Content-Type"] == "application/json" and as_json.json()["image"]


def test_style_and_skin_tone_per_request(web: RunningServer, astronaut_png: bytes, astronaut: np.ndarray) -> None:
    """``style=solid`` paints every region in the backing colour; a skin tone changes the fist;
    the server's default style is left alone for the next request."""
    solid = post(web, "/api/anonymise", astronaut_png, mime="image/png", params={"style": "solid", "format": "json"}).json()
    out = decode(base64.b64decode(solid["image"]))
    for region in solid["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert np.all(out[y1:y2, x1:x2] == CoverStyle().colour)
    dark = post(web, "/api/anonymise", astronaut_png, mime="image/png", fields={"skin_tone": "dark", "format": "json"}).json()
    out = decode(base64.b64decode(dark["image"]))
    assert np.array_equal(out, cover(astronaut, np.array([r["box"] for r in dark["regions"]]), CoverStyle(skin_tone="dark")))
    default = post(web, "/api/anonymise", astronaut_png, mime="image/png", params={"format": "json"}).json()
    out = decode(base64.b64decode(default["image"]))
    assert np.array_equal(out, cover(astronaut, np.array([r["box"] for r in default["regions"]]), CoverStyle()))


def test_cover_adds_and_removes_regions(web: RunningServer, astronaut_png: bytes, astronaut: np.ndarray) -> None:
    """Review: the original again plus the edited list (face cover removed, a missed head
    added) covers exactly that: the added region is the same opaque fist as automatic covers,
    pixel for pixel, and the removed region shows the original."""
    first = post(web, "/api/anonymise", astronaut_png, mime="image/png", params={"format": "json"}).json()
    face = next(r["box"] for r in first["regions"] if contains(r["box"], ASTRONAUT_FACE))
    added = [330, 300, 450, 440]
    kept = [r["box"] for r in first["regions"] if r["box"] != face]
    response = post(web, "/api/cover", astronaut_png, mime="image/png",
                    fields={"regions": json.dumps(kept + [added]), "format": "json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["box"] for r in body["regions"]] == kept + [added]
    assert all(r["sources"] == ["manual"] for r in body["regions"])
    out = decode(base64.b64decode(body["image"]))
    x1, y1, x2, y2 = added
    tile = emoji.render(x2 - x1, y2 - y1, emoji.DEFAULT_TONE, emoji.DEFAULT_BACKING)
    assert np.array_equal(out[y1:y2, x1:x2], tile)
    # the automatic cover's pixels come from the same renderer: same style
    auto = decode(base64.b64decode(first["image"]))
    fx1, fy1, fx2, fy2 = face
    assert np.array_equal(auto[fy1:fy2, fx1:fx2], emoji.render(fx2 - fx1, fy2 - fy1))
    assert np.array_equal(out[fy1:fy2, fx1:fx2], astronaut[fy1:fy2, fx1:fx2])
    assert_no_metadata(base64.b64decode(body["image"]))


def test_cover_on_jpeg_returns_the_image(web: RunningServer, astronaut_jpeg: bytes, astronaut: np.ndarray) -> None:
    """Without the JSON form, /api/cover returns the image; on JPEG the uncovered face is the
    original (within JPEG error) and the added region is the cover (within JPEG error)."""
    added = [20, 300, 140, 440]
    response = post(web, "/api/cover", astronaut_jpeg, fields={"regions": json.dumps([{"box": added}])})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/jpeg" and response.headers["X-Heads-Covered"] == "1"
    assert_no_metadata(response.content)
    out = decode(response.content).astype(int)
    x1, y1, x2, y2 = ASTRONAUT_FACE
    assert np.abs(out[y1:y2, x1:x2] - astronaut[y1:y2, x1:x2].astype(int)).mean() < 6
    x1, y1, x2, y2 = added
    assert np.abs(out[y1:y2, x1:x2] - emoji.render(x2 - x1, y2 - y1).astype(int)).mean() < 6


@pytest.mark.parametrize(
    "regions, why",
    [
        ("not json", "not valid JSON"),
        ('{"box": [1, 2, 3, 4]}', "not an array"),
        ("[[1, 2, 3]]", "four numbers"),
        ('[[1, 2, "3", 4]]', "finite number"),
        ("[[10, 10, 5, 20]]", "x2 > x1"),
        ("[[0, 0, 1e9, 10]]", "finite number"),
    ],
)
def test_cover_refuses_bad_regions(web: RunningServer, astronaut_png: bytes, regions: str, why: str) -> None:
    response = post(web, "/api/cover", astronaut_png, mime="image/png", fields={"regions": regions})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_regions" and why in response.json()["message"]


def test_cover_refuses_regions_stacked_over_the_image(web: RunningServer, astronaut_png: bytes) -> None:
    """Boxes that would paint the image dozens of times over are a 400, not minutes of work."""
    stacked = [[0, 0, 512 - i, 512] for i in range(40)]
    response = post(web, "/api/cover", astronaut_png, mime="image/png", fields={"regions": json.dumps(stacked)})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_regions" and "times over" in response.json()["message"]


def test_cover_needs_regions(web: RunningServer, astronaut_png: bytes) -> None:
    response = post(web, "/api/cover", astronaut_png, mime="image/png")
    assert response.status_code == 400 and response.json()["error"] == "bad_regions"


def test_too_many_regions() -> None:
    with pytest.raises(Exception, match="more than 10,000"):
        parse_regions(json.dumps([[0, 0, 1, 1]] * 10_001))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "data, mime, status, code",
    [
        (b"Dear diary, this is plain text and not an image at all.", "text/plain", 415, "unsupported_image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 415, "unsupported_image"),
        (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "application/pdf", 415, "unsupported_image"),
        (b"", "image/jpeg", 422, "empty_image"),
    ],
    ids=["text", "svg", "pdf", "empty-part"],
)
def test_bad_images_get_clear_json_errors(web: RunningServer, data: bytes, mime: str, status: int, code: str) -> None:
    response = post(web, "/api/anonymise", data, mime=mime)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["error"] == code and len(body["message"]) > 10
    assert_security_headers(response)


def test_truncated_jpeg_is_422(web: RunningServer, astronaut_jpeg: bytes) -> None:
    response = post(web, "/api/anonymise", astronaut_jpeg[: len(astronaut_jpeg) // 2])
    assert response.status_code == 422 and response.json()["error"] == "corrupt_image"


def test_animated_gif_is_422(web: RunningServer) -> None:
    response = post(web, "/api/anonymise", animated_gif(), mime="image/gif")
    assert response.status_code == 422 and response.json()["error"] == "animated_image"


def test_missing_file_field(web: RunningServer) -> None:
    response = requests.post(f"{web.url}/api/anonymise", files={"photo": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "missing_file", "message": "Send the image as a multipart form field named 'file'."}


def test_not_multipart(web: RunningServer, astronaut_jpeg: bytes) -> None:
    response = requests.post(f"{web.url}/api/anonymise", data=astronaut_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert response.status_code == 415 and response.json()["error"] == "not_multipart"


def test_an_overlong_content_type_is_refused_before_it_is_parsed(web: RunningServer) -> None:
    """A 60 KB Content-Type with an open quote and many ";" cost the server seconds of CPU in
    the standard library's parameter parser, twice, before any limit looked at the request."""
    content_type = 'multipart/form-data; boundary=b; x="' + ";" * 60_000
    response = requests.post(f"{web.url}/api/anonymise", data=b"", headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 415 and response.json()["error"] == "not_multipart"
    assert "longer than 1,024 characters" in response.json()["message"]


def test_malformed_multipart(web: RunningServer, astronaut_jpeg: bytes) -> None:
    body, content_type = multipart({"file": ("a.jpg", astronaut_jpeg, "image/jpeg")})
    cut = body[: -len(b"--\r\n") - 60]  # no closing boundary
    response = requests.post(f"{web.url}/api/anonymise", data=cut, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 400 and response.json()["error"] == "bad_multipart"


def test_duplicate_file_field(web: RunningServer, astronaut_jpeg: bytes) -> None:
    files = [("file", ("a.jpg", astronaut_jpeg, "image/jpeg")), ("file", ("b.jpg", astronaut_jpeg, "image/jpeg"))]
    response = requests.post(f"{web.url}/api/anonymise", files=files, timeout=30)
    assert response.status_code == 400 and "more than once" in response.json()["message"]


@pytest.mark.parametrize("params", [{"style": "blur"}, {"skin_tone": "green"}, {"format": "xml"}])
def test_bad_parameters(web: RunningServer, astronaut_jpeg: bytes, params: dict[str, str]) -> None:
    response = post(web, "/api/anonymise", astronaut_jpeg, params=params)
    assert response.status_code == 400 and response.json()["error"] == "bad_parameter"


# --------------------------------------------------------------------------- size limits


def test_oversized_content_length_is_refused_before_the_body(web: RunningServer) -> None:
    """Headers only, announcing a terabyte: the 413 arrives although no byte of the body was
    sent, i.e. the server decided from Content-Length and did not wait to read the body."""
    _, content_type = multipart({"file": ("a.jpg", b"x", "image/jpeg")})
    head = (
        "POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ct}\r\n"
        "Content-Length: 1000000000000\r\n\r\n"
    ).format(port=web.port, ct=content_type).encode()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        response = read_response(sock, timeout=5)
        assert time.monotonic() - started < 3
    assert response.status == 413
    assert response.headers["connection"] == "close"
    body = json.loads(response.body)
    assert body["error"] == "request_too_large" and "52,428,800" in body["message"]
    assert response.headers["content-security-policy"] == CSP


def test_just_over_the_limit_is_refused_too(cf_anonymiser: Anonymiser, astronaut_jpeg: bytes) -> None:
    """With a 20 kB image budget, a real 60 kB upload is refused (413) and a small one passes
    the size check; chunked uploads are cut off as soon as they pass the limit."""
    small = Settings(locators=("centerface",), limits=Limits(max_input_bytes=20_000))
    web = start_server(Anonymiser(small, locators=cf_anonymiser.locators))
    try:
        limit = web.app.max_request_bytes
        response = post(web, "/api/anonymise", astronaut_jpeg + b"\0" * (limit - len(astronaut_jpeg) + 1))
        assert response.status_code == 413 and response.json()["error"] == "request_too_large"
        # within the request limit but over the image budget: the image core refuses it
        response = post(web, "/api/anonymise", astronaut_jpeg)
        assert response.status_code == 413 and response.json()["error"] == "image_too_large"
        # chunked: refused at the chunk that crosses the limit, the rest is never read
        head = (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"%x\r\n%s\r\n" % (limit // 2, b"a" * (limit // 2))
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
            sock.sendall(head + chunk + chunk + chunk[:100])
            response_raw = read_response(sock, timeout=5)
        assert response_raw.status == 413
    finally:
        web.stop()


def test_missing_content_length_is_411(web: RunningServer) -> None:
    response = raw_exchange(web.port, (
        f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
        "Content-Type: multipart/form-data; boundary=abc\r\n\r\n").encode())
    assert response.status == 411 and json.loads(response.body)["error"] == "length_required"


def test_chunked_upload_within_the_limit_works(web: RunningServer, astronaut_jpeg: bytes) -> None:
    body, content_type = multipart({"file": ("a.jpg", astronaut_jpeg, "image/jpeg")})
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7000]), body[i : i + 7000]) for i in range(0, len(body), 7000))
    response = raw_exchange(web.port, (
        f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nContent-Type: {content_type}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + chunks + b"0\r\n\r\n")
    assert response.status == 200 and response.body[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("size", [b"0x10", b"1_0", b"+10", b" 10", b"10 x"])
def test_a_chunk_size_that_is_not_plain_hex_is_refused(web: RunningServer, size: bytes) -> None:
    """RFC 9112's chunk-size is hex digits only. Python's int(..., 16) also takes "0x", "_",
    a sign and spaces: a proxy in front that reads the size strictly would frame the body
    differently from us, and the bytes one of us counts as the next request the other does not
    (request smuggling)."""
    response = raw_exchange(web.port, (
        f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        + size + b"\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n")
    assert response.status == 400 and json.loads(response.body)["error"] == "bad_chunk"
    assert response.headers.get("connection") == "close"


def test_a_request_with_both_content_length_and_chunked_is_refused_and_closed(web: RunningServer) -> None:
    """Content-Length beside Transfer-Encoding is the classic smuggling frame: RFC 9112 (6.1)
    lets a server refuse it and requires it to close the connection after answering, so that
    nothing after the body is ever read as a request of its own."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall((
            f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
            + f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
        response = read_response(sock)
        assert response.status == 400 and json.loads(response.body)["error"] == "bad_framing"
        assert response.headers.get("connection") == "close"
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert b"HTTP/1." not in rest  # the smuggled request got no answer


# --------------------------------------------------------------------------- methods, paths, headers


@pytest.mark.parametrize(
    "method, path, allow",
    [("GET", "/api/anonymise", "POST"), ("PUT", "/api/cover", "POST"), ("DELETE", "/api/anonymise", "POST"),
     ("POST", "/", "GET, HEAD"), ("POST", "/api/health", "GET, HEAD")],
)
def test_wrong_method_is_405(web: RunningServer, method: str, path: str, allow: str) -> None:
    response = requests.request(method, f"{web.url}{path}", timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow
    assert response.json()["error"] == "method_not_allowed"
    assert_security_headers(response)


@pytest.mark.parametrize("path", ["/nope", "/static/../server.py", "/static/secret.txt", "/api/", "/favicon.ico"])
def test_unknown_path_is_404(web: RunningServer, path: str) -> None:
    response = requests.get(f"{web.url}{path}", timeout=10)
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert_security_headers(response)


def test_foreign_host_and_origin_are_refused(web: RunningServer, astronaut_jpeg: bytes) -> None:
    """DNS rebinding (another name for 127.0.0.1) and cross-site form posts are refused."""
    response = requests.get(f"{web.url}/", headers={"Host": "attacker.example"}, timeout=10)
    assert response.status_code == 403 and response.json()["error"] == "forbidden_host"
    response = post(web, "/api/anonymise", astronaut_jpeg, headers={"Origin": "https://attacker.example"})
    assert response.status_code == 403 and response.json()["error"] == "forbidden_origin"
    response = post(web, "/api/anonymise", astronaut_jpeg, headers={"Origin": web.url})
    assert response.status_code == 200
    assert requests.get(f"http://localhost:{web.port}/api/health", timeout=10).status_code == 200


def test_a_server_on_every_interface_answers_only_its_own_names(astronaut_jpeg: bytes) -> None:
    """Listening on 0.0.0.0 (a LAN), the server answers IP addresses, this machine's own names
    and the names its operator allows, and still refuses a foreign name pointed at it (DNS
    rebinding), and a known name on another port."""
    anonymiser = Anonymiser(Settings(safeguard=False, residual_pass=False), locators=[SlowLocator(delay=0.0)])
    lan = start_server(anonymiser, host="0.0.0.0", allow_hosts=("Photos.LAN",))
    try:
        def status(host: str) -> int:
            return requests.get(f"http://127.0.0.1:{lan.port}/api/health", headers={"Host": host}, timeout=10).status_code

        for known in ("127.0.0.1", "localhost", "192.168.1.5", "[::1]", "[fe80::1]", socket.gethostname(), "photos.lan"):
            assert status(f"{known}:{lan.port}") == 200, known
        for foreign in ("attacker.example", "192.168.1.5.attacker.example", "photos.lan.attacker.example"):
            assert status(f"{foreign}:{lan.port}") == 403, foreign
        assert status("") == 403 and status("localhost:") == 403  # no name; a malformed port
        # Behind a reverse proxy or a container's port mapping the port is another: the name decides.
        assert status("photos.lan") == 200 and status("localhost:8080") == 200
        assert status("localhost:\xb2") == 403  # a port in odd digits is malformed, not a crash
        response = requests.post(f"http://127.0.0.1:{lan.port}/api/anonymise", headers={"Host": "attacker.example"},
                                 files={"file": ("p.jpg", astronaut_jpeg, "image/jpeg")}, timeout=10)
        assert response.status_code == 403 and response.json()["error"] == "forbidden_host"
        assert "--allow-host" in response.json()["message"]
    finally:
        lan.stop()


def test_host_policy_for_each_address() -> None:
    """The names each listening address answers to (the port is part of every check)."""
    from anonymiser.web.hosts import HostPolicy, split_host

    loopback = HostPolicy.for_address("127.0.0.1")
    assert all(loopback.accepts(f"{n}:8321") for n in ("127.0.0.1", "LOCALHOST", "[::1]"))
    assert loopback.accepts("localhost") and loopback.accepts("localhost:8080")  # any port: a proxy's, a mapping's
    assert not any(loopback.accepts(h) for h in ("10.0.0.2:8321", "evil.example:8321", "[::1]:x"))
    lan_ip = HostPolicy.for_address("192.168.1.5", ["photos.lan."])
    assert lan_ip.accepts("192.168.1.5") and lan_ip.accepts("192.168.1.5:80") and lan_ip.accepts("photos.lan")
    assert not lan_ip.accepts("127.0.0.1") and not lan_ip.accepts("10.0.0.9")  # only its own address
    v6 = HostPolicy.for_address("::1")
    assert v6.accepts("[::1]:8321") and v6.accepts("localhost:8321") and not v6.accepts("::1")
    assert HostPolicy.for_address("2001:db8:0:0::1").accepts("[2001:db8::1]:8321")  # as a browser writes it
    everywhere = HostPolicy.for_address("0.0.0.0")
    assert everywhere.accepts("10.9.8.7:8321") and everywhere.accepts("[2001:db8::1]:8321")
    assert not everywhere.accepts("2001:db8::1") and not everywhere.accepts("evil.example:8321")
    for bad in ("", ":80", "a:", "a:b", "[::1", "[::1]x", "a:0", "a:65536", "a:\xb2"):
        assert split_host(bad) is None, bad
    assert split_host("Host.Example") == ("host.example", 80) and split_host("[::1]:9") == ("[::1]", 9)


def test_a_photo_whose_client_left_while_it_waited_is_not_processed(astronaut_jpeg: bytes,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """One photo at a time: a second upload waits its turn, and its client gives up (a closed
    tab) before the turn comes. Its photo is dropped unprocessed and logged as 499, the slot goes
    to the next photo, and the server keeps serving."""
    locator = SlowLocator(delay=0.8)
    anonymiser = Anonymiser(Settings(safeguard=False, residual_pass=False), locators=[locator])
    web = start_server(anonymiser, max_concurrent=1, queue=4)
    try:
        first: list[requests.Response] = []
        running = threading.Thread(target=lambda: first.append(post(web, "/api/anonymise", astronaut_jpeg)))
        with caplog.at_level(logging.INFO, logger="anonymiser.web"):
            running.start()
            deadline = time.monotonic() + 10
            while locator.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert locator.running == 1
            body, content_type = multipart({"file": ("p.jpg", astronaut_jpeg, "image/jpeg")})
            with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
                sock.sendall(f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nContent-Type: {content_type}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                deadline = time.monotonic() + 10
                while web.app.gate.admitted < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert web.app.gate.admitted == 2  # it waits for the slot
            running.join(30)
            assert first[0].status_code == 200
            assert post(web, "/api/anonymise", astronaut_jpeg).status_code == 200
            assert locator.calls == 2  # the first and the last photo; never the abandoned one

            def statuses() -> list[int]:
                return sorted(json.loads(r.getMessage())["status"] for r in caplog.records if r.getMessage().startswith("{"))

            deadline = time.monotonic() + 10  # a request's line is logged just after its answer is sent
            while len(statuses()) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert statuses() == [200, 200, 499]
    finally:
        web.stop()


def test_a_server_holding_many_files_still_serves_photos(astronaut_jpeg: bytes) -> None:
    """Past 1,023 open files (a busy process whose file limit was raised) a connection's number
    is beyond what ``select`` takes: the check for a client that left must not count every
    client as gone and drop its photo."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip("the file limit is too low to open 1,100 files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        anonymiser = Anonymiser(Settings(safeguard=False, residual_pass=False), locators=[SlowLocator(delay=0.0)])
        web = start_server(anonymiser, max_concurrent=1)
        try:
            response = post(web, "/api/anonymise", astronaut_jpeg)
            assert response.status_code == 200 and response.headers["X-Heads-Covered"] == "1"
        finally:
            web.stop()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_length_in_odd_digits_is_refused_not_a_crash(web: RunningServer) -> None:
    """Headers are read as Latin-1, so "²" can arrive, which ``str.isdigit`` accepts and ``int()``
    refuses: 400 for the body's length (it was a 500)."""
    answer = raw_exchange(web.port, f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                          "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: \xb2\r\n\r\n".encode("latin-1"))
    assert answer.status == 400 and json.loads(answer.body)["error"] == "bad_content_length"


def test_numbers_too_long_for_int_are_refused_not_a_crash(web: RunningServer) -> None:
    """``int()`` refuses more than 4,300 digits: a Content-Length of 5,000 nines was a 500 (with
    ``Expect: 100-continue``, no answer at all), a Host port of 5,000 digits a 500 too."""
    nines = "9" * 5000
    head = (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {nines}\r\n")
    for expect in ("", "Expect: 100-continue\r\n"):
        answer = raw_exchange(web.port, f"{head}{expect}\r\n".encode())
        assert answer.status == 413 and json.loads(answer.body)["error"] == "request_too_large"
    answer = raw_exchange(web.port, f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{'1' * 5000}\r\n\r\n".encode())
    assert answer.status == 403 and json.loads(answer.body)["error"] == "forbidden_host"


def _answers(port: int, request: bytes) -> list[bytes]:
    """Every status line the server sends back on one connection for ``request`` (sent whole,
    then our side closed for writing), until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while piece := sock.recv(65536):
            received += piece
    return re.findall(rb"HTTP/1\.1 \d{3}", bytes(received))


def test_a_second_request_cannot_hide_in_a_bodys_framing(web: RunningServer) -> None:
    """Two Content-Lengths that disagree on a GET, or more trailer fields than are read after
    a chunked body, used to leave bytes that were answered as a second request (a proxy in
    front that framed them otherwise would pass that request on unseen): now one 400, and the
    connection is closed."""
    host = f"Host: 127.0.0.1:{web.port}\r\n"
    hidden = f"GET /api/openapi.json HTTP/1.1\r\n{host}\r\n".encode()
    two_lengths = f"GET /api/health HTTP/1.1\r\n{host}Content-Length: 0\r\nContent-Length: {len(hidden)}\r\n\r\n".encode()
    assert _answers(web.port, two_lengths + hidden) == [b"HTTP/1.1 400"]
    trailers = "".join(f"X-T{i}: 1\r\n" for i in range(70))
    chunked = (f"POST /api/anonymise HTTP/1.1\r\n{host}Content-Type: multipart/form-data; boundary=b\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n5\r\n--b--\r\n0\r\n{trailers}\r\n").encode()
    assert _answers(web.port, chunked + hidden) == [b"HTTP/1.1 400"]
    # a trailer or two, as clients send them, is still fine
    one_trailer = chunked.replace(trailers.encode(), b"X-Checksum: 1\r\n")
    assert json.loads(raw_exchange(web.port, one_trailer).body)["error"] == "missing_file"  # read to its end


def test_page_and_static_files(web: RunningServer) -> None:
    """The page ships with the package, says that nothing is stored, and references nothing
    outside this server (no CDN, fonts or analytics: a static check; the browser test checks
    the requests really made)."""
    page = requests.get(f"{web.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_security_headers(page)
    assert "Nothing is stored." in page.text and "on this computer" in page.text
    assert 'type="file"' in page.text and 'accept="image/*"' in page.text and "capture=" in page.text
    assert 'name="viewport"' in page.text
    # What the Content-Security-Policy would block must not be needed: no inline script or style.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text) and "<style" not in page.text
    assert not re.search(r"\sstyle=", page.text) and not re.search(r"\son[a-z]+=", page.text)
    for path in ("/", "/static/app.js", "/static/app.css"):
        text = requests.get(f"{web.url}{path}", timeout=10).text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"external URL in {path}"
        assert "@import" not in text and "url(" not in text, path
    head = requests.head(f"{web.url}/static/app.js", timeout=10)
    assert head.status_code == 200 and head.headers["Content-Type"].startswith("text/javascript") and not head.content


def test_health(web: RunningServer) -> None:
    health = requests.get(f"{web.url}/api/health", timeout=10)
    assert health.status_code == 200 and health.headers["Cache-Control"] == "no-store"
    body = health.json()
    assert body["status"] == "ok" and body["locators"] == ["centerface"]
    assert body["style"] == "emoji" and body["skin_tone"] == emoji.DEFAULT_TONE
    assert body["max_input_bytes"] == Limits().max_input_bytes


def test_health_warns_when_only_faces_are_looked_for(web: RunningServer) -> None:
    """CenterFace alone (the head model not installed, as after scripts/setup) misses heads
    seen from behind: the page must say so instead of a silent 'N heads covered'."""
    warning = requests.get(f"{web.url}/api/health", timeout=10).json()["warning"]
    assert "Only faces" in warning and "weights/README.md" in warning
    for name in ("heads", "lsccnn"):
        anonymiser = Anonymiser(Settings(), locators=[SlowLocator(delay=0.0, name=name)])
        with_heads = start_server(anonymiser)
        try:
            assert requests.get(f"{with_heads.url}/api/health", timeout=10).json()["warning"] is None
        finally:
            with_heads.stop()


def test_openapi_document(web: RunningServer) -> None:
    """Valid JSON, OpenAPI 3.1, both endpoints with their parameters and error schema, and every
    ``$ref`` resolves."""
    response = requests.get(f"{web.url}/api/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/api/anonymise", "/api/cover"):
        operation = doc["paths"][path]["post"]
        assert {p["name"] for p in operation["parameters"]} >= {"format", "style", "skin_tone"}
        assert "multipart/form-data" in operation["requestBody"]["content"]
        for status in ("200", "400", "413", "415", "422", "503"):
            assert status in operation["responses"]
    assert "regions" in doc["paths"]["/api/cover"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(doc["components"]["schemas"]["Error"]["required"]) == {"error", "message"}

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref


# --------------------------------------------------------------------------- concurrency


def test_burst_queues_or_gets_503_and_never_crashes(astronaut_jpeg: bytes) -> None:
    """One at a time, a queue of one: of a burst of 10 simultaneous uploads some are refused
    with 503 and Retry-After before their body is read, every accepted one succeeds, no two
    anonymisations ever overlap, and the server keeps serving."""
    locator = SlowLocator(delay=0.4)
    anonymiser = Anonymiser(Settings(safeguard=False, residual_pass=False), locators=[locator])
    web = start_server(anonymiser, max_concurrent=1, queue=1)
    try:
        barrier = threading.Barrier(10)
        results: list[requests.Response | BaseException] = []
        lock = threading.Lock()

        def upload() -> None:
            barrier.wait()
            try:
                response: requests.Response | BaseException = post(web, "/api/anonymise", astronaut_jpeg)
            except BaseException as exc:  # noqa: BLE001 - recorded and asserted on below
                response = exc
            with lock:
                results.append(response)

        threads = [threading.Thread(target=upload) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(isinstance(r, requests.Response) for r in results), results
        statuses = sorted(r.status_code for r in results)  # type: ignore[union-attr]
        assert set(statuses) == {200, 503}, statuses
        for response in results:
            assert isinstance(response, requests.Response)
            if response.status_code == 503:
                assert response.headers["Retry-After"].isdigit()
                assert response.json()["error"] == "busy"
            else:
                assert response.content[:3] == b"\xff\xd8\xff" and response.headers["X-Heads-Covered"] == "1"
        assert locator.most_at_once == 1
        deadline = time.monotonic() + 5  # the last handler may still be leaving the gate
        while web.app.gate.admitted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert web.app.gate.admitted == 0
        assert post(web, "/api/anonymise", astronaut_jpeg).status_code == 200
    finally:
        web.stop()


# --------------------------------------------------------------------------- multipart parser


def test_multipart_parser_keeps_binary_data_exactly() -> None:
    """CR, LF, boundary-like bytes and NULs inside a part survive; quoted boundaries, a preamble,
    transport padding and an epilogue are handled; file names are not kept."""
    payload = b"\r\n--notquite\r\n\x00\xff\r\n\r\n--xyz" + bytes(range(256))
    body = (b"preamble\r\n--bq\r\n" +
            b'Content-Disposition: form-data; name="file"; filename="me.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' +
            payload + b"\r\n--bq  \r\n" +
            b'Content-Disposition: form-data; name="regions"\r\n\r\n[[1,2,3,4]]\r\n--bq--\r\nepilogue')
    parts = mp.parse(body, 'multipart/form-data; boundary="bq"')
    assert parts["file"].data == payload and parts["file"].is_file and parts["file"].content_type == "image/jpeg"
    assert "me.jpg" not in repr(parts["file"])
    assert parts["regions"].text() == "[[1,2,3,4]]" and not parts["regions"].is_file


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--b--", "text/plain", "not multipart"),
        (b"x", "multipart/form-data", "boundary is missing"),
        (b"nothing here", "multipart/form-data; boundary=b", "does not contain"),
        (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx", "multipart/form-data; boundary=b", "truncated"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "no Content-Disposition"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "no field name"),
        (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\nx\r\n--b--",
         "multipart/form-data; boundary=b", "too long"),
        (b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(17)) + b"--b--",
         "multipart/form-data; boundary=b", "more than 16"),
        # the standard library parses parameters in time growing with the square of the length
        (b"--b--", 'multipart/form-data; boundary=b; x="' + ";" * 2000, "longer than 1,024"),
        # ...and so would each part's Content-Disposition (17 parts of 8 KB cost 1.2 s a request)
        (b'--b\r\nContent-Disposition: form-data; name="f"; x="' + b";" * 2000 + b'"\r\n\r\nv\r\n--b--', "multipart/form-data; boundary=b",
         "Content-Disposition is longer than 1,024"),
    ],
    ids=["not-multipart", "no-boundary", "no-delimiter", "truncated", "no-disposition", "no-name", "long-headers", "many-parts",
         "long-content-type", "long-disposition"],
)
def test_multipart_parser_refuses(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(mp.MultipartError, match=message.replace(" ", ".")):
        mp.parse(body, content_type)


# --------------------------------------------------------------------------- protocol edges


def test_expect_continue_gets_413_instead_of_100(web: RunningServer) -> None:
    """curl asks 'Expect: 100-continue' before uploading: an oversized upload is refused at
    once, so the body is never sent; an acceptable one is invited with 100 Continue."""
    def head(length: int) -> bytes:
        return (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n"
                "Expect: 100-continue\r\n\r\n").encode()

    response = raw_exchange(web.port, head(10**10))
    assert response.status == 413 and json.loads(response.body)["error"] == "request_too_large"
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(head(1000))
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")


def test_garbage_and_odd_requests_get_json_errors(web: RunningServer) -> None:
    """What the base HTTP server refuses itself is answered in JSON with the security headers;
    a GET with a body, an overlong form field and unknown methods are refused cleanly."""
    response = raw_exchange(web.port, b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n")
    assert response.status == 431 and json.loads(response.body)["error"] == "request_header_fields_too_large"
    assert response.headers["content-security-policy"] == CSP
    response = raw_exchange(web.port, f"BREW /api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
    assert response.status == 501 and "error" in json.loads(response.body)
    response = requests.get(f"{web.url}/api/health", data=b"surprise", timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "unexpected_body"
    response = post(web, "/api/anonymise", b"\xff\xd8\xff", fields={"style": "x" * 1000})
    assert response.status_code == 400 and response.json()["error"] == "bad_multipart"
    assert requests.get(f"{web.url}/api/health", timeout=10).status_code == 200



# --------------------------------------------------------------------------- slow and many clients


@pytest.fixture()
def quick_server() -> Iterator[RunningServer]:
    """A server without models (one at a time, no queue), for tests of the connection handling."""
    anonymiser = Anonymiser(Settings(safeguard=False, residual_pass=False), locators=[SlowLocator(delay=0.0)])
    web = start_server(anonymiser, max_concurrent=1, queue=0)
    yield web
    web.stop()


def trickle(sock: socket.socket, head: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """Send ``head``, then one more byte every ``every`` seconds until ``stop`` (or an error)."""
    def run() -> None:
        try:
            sock.sendall(head)
            while not stop.wait(every):
                sock.sendall(b"a")
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _noise_png(width: int, height: int) -> bytes:
    """A photo the encoder cannot shrink: its answer is megabytes."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _read_slowly(sock: socket.socket, rate: float, stop_after_s: float) -> bytes:
    """What arrives on ``sock`` read at about ``rate`` bytes per second, until it closes."""
    got = bytearray()
    started = time.monotonic()
    while time.monotonic() - started < stop_after_s:
        piece = sock.recv(8192)
        if not piece:
            break
        got += piece
        time.sleep(max(0.0, len(got) / rate - (time.monotonic() - started)))
    return bytes(got)


def test_a_slow_but_steady_reader_gets_the_whole_answer(quick_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer used to go out in one ``sendall``, which had to finish within the idle
    timeout: a client on a slow link got a cut-off 200. Each piece now has the timeout, and the
    whole answer time in proportion to its size (here: idle timeout 1 s, an answer of a few MB
    read at 600 KB/s)."""
    from anonymiser.web import deadline_reader, server

    monkeypatch.setattr(deadline_reader, "SOCKET_TIMEOUT_S", 1.0)
    monkeypatch.setattr(server, "SOCKET_TIMEOUT_S", 1.0)
    monkeypatch.setattr(server.Handler, "timeout", 1.0)
    body, content_type = multipart({"file": ("a.png", _noise_png(1400, 1000), "image/png")})
    head = (f"POST /api/anonymise?format=image HTTP/1.1\r\nHost: 127.0.0.1:{quick_server.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connecting: a small window
        sock.settimeout(30)
        sock.connect(("127.0.0.1", quick_server.port))
        sock.sendall(head + body)
        answer = _read_slowly(sock, 600_000, 60)
    headers, _, payload = answer.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"Content-Length: (\d+)", headers).group(1))
    assert length > 2_000_000, "an answer larger than the socket buffers hold"
    assert len(payload) == length, "the whole answer arrived"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_trickled_body_is_cut_off_at_the_deadline(quick_server: RunningServer, astronaut_jpeg: bytes,
                                                    monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    """A byte every 0.2 s never trips the idle timeout; the body deadline still ends the upload
    with a 408 and frees its place. (A buffered read used to wait for the whole body, so the
    deadline was only looked at after it: ten such uploads held every place for ever.)"""
    from anonymiser.web import server

    monkeypatch.setattr(server, "BODY_DEADLINE_S", 1.5)
    web = quick_server
    framing = "Transfer-Encoding: chunked\r\n\r\n3e8\r\n" if chunked else "Content-Length: 1000\r\n\r\n"
    head = (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\n{framing}").encode()
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sender = trickle(sock, head, 0.2, stop)
        try:
            started = time.monotonic()
            response = read_response(sock, timeout=8)
            assert time.monotonic() - started < 5
        finally:
            stop.set()
            sender.join(timeout=5)
    assert response.status == 408 and json.loads(response.body)["error"] == "request_timeout"
    assert response.headers["connection"] == "close"
    assert web.app.gate.admitted == 0
    assert post(web, "/api/anonymise", astronaut_jpeg).status_code == 200  # its place is free again


def test_slow_uploads_do_not_keep_other_uploads_out(quick_server: RunningServer, astronaut_jpeg: bytes) -> None:
    """A place in the queue was taken before the body was read: with one place, a single client
    trickling a byte at a time refused every other upload for two minutes (ten of them did on
    the default server). Now a body holds only the bytes it has sent, and the place is taken
    once it is in."""
    web = quick_server
    head = (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n").encode()
    stop = threading.Event()
    sockets = [socket.create_connection(("127.0.0.1", web.port), timeout=10) for _ in range(3)]
    senders = [trickle(sock, head, 0.2, stop) for sock in sockets]
    try:
        time.sleep(1.0)  # all three are sending their bodies
        assert 0 < web.app.bodies.held < 100, "only the bytes sent so far are held"
        assert post(web, "/api/anonymise", astronaut_jpeg).status_code == 200
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
        for sender in senders:
            sender.join(timeout=5)
    deadline = time.monotonic() + 5
    while web.app.bodies.held and time.monotonic() < deadline:  # their handlers are leaving
        time.sleep(0.02)
    assert web.app.bodies.held == 0 and web.app.gate.admitted == 0


def test_the_body_budget_refuses_what_would_pass_it() -> None:
    """Bodies in memory stay within the budget, whatever their number: a piece that would pass
    it is refused (Busy), and every byte comes back when its request ends."""
    budget = BodyBudget(100)
    with budget.hold() as first:
        first(60)
        with budget.hold() as second:
            second(40)
            with pytest.raises(Busy):
                second(1)
            assert budget.held == 100
        assert budget.held == 60
        with pytest.raises(Busy):
            first(41)
    assert budget.held == 0


def test_trickled_headers_are_cut_off_at_the_deadline(quick_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers sent a byte at a time keep no connection (and its thread) for ever."""
    from anonymiser.web import server

    monkeypatch.setattr(server, "HEADER_DEADLINE_S", 1.5)
    web = quick_server
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sender = trickle(sock, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nX-Slow: ".encode(), 0.2, stop)
        try:
            started = time.monotonic()
            sock.settimeout(8)
            try:
                closed = sock.recv(100) == b""
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                closed = False
            assert closed and time.monotonic() - started < 5, "the connection was kept open"
        finally:
            stop.set()
            sender.join(timeout=5)
    assert requests.get(f"{web.url}/api/health", timeout=10).status_code == 200


def test_the_header_section_is_bounded_in_all(quick_server: RunningServer) -> None:
    """Each header line within the standard library's 64 KiB, but 320 KiB of them in all: 431.
    (Otherwise every connection could hold 100 lines of 64 KiB while they trickle in.)"""
    web = quick_server
    lines = "".join(f"X-Pad-{i}: {'a' * 16_000}\r\n" for i in range(20))
    response = raw_exchange(web.port, f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n{lines}\r\n".encode())
    assert response.status == 431 and json.loads(response.body)["error"] == "request_header_fields_too_large"
    assert response.headers["content-security-policy"] == CSP
    # ordinary headers, a few kB of cookies included, still pass
    response = raw_exchange(web.port, (f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                                       f"Cookie: {'c' * 8000}\r\nConnection: close\r\n\r\n").encode())
    assert response.status == 200


def test_connections_beyond_the_bound_get_503_at_once(quick_server: RunningServer) -> None:
    """Idle connections fill the bound; one more is answered 503 with Retry-After without
    waiting; once they close, requests are served again."""
    web = quick_server
    web.server.max_connections = 4
    idle = [socket.create_connection(("127.0.0.1", web.port), timeout=10) for _ in range(4)]
    try:
        for sock in idle:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # and the rest never comes
        time.sleep(0.5)  # all four accepted
        started = time.monotonic()
        response = raw_exchange(web.port, f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode(), timeout=5)
        assert time.monotonic() - started < 3
        assert response.status == 503 and response.headers["retry-after"].isdigit()
        assert json.loads(response.body)["error"] == "busy"
        assert response.headers["content-security-policy"] == CSP
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while web.server.connections and time.monotonic() < deadline:  # their threads are leaving
        time.sleep(0.02)
    assert requests.get(f"{web.url}/api/health", timeout=10).status_code == 200


def test_an_escaped_error_is_logged_without_the_client_address(quick_server: RunningServer, capsys: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """What escapes a handler (say the client left before its error answer) is one log line
    with the exception's type: the base class printed the client's address and a traceback."""
    try:
        raise BrokenPipeError("secret-person-name-2024.jpg")
    except BrokenPipeError:
        with caplog.at_level(logging.INFO, logger="anonymiser.web"):
            quick_server.server.handle_error(None, ("10.9.8.7", 4242))
    printed = capsys.readouterr()
    logged = printed.out + printed.err + caplog.text
    assert "10.9.8.7" not in logged and "secret" not in logged and "Traceback" not in logged
    assert '{"client_gone": "BrokenPipeError"}' in caplog.text  # a client that left: no internal error
    caplog.clear()
    try:
        raise KeyError("secret-person-name-2024.jpg")
    except KeyError:
        with caplog.at_level(logging.INFO, logger="anonymiser.web"):
            quick_server.server.handle_error(None, ("10.9.8.7", 4242))
    assert caplog.text.strip().endswith('{"internal_error": "KeyError"}') and "secret" not in caplog.text


def test_deeply_nested_regions_are_a_400_not_a_500() -> None:
    with pytest.raises(HttpError) as caught:
        parse_regions("[" * 100_000 + "]" * 100_000)
    assert caught.value.status == 400 and caught.value.code == "bad_regions"


def test_serve_command_line_checks() -> None:
    """Bad numbers are refused before anything loads; a non-loopback host gets a loud warning."""
    from anonymiser.web.server import exposure_warning, is_loopback, main

    assert main(["--max-concurrent", "0"]) == 2
    assert main(["--queue", "-1"]) == 2
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
    assert exposure_warning("127.0.0.1") is None
    warning = exposure_warning("0.0.0.0")
    assert warning and "WARNING" in warning and "unencrypted" in warning


def test_a_coordinate_too_long_for_a_float_is_a_400_not_a_500() -> None:
    """JSON integers have no size limit; one past a float's range made ``math.isfinite`` raise
    OverflowError, which the server answered as an internal error."""
    with pytest.raises(HttpError) as caught:
        parse_regions("[[" + "9" * 400 + ", 0, 10, 10]]")
    assert caught.value.status == 400 and caught.value.code == "bad_regions"


def test_fractional_region_edges_round_outwards() -> None:
    """A pixel half inside a given box is covered: rounding to the nearest (halves to even)
    moved edges inwards and left a half-covered row and column untouched."""
    assert parse_regions("[[11.5, 11.5, 20.5, 20.5], [3, 4, 5.0, 6]]") == [(11, 11, 21, 21), (3, 4, 5, 6)]


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused_before_anything_loads(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    """bind() raises OverflowError, not OSError, for such a port: after loading every model the
    command died with a traceback instead of saying what was wrong."""
    from anonymiser.web.server import main

    assert main(["--port", port]) == 2
    assert "--port" in capsys.readouterr().err


def test_a_target_or_origin_that_is_not_a_url_gets_an_answer(web: RunningServer) -> None:
    """urlsplit raises ValueError on a broken IPv6 address: an absolute-form target such as
    'http://[::1/api/health' got no answer at all (the connection was dropped), and such an
    Origin a 500 internal_error."""
    response = raw_exchange(web.port, f"GET http://[::1/api/health HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
    assert response.status == 400 and json.loads(response.body)["error"] == "bad_request_target"
    response = raw_exchange(web.port, (f"POST http://[::1/api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                                       "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999\r\n"
                                       "Expect: 100-continue\r\n\r\n").encode())
    assert response.status == 413
    response = raw_exchange(web.port, (f"POST /api/anonymise HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                                       "Origin: http://[::1\r\nContent-Length: 0\r\n\r\n").encode())
    assert response.status == 403 and json.loads(response.body)["error"] == "forbidden_origin"
    assert requests.get(f"{web.url}/api/health", timeout=10).status_code == 200
