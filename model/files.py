"""Files written whole or not at all: ``staged(path)`` gives a temporary path beside ``path`` to
write, then renames it over ``path`` (readers, the service's poller among them, never see half a
file). Checkpoints, ONNX exports and ``ssd promote`` all write so.

A process killed mid-write leaves its temporary file (``.NAME.XXXXXXXX.tmp``) behind: an ``ssd
promote`` killed mid-copy left 1.3 and 3.5 MB on the model volume for good. The next write to the
same path removes those older than ``STALE_AFTER_S`` (a live writer's file is younger: the
slowest, an export, verifies its file for about a minute after writing it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 600.0


def temporaries(path: Path) -> list[Path]:
    """The temporary files of writes to ``path``, by the pattern ``staged`` names them."""
    try:
        return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if p.is_file())
    except OSError:
        return []


def remove_stale(path: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files that interrupted writes to ``path`` left (unchanged for
    ``older_than_s``); the ones removed."""
    removed = []
    now = time.time()
    for tmp in temporaries(path):
        try:
            if now - tmp.stat().st_mtime < older_than_s:
                continue
            tmp.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        log.warning("removed %s, left by an interrupted write to %s", tmp, path.name)
        removed.append(tmp)
    return removed


@contextmanager
def staged(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the block ends, it is
    flushed to disk and renamed over ``path``, or removed if the block raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
