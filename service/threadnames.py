"""The service's threads named for the operating system, so that ``top -H``, ``py-spy`` and
``/proc/PID/task/TID/comm`` tell them apart (``ssd bench frontend`` counts CPU by them). Python
names its threads for itself only. Linux keeps 15 bytes; a thread a named one creates inherits
the name, so ONNX Runtime's own pool, made when a session is created, carries its loader's."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable
from functools import cache

DECODE = "ssd-decode"
INFERENCE = "ssd-inference"
ONNXRUNTIME = "ssd-onnxruntime"  # the thread that loads sessions, and the session's pool
LOG = "ssd-log"  # writes the log's lines (service/logs.py)
_PR_SET_NAME = 15


@cache
def _prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_this_thread(name: str) -> None:
    """Name the calling thread (Linux; elsewhere nothing happens)."""
    prctl = _prctl()
    if prctl is not None:
        with contextlib.suppress(OSError):
            prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def name_inference_thread() -> None:
    name_this_thread(INFERENCE)
