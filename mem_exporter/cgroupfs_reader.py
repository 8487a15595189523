"""Group memory from the cgroups' own accounts (Linux), for `groups.by: cgroup | container`.

The kernel keeps each cgroup's memory charge; reading it costs two small files per cgroup instead
of two per process. Which number (docs/containers.md, "Which memory a cgroup group shows"):
 * cgroup v2 (a unified hierarchy with the memory controller): `memory.stat` anon + file_mapped,
   and swap from `memory.swap.current`;
 * cgroup v1 (the memory hierarchy): `memory.stat` rss + mapped_file of the cgroup itself (not
   total_*: a process is grouped by its own cgroup, not by its ancestors'), and swap.
That is the anonymous memory and the mapped file pages charged to the cgroup: like the RSS summed
over its processes, except that a page shared by several of them counts once, page cache that no
process maps is left out (memory.current and usage_in_bytes include it), and a shared page is
charged to the cgroup that touched it first.

Membership: each process is read once on first sight (its labels and cgroup), then followed through
the `cgroup.procs` of the cgroups already known; a listing of the procfs root finds new ones.
Processes in the root cgroup, in named groups, or in no container (by: container) are still read
one by one, as is every group whose accounts cannot be read (no memory controller, permissions):
then it is summed from its processes as before.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import NamedTuple

from .config import Groups
from .grouping import group_key, make_group
from .procfs import read_file
from .sample import GroupSample, ProcessInfo

CGROUP_KINDS = ("cgroup", "container", "unit")


class Charge(NamedTuple):
    rss_bytes: int
    swap_bytes: int | None


def _stat(data: bytes) -> dict[bytes, int]:
    out = {}
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if value:
            out[key] = int(value)
    return out


class CgroupAccounts:
    """Where memory accounts are kept on this host (v2 unified with memory, else v1 memory), and how to read
    them. `version` is None where neither is readable: callers then sum processes."""

    def __init__(self, cgroupfs: str = "/sys/fs/cgroup"):
        self.version: int | None = None
        self.root = ""
        for root in (cgroupfs, os.path.join(cgroupfs, "unified")):
            try:
                controllers = read_file(os.path.join(root, "cgroup.controllers")).split()
            except OSError:
                continue
            if b"memory" in controllers:
                self.version, self.root = 2, root
                return
        v1 = os.path.join(cgroupfs, "memory")
        if os.path.isfile(os.path.join(v1, "memory.stat")):
            self.version, self.root = 1, v1

    def path_of(self, pid: int, procfs: str) -> str | None:
        """The process's cgroup in the hierarchy that holds the memory accounts (from /proc/PID/cgroup)."""
        data = read_file(f"{procfs}/{pid}/cgroup").decode(errors="replace")
        for line in data.splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if self.version == 2 and hierarchy == "0" and controllers == "":
                return path
            if self.version == 1 and "memory" in controllers.split(","):
                return path
        return None

    def _dir(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def charge(self, path: str) -> Charge | None:
        """The cgroup's own memory charge, or None (gone, unreadable, the root: no accounts of its own in v2,
        the whole host's in v1)."""
        if self.version is None or path in ("", "/"):
            return None
        d = self._dir(path)
        try:
            stat = _stat(read_file(f"{d}/memory.stat"))
        except (OSError, ValueError):
            return None
        if self.version == 2:
            rss = stat.get(b"anon", 0) + stat.get(b"file_mapped", 0)
            try:
                swap: int | None = int(read_file(f"{d}/memory.swap.current"))
            except (OSError, ValueError):
                swap = None
            return Charge(rss, swap)
        return Charge(stat.get(b"rss", 0) + stat.get(b"mapped_file", 0), stat.get(b"swap"))

    def procs(self, path: str) -> list[int] | None:
        """The processes in the cgroup itself (not its children), or None when it is gone or unreadable."""
        if self.version is None:
            return None
        try:
            with open(f"{self._dir(path)}/cgroup.procs", "rb") as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None


class CgroupSampler:
    """One tick's processes and groups with cgroup groups measured from their accounts. Keeps, per pid,
    the record of its first sight and its cgroup; `reader` is the procfs reader of the sampler."""

    def __init__(self, accounts: CgroupAccounts, procfs: str):
        self.accounts = accounts
        self.procfs = procfs.rstrip("/") or "/"
        self._seen: dict[int, ProcessInfo] = {}  # pid -> first-sight record, its cgroup the accounts' path
        self._keys: dict[int, tuple[str, str]] = {}  # pid -> its group (key, kind), while its cgroup holds
        self.first_sight_reads = 0  # processes read on first sight (labels and cgroup)

    def sample(self, reader, cfg: Groups, memtype: str) -> tuple[list[ProcessInfo], list[GroupSample], Counter]:
        """Every process (as first seen, or read now where summed) and every group; GPUs are for the caller."""
        skipped: Counter = Counter()
        listing = reader.pids()
        live = set(listing)
        seen, keys = self._seen, self._keys
        for pid in [p for p in seen if p not in live]:
            del seen[pid]
            keys.pop(pid, None)
        forget = getattr(reader, "forget_except", None)
        if forget is not None:  # the reader never walks in full here: its cache follows the listing
            forget(live)
        # where each known process is now: the cgroup.procs of every cgroup already known
        where: dict[int, str] = {}
        listed: set[str] = set()
        for path in {p.cgroup for p in seen.values() if p.cgroup not in (None, "/")}:
            inside = self.accounts.procs(path)
            if inside is not None:
                listed.add(path)
                for pid in inside:
                    where[pid] = path
        new = [pid for pid in listing if pid not in seen]
        if new:
            procs, skipped = reader.read_processes(new)
            self.first_sight_reads += len(new)
            for p in procs:
                try:  # no line for the accounts' hierarchy: the reader's own choice stands (likely summed)
                    seen[p.pid] = p._replace(cgroup=self.accounts.path_of(p.pid, self.procfs) or p.cgroup)
                except OSError:
                    continue
        by_key: dict[str, tuple[str, list[ProcessInfo]]] = {}
        per_process: list[int] = []
        for pid, p in seen.items():
            now_in = where.get(pid)
            if now_in is None and p.cgroup in listed:  # left its cgroup for one not known yet
                try:
                    now_in = self.accounts.path_of(pid, self.procfs)
                except OSError:
                    continue
            if now_in is not None and now_in != p.cgroup:
                p = seen[pid] = p._replace(cgroup=now_in)
                keys.pop(pid, None)
            kk = keys.get(pid)
            if kk is None:
                kk = keys[pid] = group_key(p, cfg)
            if kk[1] not in CGROUP_KINDS or p.cgroup in (None, "/"):
                per_process.append(pid)
            else:
                by_key.setdefault(kk[0], (kk[1], []))[1].append(p)
        groups: list[GroupSample] = []
        fresh, more = reader.read_processes(per_process) if per_process else ([], Counter())
        skipped += more
        summed: dict[str, tuple[str, list[ProcessInfo]]] = {}
        for p in fresh:
            if p.pid in seen:
                p = p._replace(cgroup=seen[p.pid].cgroup)
            key, kind = keys.get(p.pid) or group_key(p, cfg)
            summed.setdefault(key, (kind, []))[1].append(p)
        for key, (kind, members) in by_key.items():
            charges = [self.accounts.charge(path) for path in {p.cgroup for p in members if p.cgroup}]
            if any(c is None for c in charges):  # no accounts to be had: read and sum its processes
                read, more = reader.read_processes([p.pid for p in members])
                skipped += more
                fresh += read
                summed.setdefault(key, (kind, []))[1].extend(read)
                continue
            group = make_group(key, kind, members, memtype)  # labels and members as of first sight
            swaps = [c.swap_bytes for c in charges if c is not None and c.swap_bytes is not None]
            rss = sum(c.rss_bytes for c in charges if c is not None)
            swap = sum(swaps) if swaps else None
            groups.append(dataclasses.replace(group, rss_bytes=rss, pss_bytes=None, swap_bytes=swap))
        groups += [make_group(key, kind, members, memtype) for key, (kind, members) in summed.items()]
        read_now = {p.pid for p in fresh}
        procs = [p for p in seen.values() if p.pid not in read_now] + fresh
        return procs, groups, skipped

    def key_of_pid(self) -> dict[int, str]:
        return {pid: kk[0] for pid, kk in self._keys.items()}
