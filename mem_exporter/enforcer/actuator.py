"""Signals, at the edge: identity-checked per process, whole process groups, cgroup v2 `cgroup.kill`.

Every signal to a process goes through `signal_process`: a pidfd is opened first, then
the process's start time is read from /proc and compared with the sample's; only a
match sends the signal, through the pidfd, so a PID reused in between cannot be hit.
Without pidfds (old kernels, macOS) the check is the same and the window is tiny.

`killpg` is used on top (it reaches members forked since the last read) only right after
a member still in that group was verified: while a member lives, the PGID cannot be reused.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..procfs import parse_stat
from ..sample import ProcessInfo

log = logging.getLogger(__name__)

HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


@dataclass
class Delivery:
    sent: list[int]  # pids signalled
    gone: list[int]  # already gone (or a zombie)
    mismatch: list[int]  # pid now belongs to another process: not signalled
    denied: list[int]
    group: bool = False  # killpg / cgroup.kill was used too


class Actuator:
    def __init__(self, procfs: str = "/proc", cgroupfs: str = "/sys/fs/cgroup", use_pidfd: bool = HAVE_PIDFD):
        self.procfs = procfs.rstrip("/") or "/"
        self.cgroupfs = cgroupfs.rstrip("/") or "/"
        self.use_pidfd = use_pidfd and HAVE_PIDFD
        self.foreign = self._foreign_pid_namespace()
        if self.foreign:
            log.error("%s belongs to another PID namespace than the enforcer's: its PIDs are not the ones kill() "
                      "reaches, so nothing will be signalled (run the enforcer in the host PID namespace)", self.procfs)

    def _foreign_pid_namespace(self) -> bool:
        try:
            return os.readlink(f"{self.procfs}/self") != str(os.getpid())
        except OSError:  # a fixture tree without a `self` link: nothing to compare
            return False

    # --- reading ----------------------------------------------------------------------------
    def _stat(self, pid: int) -> tuple[str, int, int] | None:
        """(state, pgid, start time) of a live pid, None when gone."""
        try:
            with open(f"{self.procfs}/{pid}/stat", "rb") as f:
                _, fields = parse_stat(f.read())
            return fields[0].decode(), int(fields[2]), int(fields[19])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            return None

    def alive(self, proc: ProcessInfo) -> bool:
        """The very process of the sample still runs (not gone, not a zombie, not a reused pid)."""
        st = self._stat(proc.pid)
        return st is not None and st[0] not in ("Z", "X") and st[2] == proc.start_time

    # --- signalling one process -------------------------------------------------------------
    def signal_process(self, proc: ProcessInfo, sig: int) -> tuple[str, int | None]:
        """("sent" | "gone" | "mismatch" | "denied", the live pgid when verified)."""
        if self.foreign:
            return "denied", None
        fd = None
        if self.use_pidfd:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                return "gone", None
            except OSError as e:
                if e.errno == errno.ESRCH:
                    return "gone", None
                fd = None
        try:
            st = self._stat(proc.pid)  # read after the pidfd is open: a match means the pidfd is this process
            if st is None or st[0] in ("Z", "X"):
                return "gone", None
            if st[2] != proc.start_time:
                log.warning("pid %d is no longer %s (start time %d, expected %d): not signalled",
                            proc.pid, proc.comm, st[2], proc.start_time)
                return "mismatch", None
            try:
                if fd is not None:
                    signal.pidfd_send_signal(fd, sig)
                else:
                    os.kill(proc.pid, sig)
            except ProcessLookupError:
                return "gone", None
            except PermissionError:
                return "denied", st[1]
            return "sent", st[1]
        finally:
            if fd is not None:
                os.close(fd)

    def signal_all(self, procs: Sequence[ProcessInfo], sig: int, pgid: int | None = None,
                   cgroup: str | None = None) -> Delivery:
        """Signal each process (identity-checked), then the whole PGID or cgroup when a verified member anchors it."""
        d = Delivery([], [], [], [])
        anchored = False
        for p in procs:
            outcome, live_pgid = self.signal_process(p, sig)
            getattr(d, outcome).append(p.pid)
            if outcome == "sent" and pgid is not None and live_pgid == pgid and p.pgid == pgid:
                anchored = True
        if anchored and pgid is not None and pgid > 1:
            try:
                os.killpg(pgid, sig)
                d.group = True
            except (ProcessLookupError, PermissionError):
                pass
        if cgroup is not None and sig == signal.SIGKILL and (d.sent or d.denied) and self.cgroup_kill(cgroup):
            d.group = True
        return d

    # --- cgroup v2 --------------------------------------------------------------------------
    def cgroup_kill_file(self, cgroup: str) -> str | None:
        """The `cgroup.kill` file of a cgroup v2 directory, or None (v1, root cgroup, kernel < 5.14)."""
        rel = cgroup.strip("/")
        if not rel or ".." in rel.split("/"):
            return None
        path = os.path.join(self.cgroupfs, rel, "cgroup.kill")
        return path if os.path.exists(path) else None

    def cgroup_kill(self, cgroup: str) -> bool:
        """SIGKILL everything in the cgroup, new forks included (writes 1 to cgroup.kill)."""
        path = self.cgroup_kill_file(cgroup)
        if path is None or self._own_cgroup_inside(cgroup):
            return False
        try:
            with open(path, "w") as f:
                f.write("1")
            return True
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
            return False

    def _own_cgroup_inside(self, cgroup: str) -> bool:
        """True when the enforcer itself lives in this cgroup or below it."""
        try:
            with open(f"{self.procfs}/self/cgroup") as f:
                mine = [line.split(":", 2)[2].strip() for line in f if line.count(":") >= 2]
        except OSError:
            return False
        target = "/" + cgroup.strip("/")
        return any(m == target or m.startswith(target + "/") for m in mine)

    # --- waiting ----------------------------------------------------------------------------
    def wait_gone(self, procs: Iterable[ProcessInfo], timeout: float) -> list[ProcessInfo]:
        """Wait up to `timeout` for the processes to exit; the ones still alive."""
        deadline = time.monotonic() + timeout
        left = [p for p in procs if self.alive(p)]
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.01, remaining))
            left = [p for p in left if self.alive(p)]
        return left


class PidfdWatch:
    """Sleep until one of the watched processes exits (pidfds become readable), or a timeout."""

    def __init__(self, actuator: Actuator):
        self.actuator = actuator
        self.fds: dict[int, int] = {}

    def add(self, procs: Iterable[ProcessInfo]) -> None:
        if not self.actuator.use_pidfd:
            return
        for p in procs:
            if p.pid in self.fds:
                continue
            try:
                fd = os.pidfd_open(p.pid)
            except OSError:
                continue
            if self.actuator.alive(p):
                self.fds[p.pid] = fd
            else:
                os.close(fd)

    def wait(self, timeout: float) -> None:
        if not self.fds or timeout <= 0:
            time.sleep(max(0.0, timeout))
            return
        readable, _, _ = select.select(list(self.fds.values()), [], [], timeout)
        for fd in readable:
            pid = next(k for k, v in self.fds.items() if v == fd)
            del self.fds[pid]
            os.close(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
