"""Fixtures of the web server tests: one in-process server with CenterFace for the session and
the astronaut as upload-ready files."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

from anonymiser.pipeline import Anonymiser

from web_harness import RunningServer, jpeg_with_metadata, png_bytes, start_server


@pytest.fixture(scope="session")
def web(cf_anonymiser: Anonymiser) -> Iterator[RunningServer]:
    """The web server around the session's CenterFace anonymiser (2 at once, queue of 8)."""
    running = start_server(cf_anonymiser)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def astronaut_jpeg(astronaut: np.ndarray) -> bytes:
    """The 512x512 astronaut as a camera-like JPEG with EXIF (make, GPS) and a comment."""
    return jpeg_with_metadata(astronaut)


@pytest.fixture(scope="session")
def astronaut_png(astronaut: np.ndarray) -> bytes:
    """The 512x512 astronaut as a PNG with a text chunk: output stays PNG, so pixels are exact."""
    return png_bytes(astronaut)
