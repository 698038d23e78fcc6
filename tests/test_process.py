"""Process hygiene: no core dumps from processes that hold originals."""

from __future__ import annotations

import subprocess
import sys

from imaging import REPO

PROBE = r"""
import ctypes, os, resource
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
libc = ctypes.CDLL(None)
before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
from anonymiser.process import forbid_core_dumps
forbid_core_dumps()
r, w = os.pipe()
if os.fork() == 0:  # a prefork child
    os.write(w, f"{libc.prctl(3, 0, 0, 0, 0)} {resource.getrlimit(resource.RLIMIT_CORE)}".encode())
    os._exit(0)
os.wait()
print(before, libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE), "|", os.read(r, 100).decode())
"""


def test_forbid_core_dumps_clears_the_limit_and_the_dumpable_flag_for_children_too() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "0", "(0,", "0)", "|", "0", "(0,", "0)"], out
