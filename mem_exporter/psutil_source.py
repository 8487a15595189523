"""The portable source: the same records as the procfs reader, through psutil (macOS, Windows, BSD,
or Linux with `source: psutil`).

What each OS gives:
- Linux: everything procfs gives; PSS and swap per process with `memory: pss` (smaps_rollup, as procfs).
- macOS, BSD: RSS; USS as the `pss` value with `memory: pss` (macOS has no PSS); PGID and session.
- Windows: RSS (working set); USS with `memory: pss`; no process groups, so a group is a process tree
  (`tree_roots`): the process a shell or service host started, with everything below it.

Beside RSS, each process's own number on its OS (platforms/): macOS phys_footprint (memtype
`footprint`), Windows PrivateUsage (memtype `private`); and for the system macOS's pressure level,
Windows' commit charge and limit.

`start_time` is kept in the same unit as procfs (clock ticks after boot; 100 per second outside
Linux), so (pid, start_time) identities agree between sources and with the actuators.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import psutil

from . import platforms
from .sample import ProcessInfo, SystemMemory

# `uids` exists only where the OS has numeric users (not Windows): asking psutil for it there is an error.
_ATTRS = ["pid", "ppid", "name", "cmdline", "create_time", "status", "memory_info"] + (
    ["uids"] if hasattr(psutil.Process, "uids") else []
)
IS_WINDOWS = sys.platform == "win32"
IS_LINUX = sys.platform.startswith("linux")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and sys.platform.startswith("linux") else 100

# Windows processes whose children each start a tree of their own: the shells, the desktop, the
# service control manager and the service host, and the system's own processes (lower case).
TREE_HOSTS = frozenset(
    {
        "system",
        "system idle process",
        "registry",
        "smss.exe",
        "csrss.exe",
        "wininit.exe",
        "winlogon.exe",
        "services.exe",
        "svchost.exe",
        "explorer.exe",
        "userinit.exe",
        "sihost.exe",
        "runtimebroker.exe",
        "cmd.exe",
        "powershell.exe",
        "pwsh.exe",
        "windowsterminal.exe",
        "openconsole.exe",
        "conhost.exe",
        "code.exe",
        "bash.exe",
        "wsl.exe",
    }
)


def start_ticks(create_time: float, boot_time: float | None = None) -> int:
    """psutil's create time (seconds since the epoch) as ticks after boot, the procfs `start_time` unit.
    On Linux psutil derives create_time from those very ticks, so this is exact there."""
    boot = psutil.boot_time() if boot_time is None else boot_time
    return round((create_time - boot) * TICKS)


def _group_and_session(pid: int) -> tuple[int, int]:
    """POSIX: the process group and session of a process (psutil has neither). Never called on Windows:
    the reader groups by process trees there."""
    if sys.platform == "win32":
        raise OSError("no process groups on Windows")
    return os.getpgid(pid), os.getsid(pid)


class TreeRecord(NamedTuple):
    pid: int
    ppid: int
    name: str
    create_time: float


def is_tree_host(r: TreeRecord) -> bool:
    return r.name.lower() in TREE_HOSTS


def tree_roots(records: Iterable[TreeRecord], is_host: Callable[[TreeRecord], bool] = is_tree_host) -> dict[int, int]:
    """pid -> the pid of its tree's root, for systems without process groups (Windows).

    A process's root is its highest ancestor whose parent is a host (a shell, the desktop, the service
    control manager or service host, a system process: `is_host`) or is not there. A host is its own root.
    A parent that started after the child is not its parent: Windows reuses the PIDs of exited parents,
    so such a link is treated as a parent that is gone.
    """
    by_pid = {r.pid: r for r in records}
    roots: dict[int, int] = {}

    def parent(r: TreeRecord) -> TreeRecord | None:
        p = by_pid.get(r.ppid)
        if p is None or p.pid == r.pid or p.create_time > r.create_time:
            return None
        return p

    for r in by_pid.values():
        chain, node = [], r
        while node.pid not in roots:
            chain.append(node.pid)
            if is_host(node):
                roots[node.pid] = node.pid
                chain.pop()
                break
            up = parent(node)
            if up is None or is_host(up) or up.pid in chain:
                roots[node.pid] = node.pid
                chain.pop()
                break
            node = up
        root = roots[node.pid]
        for pid in chain:
            roots[pid] = root
    return roots


class PsutilReader:
    def __init__(
        self,
        pss: bool = False,
        exe: bool = False,
        cgroup: bool = False,
        trees: bool | None = None,
        is_host: Callable[[TreeRecord], bool] = is_tree_host,
        platform: str | None = None,
    ):
        self.pss = pss  # memory_full_info: pss and swap on Linux; elsewhere uss is the closest
        self.exe = exe
        self.attrs = _ATTRS + (["exe"] if exe else [])  # exe costs a readlink per process: only when a matcher needs it
        self.trees = (not hasattr(os, "getpgid")) if trees is None else trees  # groups as process trees
        self.is_host = is_host
        self._roots: dict[int, int] = {}  # pid -> tree root, from the last full read (trees only)
        self.platform = platforms.PLATFORM if platform is None else platform
        self.kthreadd: int | None = None  # Linux's kernel threads' parent; none in a pid namespace of its own
        if IS_LINUX:
            from .procfs import kthreadd_pid

            self.kthreadd = kthreadd_pid()
        # (memtype, reader) of the OS's own per-process number (footprint, private), None where there is none
        self.native = platforms.process_memory(self.platform)
        self._own_namespace: bool | None = None  # whether /proc's newest pid is ours (newest_pid)

    def read_system(self) -> SystemMemory:
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        return SystemMemory(
            total_bytes=vm.total,
            available_bytes=vm.available,
            free_bytes=vm.free,
            swap_total_bytes=sw.total,
            swap_used_bytes=sw.used,
            **platforms.read_system_extra(self.platform),
        )

    def read_cpu_times(self) -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(t)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total - idle, total

    def pids(self) -> list[int]:
        return psutil.pids()

    def forget_except(self, live: Iterable[int]) -> None:
        """Nothing is kept between reads but the trees' roots, which each full read replaces."""

    def close(self) -> None:
        """No descriptors are kept."""

    # psutil has neither the start times' clock nor the newest pid: this host's /proc answers where it
    # has one (Linux), as for the procfs source; elsewhere there is no answer (and ancestors come from psutil)
    def uptime(self) -> float | None:
        from .procfs import read_uptime

        return read_uptime("/proc")

    def newest_pid(self) -> bytes | None:
        from .procfs import newest_pid, own_pid_namespace

        if self._own_namespace is None:
            self._own_namespace = own_pid_namespace("/proc")
        return newest_pid("/proc") if self._own_namespace else None

    def ancestors(self, pid: int) -> frozenset[int]:
        from .procfs import ancestors

        return ancestors("/proc", pid)

    def read_processes(self, pids: Iterable[int] | None = None) -> tuple[list[ProcessInfo], Counter]:
        skipped: Counter = Counter()
        rows: list[tuple[psutil.Process, dict]] = []
        candidates = psutil.process_iter(self.attrs) if pids is None else _processes(pids, skipped)
        for p in candidates:
            info = getattr(p, "info", None) or _info(p, self.attrs, skipped)
            if info is None:
                continue
            if info["pid"] == 0 or (self.kthreadd is not None and self.kthreadd in (info["pid"], info["ppid"])):
                skipped["kernel_thread"] += 1  # the idle task / kernel_task, and Linux's kthreadd and its children
                continue
            if info["status"] == psutil.STATUS_ZOMBIE:
                info = _through_live_thread(info) if IS_LINUX else None
                if info is None:
                    skipped["zombie"] += 1
                    continue
            if info["memory_info"] is None or info["create_time"] is None:
                skipped["permission"] += 1
                continue
            rows.append((p, info))
        if self.trees and pids is None:
            self._roots = tree_roots(
                [TreeRecord(i["pid"], i["ppid"] or 0, i["name"] or "", i["create_time"]) for _, i in rows], self.is_host
            )
        boot = psutil.boot_time()
        procs: list[ProcessInfo] = []
        for p, info in rows:
            pid = info["pid"]
            if self.trees:
                # a read in part (the fast lane, newcomers): the last full read's trees; a new child joins its parent's
                pgid = sid = self._roots.get(pid) or self._roots.get(info["ppid"] or 0) or pid
            else:
                try:
                    pgid, sid = _group_and_session(pid)
                except ProcessLookupError:
                    skipped["vanished"] += 1
                    continue
                except PermissionError:
                    skipped["permission"] += 1
                    continue
            pss = swap = None
            if self.pss:
                try:
                    full = p.memory_full_info()
                    pss, swap = getattr(full, "pss", full.uss), getattr(full, "swap", None)
                except (psutil.AccessDenied, psutil.NoSuchProcess):
                    pass
            uids = info.get("uids")
            native = None if self.native is None else self.native[1](pid, info["memory_info"])
            footprint = native if self.native is not None and self.native[0] == "footprint" else None
            private = native if self.native is not None and self.native[0] == "private" else None
            procs.append(
                ProcessInfo(
                    pid=pid,
                    ppid=info["ppid"] or 0,
                    pgid=pgid,
                    sid=sid,
                    uid=uids.real if uids else -1,
                    comm=info["name"] or "",
                    cmdline=" ".join(info["cmdline"] or []),
                    start_time=start_ticks(info["create_time"], boot),
                    state=_STATE.get(info["status"], "S"),
                    rss_bytes=info["memory_info"].rss,
                    pss_bytes=pss,
                    swap_bytes=swap,
                    exe=info.get("exe") if self.exe else None,
                    footprint_bytes=footprint,
                    private_bytes=private,
                )
            )
        return procs, skipped


