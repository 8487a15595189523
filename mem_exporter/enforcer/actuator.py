"""Signals, at the edge: identity-checked per process, whole process groups, cgroup v2 `cgroup.kill`.

`Actuator` is what a kill (kill.py) signals through; `ProcfsActuator` here is the one wherever there is
a procfs, `portable.PortableActuator` (psutil) the one elsewhere; actuators.py picks.

Every signal to a process goes through `signal_process`: a pidfd is opened first, then
the process's start time is read from /proc and compared with the sample's; only a
match sends the signal, through the pidfd, so a PID reused in between cannot be hit.
Without pidfds (old kernels, macOS) the check is the same and the window is tiny.

`killpg` is used on top (it reaches members forked since the last read) only right after
a member still in that group was verified: while a member lives, the PGID cannot be reused.

A kill never fails for want of a descriptor: a few are held in reserve from the start and
released when an open fails with EMFILE/ENFILE; without a pidfd the signal goes through
kill() behind the same start-time check. Waiting uses poll(), which takes any descriptor
number (select() refuses those above 1023, which a busy host reaches quickly).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..facilities import PIDFD
from ..procfs import ProcfsReader, kthreadd_pid, parse_stat, task_alive
from ..procfs import ancestors as procfs_ancestors
from ..reader import Reader
from ..sample import ProcessInfo
from .policy import Context
from .trust import Inspector

log = logging.getLogger(__name__)

HAVE_PIDFD = PIDFD
_NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)


class NoDescriptor(OSError):
    """No descriptor could be had, even with the reserve spent and the donors asked."""


class DescriptorReserve:
    """A few descriptors held from the start (on /dev/null) and handed back when an open fails for
    want of one, so the identity check and the signal that follow a kill decision can always open.
    With the reserve spent, donors (a kill's PidfdWatch) are asked to close one of theirs."""

    def __init__(self, count: int = 8):
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self.count = count
        self.donors: list[Callable[[], bool]] = []  # each closes one descriptor of its own; False when it has none
        self.refill()

    def refill(self) -> None:
        with self._lock:
            while len(self._fds) < self.count:
                try:
                    self._fds.append(os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
                except OSError:
                    return

    def release(self) -> bool:
        with self._lock:
            if self._fds:
                os.close(self._fds.pop())
                return True
            donors = list(self.donors)
        return any(give() for give in donors)

    def call(self, fn, *args):
        """fn(*args), retried with a descriptor freed whenever it fails with EMFILE/ENFILE;
        NoDescriptor when none can be freed."""
        while True:
            try:
                return fn(*args)
            except OSError as e:
                if e.errno not in _NO_DESCRIPTOR:
                    raise
                if not self.release():
                    raise NoDescriptor(e.errno, e.strerror) from None


RESERVE = DescriptorReserve()  # one for the whole process


# --- who the signalling process is, and what it may not touch ----------------------------------


def ancestors(pid: int, procfs: str = "/proc") -> frozenset[int]:
    """The pids above `pid` up to init: from procfs, or through psutil where there is none (macOS, Windows)."""
    return procfs_ancestors(procfs, pid)


def _psutil_uid() -> int:
    """This process's uid as the psutil source reports uids: -1 on Windows (no numeric users there; the
    portable actuator compares user names)."""
    import psutil

    uids = getattr(psutil.Process(), "uids", None)
    return uids().real if uids is not None else -1


def own_context(
    procfs: str = "/proc",
    protect: tuple = (),
    dry_run: bool = False,
    builtin: bool = True,
    cgroupfs: str = "/sys/fs/cgroup",
    reader: Reader | None = None,
) -> Context:
    """This process's identity (uid, pid, process group, ancestors), the protect list, and the
    inspector that protection rests on (trust.py). Ancestors are read through `reader` where one is given."""
    uid = os.geteuid() if hasattr(os, "geteuid") else _psutil_uid()
    pgid = os.getpgrp() if hasattr(os, "getpgrp") else os.getpid()
    inspector = Inspector(procfs, cgroupfs)
    reader = reader if reader is not None else ProcfsReader(procfs)
    return Context(
        uid=uid,
        pid=os.getpid(),
        pgid=pgid,
        ancestors=reader.ancestors(os.getpid()),
        started=_own_start_time(reader),
        protect=protect,
        dry_run=dry_run,
        builtin=builtin,
        kthreadd=kthreadd_pid(procfs),
        is_root=inspector.is_root,
        inspect_exe=inspector.exe,
        inspect_cgroup=inspector.cgroup,
    )


def _own_start_time(reader: Reader) -> int | None:
    """This process's start time as `reader` reads processes; None where it cannot (a fixture tree)."""
    try:
        procs, _ = reader.read_processes([os.getpid()])
    except OSError:
        return None
    return procs[0].start_time if procs else None


@dataclass
class Delivery:
    sent: list[int]  # pids signalled
    gone: list[int]  # already gone (or a zombie)
    mismatch: list[int]  # pid now belongs to another process: not signalled
    denied: list[int]
    group: bool = False  # killpg / cgroup.kill was used too
    unchecked: list[int] = field(default_factory=list)  # no descriptor for the identity check: not signalled


class Actuator(Protocol):
    """Identity-checked signals to the processes of a sample, and whether they still run."""

    use_pidfd: bool  # whether a kill may wait on pidfds (PidfdWatch); else it sleeps between re-reads
    foreign: bool  # the processes read are another PID namespace's: nothing is signalled

    def alive(self, proc: ProcessInfo) -> bool:
        """The very process of the sample still runs (not gone, not a zombie, not a reused pid)."""
        ...

    def signal_process(self, proc: ProcessInfo, sig: int) -> tuple[str, int | None]:
        """("sent" | "gone" | "mismatch" | "denied" | "unchecked", the live pgid when verified)."""
        ...

    def signal_all(
        self, procs: Sequence[ProcessInfo], sig: int, pgid: int | None = None, cgroup: str | None = None
    ) -> Delivery:
        """Each process (identity-checked), then its whole group where a verified member anchors it."""
        ...

    def wait_gone(self, procs: Iterable[ProcessInfo], timeout: float) -> list[ProcessInfo]:
        """Wait up to `timeout` for the processes to exit; the ones still alive."""
        ...


def wait_gone(actuator: Actuator, procs: Iterable[ProcessInfo], timeout: float) -> list[ProcessInfo]:
    """Wait up to `timeout` for the processes to exit (as `actuator.alive()` tells); the ones still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if actuator.alive(p)]
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(0.01, remaining))
        left = [p for p in left if actuator.alive(p)]
    return left


class ProcfsActuator:
    def __init__(self, procfs: str = "/proc", cgroupfs: str = "/sys/fs/cgroup", use_pidfd: bool = HAVE_PIDFD):
        self.procfs = procfs.rstrip("/") or "/"
        self.cgroupfs = cgroupfs.rstrip("/") or "/"
        self.use_pidfd = use_pidfd and HAVE_PIDFD
        self.foreign = self._foreign_pid_namespace()
        if self.foreign:
            log.error(
                "%s belongs to another PID namespace than the enforcer's: its PIDs are not the ones kill() "
                "reaches, so nothing will be signalled (run the enforcer in the host PID namespace)",
                self.procfs,
            )

    def _foreign_pid_namespace(self) -> bool:
        try:
            return os.readlink(f"{self.procfs}/self") != str(os.getpid())
        except OSError:  # a fixture tree without a `self` link: nothing to compare
            return False

    # --- reading ----------------------------------------------------------------------------
    def _read_stat(self, pid: int) -> bytes:
        fd = os.open(f"{self.procfs}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 4096)
        finally:
            os.close(fd)

    def _stat(self, pid: int) -> tuple[str, int, int] | None:
        """(state, pgid, start time) of a live pid, None when gone. A leader that exited while its
        threads run on reads as a zombie but is alive (the thread group still holds the memory)."""
        try:
            _, fields = parse_stat(RESERVE.call(self._read_stat, pid))
            state = fields[0].decode()
            if state == "Z" and int(fields[17]) > 1 and task_alive(f"{self.procfs}/{pid}/", pid):
                state = "S"
            return state, int(fields[2]), int(fields[19])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            return None

    def alive(self, proc: ProcessInfo) -> bool:
        """The very process of the sample still runs (not gone, not a zombie, not a reused pid).
        True when it cannot be told for want of a descriptor: a kill then keeps going, never gives up."""
        try:
            st = self._stat(proc.pid)
        except NoDescriptor:
            return True
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
                fd = None  # no descriptor left (or no pidfd support): kill() behind the same check
        try:
            try:
                st = self._stat(proc.pid)  # read after the pidfd is open: a match means the pidfd is this process
            except NoDescriptor:
                log.warning("no descriptor to check pid %d (%s): not signalled by pid", proc.pid, proc.comm)
                return "unchecked", None
            if st is None or st[0] in ("Z", "X"):
                return "gone", None
            if st[2] != proc.start_time:
                log.warning(
                    "pid %d is no longer %s (start time %d, expected %d): not signalled",
                    proc.pid,
                    proc.comm,
                    st[2],
                    proc.start_time,
                )
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

    def signal_all(
        self, procs: Sequence[ProcessInfo], sig: int, pgid: int | None = None, cgroup: str | None = None
    ) -> Delivery:
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
        return wait_gone(self, procs, timeout)


class PidfdWatch:
    """Sleep until one of the watched processes exits (its pidfd becomes readable), or a timeout.

    poll(), not select(): pidfds opened on a busy host are numbered far above 1023. The watch is
    the one part of a kill that can do without descriptors: it stops opening pidfds at the first
    EMFILE/ENFILE and closes HEADROOM of its own then, and while open it is a donor to RESERVE (it
    closes one more whenever an identity check finds no descriptor). A process without a pidfd is
    simply not watched: callers re-check liveness after every wait, so they lose at most the early
    wake-up."""

    HEADROOM = 16

    def __init__(self, actuator: Actuator):
        self.actuator = actuator
        self.fds: dict[int, int] = {}  # fd -> pid
        self.full = False  # a pidfd could not be opened: no more are tried
        self._lock = threading.Lock()
        self._poll = select.poll() if actuator.use_pidfd else None  # no poll() on Windows, no pidfds outside Linux
        if self._poll is not None:
            RESERVE.donors.append(self.give_one)

    def add(self, procs: Iterable[ProcessInfo]) -> None:
        if not self.actuator.use_pidfd or self.full:
            return
        watched = set(self.fds.values())
        for p in procs:
            if p.pid in watched:
                continue
            try:
                fd = os.pidfd_open(p.pid)
            except OSError as e:
                if e.errno in _NO_DESCRIPTOR:
                    self.full = True
                    for _ in range(self.HEADROOM):
                        self.give_one()
                    return
                continue
            if self.actuator.alive(p):
                with self._lock:
                    self.fds[fd] = p.pid
                    self._poll.register(fd, select.POLLIN)  # type: ignore[union-attr]
                watched.add(p.pid)
            else:
                os.close(fd)

    def give_one(self) -> bool:
        """Close one watched pidfd (its process is no longer watched); False when none is left."""
        with self._lock:
            if not self.fds:
                return False
            fd, _ = self.fds.popitem()
            self._poll.unregister(fd)  # type: ignore[union-attr]
            os.close(fd)
            return True

    def wait(self, timeout: float) -> None:
        if not self.fds or self._poll is None or timeout <= 0:
            time.sleep(max(0.0, timeout))
            return
        for fd, _ in self._poll.poll(timeout * 1000):
            with self._lock:
                if self.fds.pop(fd, None) is not None:  # unless given away meanwhile
                    self._poll.unregister(fd)
                    os.close(fd)

    def close(self) -> None:
        if self._poll is not None and self.give_one in RESERVE.donors:
            RESERVE.donors.remove(self.give_one)
        while self.give_one():
            pass
