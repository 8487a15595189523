"""Signals through psutil, for the psutil source (macOS, Windows, or forced): an `actuator.Actuator`.

Identity is (pid, start time) as the sample saw it; psutil's create time is converted to the same
unit (`psutil_source.start_ticks`) and compared right before each signal. psutil has no pidfd, so a
PID reused between that check and the signal is not excluded as on Linux with pidfds; the window is
one system call wide.

Never signalled, whatever the caller asks: PID 0 (the idle task / kernel_task), 1 (init, launchd),
4 (Windows' System), this process and its ancestors; and another user's process unless
`other_users` is given (per call, or for the actuator).

Windows has no signals: `terminate()` and `kill()` are both TerminateProcess, so SIGTERM already ends
the process and the grace period is spent waiting for it to be gone. There is no process group
to signal either; the whole tree is the list of processes passed in.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterable, Sequence

import psutil

from ..psutil_source import start_ticks
from ..sample import ProcessInfo
from .actuator import Delivery, wait_gone

log = logging.getLogger(__name__)

NEVER = frozenset({0, 1, 4})
IS_WINDOWS = sys.platform == "win32"
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _owner(p: psutil.Process) -> int | str:
    """The uid (POSIX) or user name (Windows) that owns a process."""
    return p.uids().real if hasattr(p, "uids") else p.username()


class PortableActuator:
    use_pidfd = False  # PidfdWatch then sleeps between re-reads
    foreign = False

    def __init__(self, other_users: bool = False):
        me = psutil.Process()
        self.other_users = other_users
        self.shielded = frozenset({me.pid, *(p.pid for p in me.parents())})
        self.user = _owner(me)  # compared with _owner(p): the same kind of value (uid or name) on every OS

    # --- reading ----------------------------------------------------------------------------
    def _live(self, proc: ProcessInfo) -> psutil.Process | None:
        """The very process of the sample, when it still runs (not gone, not a zombie, not a reused pid)."""
        try:
            p = psutil.Process(proc.pid)
            if start_ticks(p.create_time()) != proc.start_time or p.status() in _GONE:
                return None
            return p
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:  # Windows hides some processes' details: they are not ours to judge
            return None

    def alive(self, proc: ProcessInfo) -> bool:
        return self._live(proc) is not None

    def why_never(self, pid: int) -> str | None:
        if pid in NEVER:
            return f"pid {pid} is never signalled"
        if pid in self.shielded:
            return "the actuator itself or one of its ancestors"
        return None

    # --- signalling one process -------------------------------------------------------------
    def signal_process(self, proc: ProcessInfo, sig: int, other_users: bool | None = None) -> tuple[str, int | None]:
        """("sent" | "gone" | "mismatch" | "denied", the live pgid when verified and the OS has one)."""
        why = self.why_never(proc.pid)
        if why:
            log.warning("pid %d (%s): %s: not signalled", proc.pid, proc.comm, why)
            return "denied", None
        try:
            p = psutil.Process(proc.pid)
            if p.status() in _GONE:
                return "gone", None
            started = start_ticks(p.create_time())
            if started != proc.start_time:
                log.warning(
                    "pid %d is no longer %s (start time %d, expected %d): not signalled",
                    proc.pid,
                    proc.comm,
                    started,
                    proc.start_time,
                )
                return "mismatch", None
            allowed = self.other_users if other_users is None else other_users
            if not allowed and _owner(p) != self.user:
                log.warning("pid %d (%s) belongs to another user: not signalled", proc.pid, proc.comm)
                return "denied", None
            pgid = os.getpgid(proc.pid) if hasattr(os, "getpgid") else None
            if IS_WINDOWS:  # TerminateProcess either way
                p.kill() if sig == getattr(signal, "SIGKILL", None) else p.terminate()
            else:
                p.send_signal(sig)
            return "sent", pgid
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
            return "gone", None
        except (psutil.AccessDenied, PermissionError):
            return "denied", None

    def signal_all(
        self,
        procs: Sequence[ProcessInfo],
        sig: int,
        pgid: int | None = None,
        cgroup: str | None = None,
        other_users: bool | None = None,
    ) -> Delivery:
        """Each process, identity-checked; then the PGID where the OS has one and a verified member anchors it
        (it reaches members forked since the sample). `cgroup` is ignored: cgroups are Linux's."""
        d = Delivery([], [], [], [])
        anchored = False
        for p in procs:
            outcome, live_pgid = self.signal_process(p, sig, other_users)
            getattr(d, outcome).append(p.pid)
            if outcome == "sent" and pgid is not None and live_pgid == pgid and p.pgid == pgid:
                anchored = True
        if anchored and pgid is not None and pgid > 1 and hasattr(os, "killpg") and not self._shields_in(pgid):
            try:
                os.killpg(pgid, sig)
                d.group = True
            except (ProcessLookupError, PermissionError):
                pass
        return d

    def _shields_in(self, pgid: int) -> bool:
        """Whether the actuator or an ancestor is in this process group (then no killpg)."""
        if sys.platform == "win32":  # no process groups
            return False
        for pid in self.shielded:
            try:
                if os.getpgid(pid) == pgid:
                    return True
            except OSError:
                pass
        return False

    # --- waiting ----------------------------------------------------------------------------
    def wait_gone(self, procs: Iterable[ProcessInfo], timeout: float) -> list[ProcessInfo]:
        return wait_gone(self, procs, timeout)
