"""Linux fast path: processes and system memory read straight from procfs.

The root is a parameter (`--path.procfs`), so tests point it at a fixture tree.
What changes only on exec (uid, cmdline, exe, cgroup) is cached by (pid, start time) and
re-read when stat says the process exec'd: its comm changed, or the addresses the kernel set up at
exec (data, brk, arguments, environment: the last fields of stat) did. The kernel shows those
addresses only to a reader allowed to ptrace the process; for the others the command line is
re-read whenever stat or statm changed (nothing else an unprivileged reader sees tells an exec
apart; a process that did not run did not exec: an exec faults pages in, and stat counts those).
Reading a command line takes the process's mmap lock, as smaps_rollup does for PSS.
Only stat and statm (and smaps_rollup when PSS is on) are read every tick.
"""

from __future__ import annotations

import errno
import os
import sys
from collections import Counter
from collections.abc import Iterable

from .sample import ProcessInfo, SystemMemory

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096  # imported everywhere, read on Linux
PF_KTHREAD = 0x00200000  # include/linux/sched.h
_GONE = (FileNotFoundError, ProcessLookupError)
_STATES = {s.encode(): s for s in "RSDTtWPIZX"}
# stat's last 8 fields (start_data end_data start_brk arg_start arg_end env_start env_end exit_code)
# as a reader without ptrace access to the process sees them
_HIDDEN_EXEC_FIELDS = b" 0 0 0 0 0 0 0 0\n"
_NO_ROLLUP: tuple[None, None, None] = (None, None, None)  # pss, swap, why incomplete: not read


