"""Process hygiene for everything that holds originals in memory (bot workers, the web page).

A core dump is the process's memory written to disk, the photos it was anonymising included.
Docker's daemon and many systemd services allow dumps of any size, and systemd-coredump keeps
them, so a crash in a native library (a decoder, ONNX Runtime, CUDA) would leave originals on
the host's disk.
"""

from __future__ import annotations

import ctypes
import resource
import sys

_PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """No core file, and no dump through a pipe handler either, for this process and its children.

    ``RLIMIT_CORE`` 0 stops the kernel writing a ``core`` file. A ``core_pattern`` that pipes to a
    handler (systemd-coredump, apport) ignores that limit, but not the process's "dumpable" flag,
    which ``prctl(PR_SET_DUMPABLE, 0)`` clears (Linux; inherited by forked children, such as
    Celery's prefork pool).
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
