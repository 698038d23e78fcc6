"""A small, bounded ``multipart/form-data`` parser for a body already held in memory.

The standard library's ``cgi`` module is gone in Python 3.13 and ``email.parser`` rewrites line
endings in text parts, so the server uses this parser instead. It never touches the disk, it
never decodes a part's content, and every count and size it accepts is bounded: the body itself
was size-checked (``Content-Length`` against the byte budget) before it was read.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

#: at most this many parts per request (a file and a few small fields)
MAX_PARTS = 16
#: at most this many bytes of headers per part
MAX_PART_HEADER_BYTES = 8 * 1024
#: boundaries longer than RFC 2046's 70 characters are refused
MAX_BOUNDARY = 70
#: a form's Content-Type is "multipart/form-data; boundary=..." (about 100 characters). The
#: standard library's parameter parser takes time growing with the square of a header's length
#: (a 60 KB one with an open quote and many ";" cost 3 s of CPU per parse): longer is refused
#: before it is parsed
MAX_CONTENT_TYPE = 1024
#: ...and so is each part's Content-Disposition (``form-data; name="file"; filename="..."``, a
#: file name being at most 255 bytes on common file systems), parsed by the same code twice per
#: part: 17 parts of 8 KB each cost 1.2 s of CPU per request
MAX_DISPOSITION = 1024


class MultipartError(ValueError):
    """The body is not well-formed ``multipart/form-data`` (or breaks one of our bounds)."""

    code = "bad_multipart"


@dataclass(frozen=True)
class Part:
    """One form field: its name, the declared content type and the raw bytes.

    The file name a browser sends is deliberately not kept: the server never needs it and must
    never log it.
    """

    name: str
    content_type: str
    data: bytes
    is_file: bool

    def text(self, limit: int = 64 * 1024) -> str:
        """The content as UTF-8 text, refusing anything longer than ``limit`` bytes."""
        if len(self.data) > limit:
            raise MultipartError(f"The field {self.name!r} is longer than {limit:,} bytes.")
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"The field {self.name!r} is not UTF-8 text.") from None


def _header_params(name: str, value: str) -> Message:
    """A ``Message`` holding one header, so that ``get_param`` can parse its (quoted) params."""
    message = Message()
    message[name] = value
    return message


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type header, or a ``MultipartError``."""
    if not content_type:
        raise MultipartError("The request has no Content-Type; send multipart/form-data.")
    if len(content_type) > MAX_CONTENT_TYPE:
        raise MultipartError(f"The Content-Type header is longer than {MAX_CONTENT_TYPE:,} characters.")
    message = _header_params("Content-Type", content_type)
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError(
            f"The request is {message.get_content_type()}, not multipart/form-data; "
            "send the image as a form field named 'file'."
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise MultipartError("The multipart boundary is missing or longer than 70 characters.")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("The multipart boundary is not ASCII.") from None


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        key, sep, value = line.partition(b":")
        if not sep or not key.strip():
            raise MultipartError("A multipart part has a malformed header line.")
        # Header values in form-data are ASCII or UTF-8 (file names); latin-1 never fails and we
        # only read ASCII parameters from them.
        headers[key.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


def parse(body: bytes | bytearray, content_type: str | None) -> dict[str, Part]:
    """Split ``body`` into its parts, keyed by field name.

    A field name that appears twice is refused (one image per request keeps the contract and
    the memory bound simple). Parts without ``Content-Disposition: form-data; name=...`` are
    refused too.
    """
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    view = memoryview(body)
    position = body.find(delimiter)
    if position < 0:
        raise MultipartError("The body does not contain the multipart boundary.")
    # Only a preamble may precede the first delimiter, and it must end at a line break.
    if position != 0 and body[position - 2 : position] != b"\r\n":
        raise MultipartError("The first multipart boundary does not start a line.")
    position += len(delimiter)
    parts: dict[str, Part] = {}
    while True:
        if body[position : position + 2] == b"--":
            return parts  # close delimiter; an epilogue after it is ignored
        line_end = body.find(b"\r\n", position)
        # RFC 2046 allows linear white space after a delimiter ("transport padding").
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MultipartError("A multipart boundary is not followed by a line break.")
        header_start = line_end + 2
        if body[header_start : header_start + 2] == b"\r\n":
            header_end, content_start = header_start, header_start + 2
        else:
            header_end = body.find(b"\r\n\r\n", header_start, header_start + MAX_PART_HEADER_BYTES + 4)
            if header_end < 0:
                raise MultipartError("A multipart part's headers are missing their end or too long.")
            content_start = header_end + 4
        content_end = body.find(b"\r\n" + delimiter, content_start)
        if content_end < 0:
            raise MultipartError("The multipart body is truncated (no closing boundary).")
        headers = _parse_headers(bytes(view[header_start:header_end]))
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise MultipartError("A multipart part has no Content-Disposition header.")
        if len(disposition) > MAX_DISPOSITION:
            raise MultipartError(f"A part's Content-Disposition is longer than {MAX_DISPOSITION:,} characters.")
        params = _header_params("Content-Disposition", disposition)
        name = params.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise MultipartError("A multipart part has no field name.")
        if disposition.split(";", 1)[0].strip().lower() != "form-data":
            raise MultipartError("A multipart part is not form-data.")
        if name in parts:
            raise MultipartError(f"The field {name!r} appears more than once; send one image per request.")
        if len(parts) >= MAX_PARTS:
            raise MultipartError(f"The form has more than {MAX_PARTS} fields.")
        is_file = params.get_param("filename", header="content-disposition") is not None
        parts[name] = Part(
            name=name,
            content_type=headers.get("content-type", "application/octet-stream" if is_file else "text/plain"),
            data=bytes(view[content_start:content_end]),
            is_file=is_file,
        )
        position = content_end + 2 + len(delimiter)