_STATE: Mapping[str, str] = {
    psutil.STATUS_RUNNING: "R",
    psutil.STATUS_SLEEPING: "S",
    psutil.STATUS_DISK_SLEEP: "D",
    psutil.STATUS_STOPPED: "T",
    psutil.STATUS_ZOMBIE: "Z",
    psutil.STATUS_IDLE: "I",
    psutil.STATUS_DEAD: "X",
}


class _Resident(NamedTuple):
    rss: int


def _through_live_thread(info: dict) -> dict | None:
    """Linux: a leader that called pthread_exit() is a zombie while its threads run on, holding the
    memory; its command line, exe and memory are read through a live thread. None for a real zombie."""
    from .procfs import PAGE_SIZE, live_task, read_file

    task = live_task(f"/proc/{info['pid']}/", info["pid"])
    if task is None:
        return None
    try:
        cmdline = [a.decode(errors="replace") for a in read_file(task + "cmdline").rstrip(b"\0").split(b"\0")]
        resident = int(read_file(task + "statm").split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None  # the thread ended since
    exe = None
    if "exe" in info:
        try:
            exe = os.readlink(task + "exe")
        except OSError:
            pass
    return info | {"cmdline": cmdline, "exe": exe, "status": psutil.STATUS_SLEEPING, "memory_info": _Resident(resident)}


def _processes(pids: Iterable[int], skipped: Counter):
    for pid in pids:
        try:
            yield psutil.Process(pid)
        except psutil.NoSuchProcess:
            skipped["vanished"] += 1


def _info(p: psutil.Process, attrs: list[str], skipped: Counter) -> dict | None:
    try:
        return p.as_dict(attrs)
    except psutil.NoSuchProcess:
        skipped["vanished"] += 1
        return None
