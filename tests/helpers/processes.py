"""Processes the tests start, and how a test tells whether one still lives."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from helpers.paths import HOG
from helpers.waiting import wait_for

MB = 1024 * 1024


def pid_alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def is_hog(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return HOG.encode() in f.read()
    except OSError:
        return False


class Spawned:
    """A process group this test started: leader pid == pgid."""

    def __init__(self, proc: subprocess.Popen, ready: Path | None):
        self.proc = proc
        self.pid = self.pgid = proc.pid
        self.ready = ready

    def wait_ready(self, timeout: float = 30.0) -> list[int]:
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, timeout, what=f"{self.ready}")
        assert self.proc.poll() is None, f"hog exited early with {self.proc.returncode}"
        text = self.ready.read_text().split()
        return [int(x) for x in text]

    def kill(self) -> None:
        """Clean up only what this test started: the group, and pids it reported."""
        pids = []
        if self.ready and self.ready.exists():
            pids = [int(x) for x in self.ready.read_text().split()]
        if self.ready:  # grandchildren (--setsid-grandchild) are listed in their parent's ready file
            for extra in self.ready.parent.glob(self.ready.name + ".*"):
                try:
                    pids += [int(x) for x in extra.read_text().split()]
                except (OSError, ValueError):
                    pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # children that left the group; only if the pid is still one of our hogs
            if is_hog(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
