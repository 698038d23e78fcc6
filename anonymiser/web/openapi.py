"""The OpenAPI 3.1 description of the local web server's HTTP API (``GET /api/openapi.json``)."""

from __future__ import annotations

from typing import Any

from .. import emoji
from ..cover import STYLES
from ..limits import Limits

#: status codes an API call can answer with, and what they mean here
ERROR_RESPONSES: dict[str, str] = {
    "400": "Malformed request: broken multipart body, no 'file' field, a bad parameter or bad regions, a target "
           "that is not a URL, a chunk size that is not hex digits, or both Content-Length and Transfer-Encoding.",
    "403": "The request came from another web site (Origin) or named another host (Host).",
    "405": "Wrong method.",
    "408": "The body was not received in time.",
    "411": "No Content-Length (and not chunked).",
    "413": "The request or the image is larger than the limits: refused from Content-Length before the body is read, a chunked body as soon as it passes the limit, an image over the pixel limit once it is read.",
    "415": "Not a supported image (SVG, PDF, video, HTML, random bytes...), or the request is not multipart/form-data.",
    "422": "An image that cannot be used: empty, truncated or damaged, animated, or its result too large.",
    "431": "More than 64 KiB of request headers.",
    "500": "A fault in the server; the photo was not kept.",
    "501": "A transfer encoding other than chunked.",
    "503": "The server is busy: too many photos are being processed or waiting. Retry after Retry-After seconds.",
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _options(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The multipart request body: the image plus optional fields (same as the query parameters)."""
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "The image (JPEG, PNG, WebP, HEIC/HEIF, AVIF or still GIF). Its format is "
            "sniffed from its bytes; the file name and declared type are ignored.",
        },
        "style": {"$ref": "#/components/schemas/Style"},
        "skin_tone": {"$ref": "#/components/schemas/SkinTone"},
        "format": {"$ref": "#/components/schemas/Format"},
    }
    properties.update(extra or {})
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file", *((extra or {}).keys())], "properties": properties},
                "encoding": {"file": {"contentType": "image/*, application/octet-stream"}},
            }
        },
    }


def _parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "format",
            "in": "query",
            "required": False,
            "description": "'json' for the JSON form (report + base64 image + regions); 'image' for the "
            "bare image. Without it, 'Accept: application/json' also selects the JSON form.",
            "schema": {"$ref": "#/components/schemas/Format"},
        },
        {"name": "style", "in": "query", "required": False, "schema": {"$ref": "#/components/schemas/Style"}},
        {"name": "skin_tone", "in": "query", "required": False, "schema": {"$ref": "#/components/schemas/SkinTone"}},
        {
            "name": "Accept",
            "in": "header",
            "required": False,
            "description": "application/json selects the JSON form when 'format' is not given.",
            "schema": {"type": "string"},
        },
    ]


def _image_responses(summary: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": summary,
            "headers": {
                "X-Heads-Covered": {"description": "Number of heads covered.", "schema": {"type": "integer"}},
            },
            "content": {
                "image/jpeg": {"schema": {"type": "string", "contentMediaType": "image/jpeg"}},
                "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
            },
        }
    }
    for status, description in ERROR_RESPONSES.items():
        responses[status] = _error_response(description)
    responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    return responses


def document(limits: Limits, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server running with ``limits``."""
    box = {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
           "description": "[x1, y1, x2, y2) in output pixels (x2 and y2 exclusive)."}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Protest photo anonymiser (local)",
            "version": version,
            "description": "Covers every head in a photo with an opaque raised fist and strips all metadata. "
            "Runs on the person's own computer; images are processed in memory and never stored or logged. "
            f"Requests larger than {limits.max_input_bytes:,} bytes (plus a small allowance for the form) "
            "are refused before they are read.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": {
            "/api/anonymise": {
                "post": {
                    "operationId": "anonymise",
                    "summary": "Cover every head found in one image.",
                    "parameters": _parameters(),
                    "requestBody": _options(),
                    "responses": _image_responses("The anonymised image, or its JSON form."),
                }
            },
            "/api/cover": {
                "post": {
                    "operationId": "cover",
                    "summary": "Cover exactly the given regions of one image (after a person reviewed them).",
                    "description": "Send the ORIGINAL image again with the final list of regions (automatic ones "
                    "kept, missed heads added) in the output pixels that /api/anonymise reported. No detector "
                    "runs; every region is painted with the same opaque style.",
                    "parameters": _parameters(),
                    "requestBody": _options(
                        {
                            "regions": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"type": "array", "items": box, "maxItems": 10000},
                                "description": "JSON array of [x1, y1, x2, y2] boxes.",
                            }
                        }
                    ),
                    "responses": _image_responses("The image with exactly those regions covered."),
                }
            },
            "/api/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness, the locators in use, the defaults and the limits.",
                    "responses": {
                        "200": {
                            "description": "The server is up.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        }
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                }
            },
        },
        "components": {
            "schemas": {
                "Style": {"type": "string", "enum": list(STYLES)},
                "SkinTone": {"type": "string", "enum": list(emoji.SKIN_TONES)},
                "Format": {"type": "string", "enum": ["image", "json"]},
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string", "description": "Stable machine-readable code, e.g. "
                                  "unsupported_image, corrupt_image, empty_image, animated_image, image_too_large, "
                                  "request_too_large, not_multipart, missing_file, bad_multipart, bad_regions, bad_parameter, busy."},
                        "message": {"type": "string", "description": "A sentence for people."},
                    },
                },
                "Region": {
                    "type": "object",
                    "required": ["box", "sources"],
                    "properties": {
                        "box": box,
                        "sources": {"type": "array", "items": {"type": "string"},
                                    "description": "Locators, 'safeguard', 'residual' or 'manual'."},
                    },
                },
                "Result": {
                    "type": "object",
                    "required": ["image", "mime", "report", "regions", "heads_covered", "width", "height"],
                    "properties": {
                        "image": {"type": "string", "contentEncoding": "base64"},
                        "mime": {"type": "string", "enum": ["image/jpeg", "image/png"]},
                        "heads_covered": {"type": "integer"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "regions": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
                        "report": {"type": "object", "description": "The anonymiser's report (no pixels, no file name)."},
                    },
                },
                "Health": {
                    "type": "object",
                    "properties": {
                        "status": {"const": "ok"},
                        "locators": {"type": "array", "items": {"type": "string"}},
                        "style": {"$ref": "#/components/schemas/Style"},
                        "skin_tone": {"$ref": "#/components/schemas/SkinTone"},
                        "styles": {"type": "array", "items": {"type": "string"}},
                        "skin_tones": {"type": "array", "items": {"type": "string"}},
                        "max_input_bytes": {"type": "integer"},
                        "max_request_bytes": {"type": "integer"},
                        "max_concurrent": {"type": "integer"},
                        "warning": {
                            "type": ["string", "null"],
                            "description": "Set when no locator finds heads that show no face (CenterFace alone).",
                        },
                    },
                },
            }
        },
    }
