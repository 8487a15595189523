"""Small helpers the benchmarks share: free ports on 127.0.0.1, a process's RSS, waiting for HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int | None:
    """Resident bytes of a process (exact, from statm), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def background(n: int) -> subprocess.Popen:
    """n processes forked from one Python process in a new process group (its pgid is its pid)."""
    code = (
        "import os, signal\n"
        f"for _ in range({n}):\n"
        "    if os.fork() == 0:\n"
        "        signal.pause(); os._exit(0)\n"
        "print('up', flush=True); signal.pause()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "up":
        raise RuntimeError("background processes did not start")
    return p
