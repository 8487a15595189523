"""Small helpers the benchmarks share: free ports on 127.0.0.1, a process's RSS and CPU time, waiting for HTTP,
background processes, a growing hog whose death and peak are measured, and Debian's earlyoom aimed at the benches'
hogs only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
HOG = Path(__file__).resolve().parents[1] / "tests" / "hog.py"
EARLYOOM = "/usr/bin/earlyoom"
HOG_COMM = "membenchhog"  # the name the benches' hogs take (hog.py --comm), the one earlyoom may pick
# earlyoom's --avoid: every name that does not start with "membe" (POSIX ERE has no negative lookahead)
AVOID_OTHERS = "^([^m]|m[^e]|me[^m]|mem[^b]|memb[^e])"


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


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


def start_earlyoom(term_kib: int, kill_kib: int) -> subprocess.Popen:
    """earlyoom as the bench's child, in a session of its own: SIGTERM once MemAvailable is at or below `term_kib`,
    SIGKILL at or below `kill_kib` (-s 100,100: the swap condition always met; -r 0: no reports). It prefers the
    benches' hogs and avoids every other process."""
    choice = ["--prefer", f"^{HOG_COMM}$", "--avoid", AVOID_OTHERS]
    return subprocess.Popen(
        [EARLYOOM, "-M", f"{term_kib},{kill_kib}", "-s", "100,100", "-r", "0", *choice],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_earlyoom(proc: subprocess.Popen | None) -> None:
    """Stops earlyoom the moment a trial ends, so that it never picks another victim; None or gone: nothing to do."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Hog:
    """tests/hog.py as the leader of a new session, named HOG_COMM with oom_score_adj 1000 (earlyoom's pick), growing
    at `rate` MiB/s up to `max_mib` MiB: from its start, or with `on_signal` idle at ~10 MiB until go(). Its death time
    and peak RSS come from wait4."""

    def __init__(self, tag: str, rate: float, max_mib: float, tmp: Path, on_signal: bool, extra: Sequence[str] = ()):
        ready = tmp / f"ready-{uuid.uuid4().hex[:8]}"
        growth = ["--grow", str(rate), "--max-mb", str(max_mib), "--step-ms", "2"]
        cmd = [sys.executable, str(HOG), *growth, "--comm", HOG_COMM, "--oom-score-adj", "1000", "--tag", tag, *extra]
        if on_signal:
            cmd += ["--grow-on-signal", "--ready", str(ready)]
        self.born = time.monotonic()
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        self.pid = self.proc.pid
        self.died: float | None = None
        self.peak: int | None = None
        self._done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()
        if on_signal:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if time.monotonic() > deadline or self._done.is_set():
                    self.cleanup()
                    raise RuntimeError("hog did not start")
                time.sleep(0.01)

    def _wait(self) -> None:
        _, _, usage = os.wait4(self.pid, 0)
        self.died = time.monotonic()
        self.peak = usage.ru_maxrss * 1024
        self._done.set()

    def go(self) -> float:
        """Starts the growth of an `on_signal` hog; returns when."""
        os.kill(self.pid, signal.SIGUSR1)
        return time.monotonic()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def cleanup(self) -> None:
        if not self._done.is_set():
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the hog's own session and group only
            except ProcessLookupError:
                pass
            self._done.wait(10)
