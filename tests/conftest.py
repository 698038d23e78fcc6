"""Fixtures shared by the image-core tests; the helpers live in ``imaging.py``.

The helpers are in a module of their own name because ``tests/web`` and ``tests/bot`` have
their own ``conftest.py``, and a bare ``from conftest import ...`` would pick whichever was
imported first.
"""

from imaging import *  # noqa: F401,F403 - re-exports the fixtures defined there