class DescriptorBudget:
    """How many processes may keep their two descriptors open, for the whole process (every
    reader draws on it: the full walk, the fast lane, kills): half the soft limit, less a reserve
    of FD_RESERVE for sockets, log files, pidfds and kills. The soft limit is raised towards the
    hard one first (to 65536 at most)."""

    FD_RESERVE = 512

    def __init__(self) -> None:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
        self.pairs = max(0, (min(soft, 65536) - self.FD_RESERVE) // 2)
        self.used = 0  # updated under the GIL by single += / -=; a pair too many is harmless

    def take(self) -> bool:
        if self.used >= self.pairs:
            return False
        self.used += 1
        return True

    def give(self, n: int = 1) -> None:
        self.used = max(0, self.used - n)


_BUDGET: DescriptorBudget | None = None


def descriptor_budget() -> DescriptorBudget:
    global _BUDGET
    if _BUDGET is None:
        _BUDGET = DescriptorBudget()
    return _BUDGET


def task_alive(base: str, pid: int) -> bool:
    """Whether a thread other than the (zombie) leader still runs: after pthread_exit() in main,
    /proc/PID/stat says Z while worker threads hold the process's memory."""
    return live_task(base, pid) is not None


def live_task(base: str, pid: int) -> str | None:
    """The /proc/PID/task/TID/ directory of a live thread other than the leader, or None."""
    try:
        tids = os.listdir(base + "task")
    except OSError:
        return None
    for tid in tids:
        if tid == str(pid):
            continue
        try:
            data = read_file(f"{base}task/{tid}/stat")
        except OSError:
            continue
        state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
        if state not in (b"Z", b"X"):
            return f"{base}task/{tid}/"
    return None


def _open_pair(base: str) -> tuple[int, int]:
    stat_fd = os.open(base + "stat", os.O_RDONLY)
    try:
        return stat_fd, os.open(base + "statm", os.O_RDONLY)
    except OSError:
        os.close(stat_fd)
        raise


def _close(fds: tuple[int, int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def read_all(path: str) -> bytes:
    """The whole file, however long (a child list, a cgroup.procs). Non-blocking: a FIFO where a kernel
    file should be reads as empty instead of hanging the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        data = os.read(fd, 65536)
        if len(data) < 65536:  # the whole file: one read (an end-of-file read would double the calls)
            return data
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_stat(data: bytes) -> tuple[str, list[bytes]]:
    """comm and the fields after it up to starttime (fields[0] is state; field N of proc(5) is fields[N-3])."""
    open_paren = data.find(b"(")
    close_paren = data.rfind(b")")
    return data[open_paren + 1 : close_paren].decode(errors="replace"), data[close_paren + 2 :].split(None, 20)


def parse_meminfo(data: bytes) -> dict[str, int]:
    out = {}
    for line in data.splitlines():
        key, _, rest = line.partition(b":")
        parts = rest.split()
        if parts:
            value = int(parts[0])
            out[key.decode()] = value * 1024 if len(parts) > 1 and parts[1] == b"kB" else value
    return out


def parse_smaps_rollup(data: bytes) -> tuple[int | None, int | None]:
    """(pss, swap) in bytes."""
    pss = swap = None
    for line in data.splitlines():
        if line.startswith(b"Pss:"):
            pss = int(line.split()[1]) * 1024
        elif line.startswith(b"Swap:"):
            swap = int(line.split()[1]) * 1024
    return pss, swap


def parse_cgroup(data: bytes) -> str | None:
    """The process's cgroup path: the v2 unified entry, else (hybrid or v1 hosts) the memory controller's."""
    unified = v1_memory = None
    for line in data.decode(errors="replace").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            v1_memory = path
    if unified not in (None, "/") or v1_memory is None:
        return unified
    return v1_memory


class _Known:
    """What the reader keeps about one process between walks."""

    # slots, not a dict or tuples: thousands of these live as long as their processes
    __slots__ = ("start_time", "comm", "uid", "cmdline", "exe", "cgroup", "exec_mark", "fds", "last", "reading")

    def __init__(self, start_time=None, comm="", uid=-1, cmdline="", exe=None, cgroup=None):
        self.start_time, self.comm, self.uid = start_time, comm, uid
        self.cmdline, self.exe, self.cgroup = cmdline, exe, cgroup
        self.exec_mark = 0  # hash of what changes on exec (see the module doc) at the last read
        self.fds: tuple[int, int] | None = None  # open stat and statm, re-read with pread
        self.last: ProcessInfo | None = None  # the record the last full walk made
        self.reading: int | None = None  # hash of the stat and statm `last` was made from

    def close(self) -> bool:
        """Close the descriptors; True if there were any."""
        if self.fds is None:
            return False
        _close(self.fds)
        self.fds = None
        return True


class ProcfsReader:
    def __init__(self, root: str = "/proc", pss: bool = False, exe: bool = False, cgroup: bool = False):
        self.root = root.rstrip("/") or "/"
        self.pss = pss
        self.exe = exe
        self.cgroup = cgroup
        self._prefix = self.root + "/"
        # pid -> what never changes for a process (cached by start time and comm, which changes on
        # exec), its open descriptors and its last record. Re-reading open stat and statm with
        # pread costs a third of open+read+close; a descriptor stays bound to its process, so
        # after the process exits it fails with ESRCH even if the pid is reused: it can never
        # read a stranger.
        self._known: dict[int, _Known] = {}
        self._open_count = 0
        self._budget = descriptor_budget()
        self._ints: dict[int, int] = {}  # one object per PGID/PPID/SID value, shared by the processes
        self._own_namespace: bool | None = None  # whether loadavg's newest pid is ours (newest_pid)

    def close(self) -> None:
        for known in self._known.values():
            known.close()
        self._budget.give(self._open_count)
        self._open_count = 0

    def __del__(self) -> None:
        self.close()

    def keeps_open(self, pid: int) -> bool:
        known = self._known.get(pid)
        return known is not None and known.fds is not None

    def _forget(self, pid: int) -> None:
        known = self._known.pop(pid, None)
        if known is not None and known.close():
            self._open_count -= 1
            self._budget.give()

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop what is kept about processes not in `live` (a listing of the procfs root): readers
        that never walk fully (the fast lane, kills) call this so their cache cannot grow without bound."""
        live = set(live)
        for pid in [p for p in self._known if p not in live]:
            self._forget(pid)

    def _open_kept(self, base: str) -> tuple[int, int] | None:
        """A pair to keep (the budget already taken), or None (budget handed back) when none is left."""
        try:
            return _open_pair(base)
        except OSError as e:
            self._budget.give()
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return None
            raise

    def _keep(self, pid: int, known: _Known | None, fds: tuple[int, int]) -> _Known:
        if known is None:
            known = self._known[pid] = _Known()
        known.fds = fds
        self._open_count += 1
        return known

    # --- system -------------------------------------------------------------
    def read_system(self) -> SystemMemory:
        m = parse_meminfo(read_file(self._prefix + "meminfo"))
        total = m.get("MemTotal", 0)
        available = m.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = m.get("MemFree", 0) + m.get("Buffers", 0) + m.get("Cached", 0)
        swap_total = m.get("SwapTotal", 0)
        return SystemMemory(
            total_bytes=total,
            available_bytes=available,
            free_bytes=m.get("MemFree", 0),
            swap_total_bytes=swap_total,
            swap_used_bytes=swap_total - m.get("SwapFree", 0),
        )

    def read_cpu_times(self) -> tuple[float, float]:
        """(busy, total) jiffies summed over all CPUs."""
        first = read_file(self._prefix + "stat").split(b"\n", 1)[0].split()[1:]
        values = [int(v) for v in first[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values)
        return total - idle, total

    # --- processes ----------------------------------------------------------
    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def read_process(self, pid: int, keep_open: bool = False) -> tuple[ProcessInfo | None, str | None]:
        """(process, None), or (None, why it was skipped), or (process, why it is incomplete).

        Reasons: vanished | zombie | kernel_thread | permission. `keep_open` keeps the process's
        descriptors and record for the next read (full walks do; their pruning forgets the gone).
        """
        base = f"{self._prefix}{pid}/"
        known = self._known.get(pid)
        opened = None
        try:
            # the hot loop: inlined reads and parsing, about 1000 times per tick
            if known is not None and (kept := known.fds) is not None:
                data = os.pread(kept[0], 4096, 0)
                statm = os.pread(kept[1], 4096, 0)
                if (reading := hash((data, statm))) == known.reading:
                    return known.last, None  # a process that did not run since: nothing to parse
            elif keep_open and self._budget.take() and (opened := self._open_kept(base)):
                data = os.pread(opened[0], 4096, 0)
                statm = os.pread(opened[1], 4096, 0)
                reading = hash((data, statm))
            else:  # partial reads, or over the descriptor budget: open, read, close
                data, statm = read_file(base + "stat"), read_file(base + "statm")
                reading = None
            close_paren = data.rfind(b")")
            f = data[close_paren + 2 :].split(None, 20)
            state = f[0]
            identity_base = base
            if state == b"Z" or state == b"X":
                if (through := self._through_live_thread(pid, base, state, f, opened)) is None:
                    return None, "zombie"  # `opened` is closed below: a zombie is not worth keeping
                identity_base, statm = through
                state, reading, opened, known = b"S", None, None, None
            if int(f[6]) & PF_KTHREAD:
                if opened:
                    self._keep(pid, known, opened)
                    opened = None
                return None, "kernel_thread"
            sizes = statm.split(None, 2)
            resident = int(sizes[1]) * PAGE_SIZE
            start_time = int(f[19])
            comm = data[data.find(b"(") + 1 : close_paren].decode(errors="replace")
            exec_fields = data[len(data.rsplit(None, 8)[0]) :]
            hidden = exec_fields == _HIDDEN_EXEC_FIELDS
            exec_mark = hash(exec_fields)
            if (
                known is None
                or known.start_time != start_time
                or known.comm != comm
                or known.exec_mark != exec_mark
                or (hidden and self._read_cmdline(base) != known.cmdline)
            ):
                fresh = self._read_static(identity_base, start_time, comm)
                if known is not None:  # the same process after exec: its descriptors still hold
                    fresh.fds = known.fds
                known = self._known[pid] = fresh
            known.exec_mark = exec_mark
            if opened:
                self._keep(pid, known, opened)
                opened = None
        except (OSError, IndexError, ValueError) as e:
            return None, self._skip_reason(pid, e)
        finally:
            if opened:  # opened but not kept
                _close(opened)
                self._budget.give()
        pss, swap, incomplete = self._read_rollup(base) if self.pss else _NO_ROLLUP
        ints = self._ints
        ppid, pgid, sid = int(f[1]), int(f[2]), int(f[3])
        proc = ProcessInfo(
            pid,
            ints.setdefault(ppid, ppid),
            ints.setdefault(pgid, pgid),
            ints.setdefault(sid, sid),
            known.uid,
            known.comm,
            known.cmdline,
            known.start_time,
            _STATES.get(state) or state.decode(),
            resident,
            pss,
            swap,
            known.cgroup,
            known.exe,
        )
        if known.last == proc:
            proc = known.last  # unchanged since the last walk: share it, so two samples cost one record
        if keep_open:
            known.last = proc
            # the next walk returns `last` as it is if stat and statm read the same (a 64-bit hash: to
            # match a given one takes about 2^64 tries): such a process has not exec'd either, since an
            # exec faults pages in and stat counts those (minflt). Not with PSS, read every walk.
            known.reading = None if self.pss else reading
        return proc, incomplete

    def _through_live_thread(
        self, pid: int, base: str, state: bytes, f: list[bytes], opened: tuple[int, int] | None
    ) -> tuple[str, bytes] | None:
        """A zombie (or dead) leader: None, or, while its threads run on, (a live thread's base, its statm).

        Their memory and identity (command line, exe, cgroup: the leader's read empty) are read through a live
        thread, every time: what is kept for the pid is forgotten, and `opened` closed."""
        task = live_task(base, pid) if state == b"Z" and int(f[17]) > 1 else None
        if task is None:
            return None
        statm = read_file(task + "statm")
        if opened:
            self._budget.give()
            _close(opened)
        self._forget(pid)
        return task, statm

    def _skip_reason(self, pid: int, e: Exception) -> str:
        """Why a read that raised `e` skips the process; an error that is not the process's is raised again."""
        if isinstance(e, OSError) and not isinstance(e, (*_GONE, PermissionError)):
            if e.errno in (errno.EMFILE, errno.ENFILE):  # the process ran out: skipped, counted, not fatal
                return "no_descriptor"
            raise e
        self._forget(pid)
        if isinstance(e, PermissionError):
            return "permission"
        return "vanished"  # gone, or a truncated read of an exiting process (IndexError, ValueError)

    @staticmethod
    def _read_rollup(base: str) -> tuple[int | None, int | None, str | None]:
        """(pss, swap, why incomplete) from smaps_rollup, which needs ptrace access: without it the process
        still counts, by RSS."""
        try:
            pss, swap = parse_smaps_rollup(read_file(base + "smaps_rollup"))
        except PermissionError:
            return None, None, "permission"
        except OSError:
            return None, None, None  # gone since, or a kernel before 4.14
        return pss, swap, None

    @staticmethod
    def _read_cmdline(base: str) -> str:
        try:
            return read_file(base + "cmdline").rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        except PermissionError:
            return ""

    def _read_static(self, base: str, start_time: int, comm: str) -> _Known:
        uid = os.stat(base).st_uid
        cmdline = self._read_cmdline(base)
        exe = cgroup = None
        if self.exe:
            try:
                exe = os.readlink(base + "exe")
            except PermissionError:
                exe = None
            except OSError as e:  # ENOENT for exited or exe-less processes
                if isinstance(e, _GONE) and not os.path.exists(base):
                    raise
        if self.cgroup:
            cgroup = parse_cgroup(read_file(base + "cgroup"))
        # interned: thousands of workers share one name and command line
        return _Known(start_time, sys.intern(comm), uid, sys.intern(cmdline), exe, cgroup)

    def read_processes(self, pids: Iterable[int] | None = None) -> tuple[list[ProcessInfo], Counter]:
        full_walk = pids is None
        if pids is None:
            pids = self.pids()
        procs: list[ProcessInfo] = []
        skipped: Counter = Counter()
        for pid in pids:
            proc, reason = self.read_process(pid, full_walk)
            if reason:
                skipped[reason] += 1
            if proc:
                procs.append(proc)
        if full_walk:  # forget processes that are gone, so the cache stays as big as the process table
            listed = set(pids)
            for pid in [p for p in self._known if p not in listed]:
                self._forget(pid)
            self._ints = {}  # rebuilt from the live processes' values next walk
        return procs, skipped

    # --- host facts ---------------------------------------------------------
    def uptime(self) -> float | None:
        return read_uptime(self.root)

    def newest_pid(self) -> bytes | None:
        if self._own_namespace is None:
            self._own_namespace = own_pid_namespace(self.root)
        return newest_pid(self.root) if self._own_namespace else None

    def ancestors(self, pid: int) -> frozenset[int]:
        return ancestors(self.root, pid)


def read_uptime(root: str) -> float | None:
    """Seconds since boot (`uptime`), the clock that start times count from; None where unreadable."""
    try:
        with open(f"{root}/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kthreadd_pid(root: str = "/proc") -> int | None:
    """2 where pid 2 is the kernel's thread starter (kthreadd), parent of every kernel thread: Linux, in the
    host's pid namespace. None elsewhere: a pid namespace of its own (a container, `unshare -p`) shows no
    kernel thread, and its pid 2 is an ordinary process whose children must not pass for kernel threads."""
    try:
        with open(f"{root}/2/stat", "rb") as f:
            data = f.read()
        return 2 if int(parse_stat(data)[1][6]) & PF_KTHREAD else None
    except (OSError, ValueError, IndexError):
        return None


def own_pid_namespace(root: str) -> bool:
    """Whether `root` shows our own pid namespace: the NSpid line of its `self` holds one pid only.
    (A host's /proc mounted in a container shows an outer namespace, whose pids loadavg does not follow.)"""
    try:
        with open(f"{root}/self/status") as f:
            return next((len(line.split()) == 2 for line in f if line.startswith("NSpid:")), False)
    except OSError:
        return False


def newest_pid(root: str) -> bytes | None:
    """The kernel's most recently allocated pid as `loadavg` shows it (its last field); None where unreadable."""
    try:
        with open(f"{root}/loadavg", "rb") as f:
            return f.read().rsplit(None, 1)[-1]
    except (OSError, IndexError):
        return None


def ancestors(root: str, pid: int) -> frozenset[int]:
    """The pids above `pid` up to init: from procfs, or through psutil where `root` does not show `pid`
    (macOS, Windows, a fixture tree)."""
    if not os.path.isdir(f"{root}/{pid}"):
        import psutil

        try:
            return frozenset(p.pid for p in psutil.Process(pid).parents())
        except psutil.Error:
            return frozenset()
    out: set[int] = set()
    while pid > 1:
        try:
            with open(f"{root}/{pid}/stat", "rb") as f:
                ppid = int(parse_stat(f.read())[1][1])
        except (OSError, ValueError, IndexError):
            break
        if ppid <= 0 or ppid in out:  # a cycle (a fixture, or pids reused mid-walk) ends the walk
            break
        out.add(ppid)
        pid = ppid
    return frozenset(out)
