"""Keep freed memory in the process on Linux, so that each training step does not fault it in again.

glibc's malloc serves large blocks (a batch's activations) with mmap and gives them back to the
kernel when freed; the next step maps them again and the kernel zeroes every page on first touch.
On this project's 2-core CPU machine that kernel time was more than half of an SSDlite training
step: 6.2 s per batch of 32 before, 2.2 s after (docs/benchmarks.md). Telling malloc never to use
mmap and never to trim the heap makes freed blocks reusable as they are. The cost: the process
keeps its peak memory until it exits, which a training run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; returns False (and changes nothing) where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not ok:
        log.debug("mallopt refused the settings; memory is managed as by default")
    return ok
