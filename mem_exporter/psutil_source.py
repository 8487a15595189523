"""Portable path for operating systems without procfs (macOS, BSD): the same records through psutil."""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable

import psutil

from .sample import ProcessInfo, SystemMemory

_ATTRS = ["pid", "ppid", "name", "cmdline", "uids", "create_time", "status", "memory_info", "exe"]


class PsutilReader:
    def __init__(self, pss: bool = False, exe: bool = False, cgroup: bool = False):
        self.pss = pss  # psutil's memory_full_info gives pss/swap on Linux only; elsewhere uss is the closest
        self.exe = exe

    def read_system(self) -> SystemMemory:
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        return SystemMemory(total_bytes=vm.total, available_bytes=vm.available, free_bytes=vm.free,
                            swap_total_bytes=sw.total, swap_used_bytes=sw.used)

    def read_cpu_times(self) -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(t)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total - idle, total

    def pids(self) -> list[int]:
        return psutil.pids()

    def read_processes(self, pids: Iterable[int] | None = None) -> tuple[list[ProcessInfo], Counter]:
        skipped: Counter = Counter()
        procs: list[ProcessInfo] = []
        candidates = psutil.process_iter(_ATTRS) if pids is None else _processes(pids, skipped)
        for p in candidates:
            info = getattr(p, "info", None) or _info(p, skipped)
            if info is None:
                continue
            if info["status"] == psutil.STATUS_ZOMBIE:
                skipped["zombie"] += 1
                continue
            if info["memory_info"] is None:
                skipped["permission"] += 1
                continue
            try:
                pgid, sid = os.getpgid(info["pid"]), os.getsid(info["pid"])
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
            procs.append(ProcessInfo(
                pid=info["pid"], ppid=info["ppid"] or 0, pgid=pgid, sid=sid,
                uid=info["uids"].real if info["uids"] else -1, comm=info["name"] or "",
                cmdline=" ".join(info["cmdline"] or []), start_time=int(info["create_time"] * 100),
                state=info["status"][:1].upper(), rss_bytes=info["memory_info"].rss,
                pss_bytes=pss, swap_bytes=swap, exe=info.get("exe") if self.exe else None))
        return procs, skipped


def _processes(pids: Iterable[int], skipped: Counter):
    for pid in pids:
        try:
            yield psutil.Process(pid)
        except psutil.NoSuchProcess:
            skipped["vanished"] += 1


def _info(p: psutil.Process, skipped: Counter) -> dict | None:
    try:
        return p.as_dict(_ATTRS)
    except psutil.NoSuchProcess:
        skipped["vanished"] += 1
        return None
