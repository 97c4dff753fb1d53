"""What the server process does while it is attacked, read from /proc (Linux): its memory and the
processes it starts."""

from __future__ import annotations

import os
import signal
import threading
from types import TracebackType


def proc_status(pid: int, name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live process whose parent is ``pid``. Scanning /proc, not
    /proc/PID/task/*/children, which needs a kernel option some machines lack."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the parent pid follows the last ")".
        name, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append((int(entry), name))
    return found


class Watch:
    """While the block runs, samples the server's resident memory and the processes it starts.

    A decoder that shells out (Pillow's EPS plugin runs ``gs``) may start and end a child within
    one request, so children are sampled during the attack, not only looked for afterwards."""

    def __init__(self, pid: int | None, every: float = 0.005) -> None:
        self.pid, self.every = pid, every
        self.peak_rss = proc_status(pid, "VmRSS") if pid else None
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        assert self.pid is not None
        rss = proc_status(self.pid, "VmRSS")
        if rss is not None and (self.peak_rss is None or rss > self.peak_rss):
            self.peak_rss = rss
        for child, name in children(self.pid):
            self.seen.setdefault(child, name)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> Watch:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.pid:
            self._stop.set()
            self._thread.join()
            self._sample()

    def child_problems(self) -> list[str]:
        """What the server started, if anything. A Ghostscript still running (a PostScript loop
        spins for ever) is killed by its pid, or it would outlive the server."""
        if not self.seen:
            return []
        for child, name in self.seen.items():
            if name.startswith("gs") and (child, name) in children(self.pid or -1):
                os.kill(child, signal.SIGKILL)
        listed = ", ".join(f"{name} (pid {child})" for child, name in sorted(self.seen.items()))
        return [f"the server started child processes: {listed}"]
