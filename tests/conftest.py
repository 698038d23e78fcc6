"""Fixtures shared by the image-core tests; the helpers live in ``imaging.py``.

The helpers are in a module of their own name because ``tests/web`` and ``tests/bot`` have
their own ``conftest.py``, and a bare ``from conftest import ...`` would pick whichever was
imported first.
"""

import os

# A developer's own .env in this checkout must not change what the tests see: importing the
# Celery tasks module (some tests do, in this process) would read it into os.environ.
os.environ["BOT_ENV_FILE"] = ""

from imaging import *  # noqa: E402,F401,F403 - re-exports the fixtures defined there
