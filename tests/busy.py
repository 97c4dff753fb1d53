"""Run a command beside a CPU-bound process on every core the command may use: the suite as on a
busy machine (docs/testing.md). Its exit status is the command's.

    python tests/busy.py [--hogs N] COMMAND ...
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys


def _spin() -> None:
    while True:
        pass


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--hogs", type=int, default=cores, help="default: one per core")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("no command given")
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    try:
        return subprocess.call(args.command)
    finally:
        for hog in hogs:
            hog.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
