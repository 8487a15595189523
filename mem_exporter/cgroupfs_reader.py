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

Membership: the `cgroup.procs` of every cgroup of that hierarchy, each tick (no listing of the
procfs root); a process is read once, on first sight, for its labels. Processes in the root cgroup,
in named groups, or in no container (by: container) are still read one by one each tick, as is
every group whose accounts cannot be read (gone, permissions): then it is summed from its
processes as before. Without a memory hierarchy the sampler does not use this module at all.
A pid that exits and is handed to a new process between two ticks keeps its first record (labels)
until it leaves the tree; the enforcer re-checks identity before any signal.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from typing import NamedTuple

from .config import Groups
from .grouping import group_key, make_group
from .procfs import read_all, read_file
from .reader import Reader
from .sample import GroupSample, ProcessInfo

CGROUP_KINDS = ("cgroup", "container", "unit")


class Charge(NamedTuple):
    rss_bytes: int
    swap_bytes: int | None


# the memory.stat lines a charge needs (v2: anon, file_mapped; v1: rss, mapped_file, swap), by regex: fast
_STAT_KEYS = re.compile(rb"^(anon|file_mapped|rss|mapped_file|swap) (\d+)$", re.M)
RESCAN = 30  # ticks between full walks of the cgroup tree (in between, only directories whose subdirectory count moved)


def _stat(data: bytes) -> dict[bytes, int]:
    return {k: int(v) for k, v in _STAT_KEYS.findall(data)}


def charge_of(memory_stat: bytes, version: int) -> int:
    """Anonymous memory plus mapped file pages in a cgroup's own `memory.stat`: v2 anon + file_mapped,
    v1 rss + mapped_file."""
    stat = _stat(memory_stat)
    if version == 2:
        return stat.get(b"anon", 0) + stat.get(b"file_mapped", 0)
    return stat.get(b"rss", 0) + stat.get(b"mapped_file", 0)


class CgroupAccounts:
    """Where memory accounts are kept on this host (v2 unified with memory, else v1 memory), and how to read
    them. `version` is None where neither is readable: callers then sum processes."""

    def __init__(self, cgroupfs: str = "/sys/fs/cgroup"):
        self.version: int | None = None
        self.root = ""
        self._dirs: dict[str, str] = {}  # cgroup path -> its directory
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

    def _dir(self, path: str) -> str:
        d = self._dirs.get(path)
        if d is None:
            if len(self._dirs) > 100_000:  # cgroups come and go: never more than a bounded memo
                self._dirs.clear()
            d = self._dirs[path] = os.path.join(self.root, path.lstrip("/"))
        return d

    def charge(self, path: str) -> Charge | None:
        """The cgroup's own memory charge, or None (gone, unreadable, the root: no accounts of its own in v2,
        the whole host's in v1)."""
        if self.version is None or path in ("", "/"):
            return None
        d = self._dir(path)
        try:
            data = read_file(f"{d}/memory.stat")
        except OSError:
            return None
        rss = charge_of(data, self.version)
        if self.version == 2:
            try:
                swap: int | None = int(read_file(f"{d}/memory.swap.current"))
            except (OSError, ValueError):
                swap = None
            return Charge(rss, swap)
        return Charge(rss, _stat(data).get(b"swap"))

    def procs(self, path: str) -> list[int] | None:
        """The processes in the cgroup itself (not its children), or None when it is gone or unreadable."""
        raw = self.procs_raw(path)
        return None if raw is None else [int(x) for x in raw.split()]

    def procs_raw(self, path: str) -> bytes | None:
        if self.version is None:
            return None
        try:
            return read_all(f"{self._dir(path)}/cgroup.procs")
        except OSError:
            return None

    def tree(self, known: dict[str, tuple[int, list[str]]] | None = None) -> dict[str, tuple[int, list[str]]]:
        """Every cgroup of the hierarchy (the root is "/") -> (its directory's link count: 2 + its
        subdirectories, its subdirectories). With `known` (an earlier answer), only directories whose
        count moved are listed again."""
        out: dict[str, tuple[int, list[str]]] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            path = rel or "/"
            try:
                nlink = os.stat(self.root + rel).st_nlink
            except OSError:
                continue
            before = known.get(path) if known is not None else None
            if before is not None and before[0] == nlink:  # the same subdirectories, as far as a count tells
                children = before[1]
            else:
                try:
                    with os.scandir(self.root + rel) as it:
                        children = [f"{rel}/{e.name}" for e in it if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
            out[path] = (nlink, children)
            stack += children
        return out


class _Cgroup:
    """What a cgroup held at its last reading: its cgroup.procs as read, and its processes by group."""

    __slots__ = ("raw", "pids", "accounted", "per_process")

    def __init__(self, raw: bytes, pids: list[int]):
        self.raw, self.pids = raw, pids
        self.accounted: dict[str, tuple[str, list[ProcessInfo]]] = {}  # key -> (kind, members): from accounts
        self.per_process: list[int] = []  # named groups, PGID groups, the root cgroup: read and summed


class CgroupSampler:
    """One tick's processes and groups, cgroup groups measured from their accounts. Membership is the
    cgroup.procs of every cgroup in the hierarchy (no listing of procfs, whose root is slow to list on
    a busy host); a process is read once on first sight (its labels); a cgroup whose cgroup.procs has
    not changed costs two reads and no work per process. `reader` is the sampler's procfs reader."""

    def __init__(self, accounts: CgroupAccounts, procfs: str):
        self.accounts = accounts
        self.procfs = procfs.rstrip("/") or "/"
        self._seen: dict[int, ProcessInfo] = {}  # pid -> first-sight record, its cgroup the accounts' path
        self._unwatched: set[int] = set()  # kernel threads, unreadable: not read again while they live
        self._cgroups: dict[str, _Cgroup] = {}
        self._tree: dict[str, tuple[int, list[str]]] = {}
        self._ticks = 0
        self._made: dict[str, tuple[tuple[int, ...], GroupSample]] = {}  # key -> (its entries' ids, group)
        self.first_sight_reads = 0  # processes read on first sight (labels)

    def sample(self, reader: Reader, cfg: Groups, memtype: str) -> tuple[list[ProcessInfo], list[GroupSample], Counter]:
        """Every process (as first seen, or read now where summed) and every group; GPUs are for the caller."""
        skipped: Counter = Counter()
        seen = self._seen
        current = self._cgroups = self._walk(reader, cfg, skipped)
        alive: set[int] = set()
        for entry in current.values():
            alive.update(entry.pids)
        gone = seen.keys() - alive
        if gone or not self._unwatched <= alive:  # some are gone: forget them
            for pid in gone:
                del seen[pid]
            self._unwatched &= alive
            reader.forget_except(alive)  # the reader never walks in full here: its cache follows the cgroups
        by_key: dict[str, tuple[str, list[ProcessInfo]]] = {}
        charges: dict[str, list[Charge | None]] = {}
        sources: dict[str, list[int]] = {}
        per_process: list[int] = []
        for path, entry in current.items():
            per_process += entry.per_process
            if entry.accounted:
                charge = self.accounts.charge(path)
                for key, (kind, members) in entry.accounted.items():
                    by_key.setdefault(key, (kind, []))[1].extend(members)
                    charges.setdefault(key, []).append(charge)
                    sources.setdefault(key, []).append(id(entry))
        fresh, more = reader.read_processes(per_process) if per_process else ([], Counter())
        skipped += more
        groups: list[GroupSample] = []
        made_now: dict[str, tuple[tuple[int, ...], GroupSample]] = {}
        summed: dict[str, tuple[str, list[ProcessInfo]]] = {}
        for p in fresh:
            first = seen.get(p.pid)
            p = p._replace(cgroup=first.cgroup) if first is not None else p
            key, kind = group_key(p, cfg)
            summed.setdefault(key, (kind, []))[1].append(p)
        for key, (kind, members) in by_key.items():
            got = charges[key]
            if any(c is None for c in got):  # no accounts to be had: read and sum its processes
                read, more = reader.read_processes([p.pid for p in members])
                skipped += more
                fresh += read
                summed.setdefault(key, (kind, []))[1].extend(read)
                continue
            made = self._made.get(key)
            ids = tuple(sources[key])
            if made is None or made[0] != ids:  # its members changed: labels and members as of first sight
                made = (ids, make_group(key, kind, list(members), memtype))
            made_now[key] = made
            group = made[1]
            swaps = [c.swap_bytes for c in got if c is not None and c.swap_bytes is not None]
            rss = sum(c.rss_bytes for c in got if c is not None)
            swap = sum(swaps) if swaps else None
            groups.append(dataclasses.replace(group, rss_bytes=rss, pss_bytes=None, swap_bytes=swap))
        self._made = made_now
        groups += [make_group(key, kind, members, memtype) for key, (kind, members) in summed.items()]
        if fresh:
            read_now = {p.pid for p in fresh}
            procs = [p for p in seen.values() if p.pid not in read_now] + fresh
        else:
            procs = list(seen.values())
        return procs, groups, skipped

    def _walk(self, reader: Reader, cfg: Groups, skipped: Counter) -> dict[str, _Cgroup]:
        """Every cgroup with processes in it; one whose cgroup.procs reads as before is the entry kept from then."""
        known = self._cgroups
        current: dict[str, _Cgroup] = {}
        self._ticks += 1
        self._tree = self.accounts.tree(None if self._ticks % RESCAN == 1 else self._tree)
        for path in self._tree:
            raw = self.accounts.procs_raw(path)
            if not raw:
                continue
            entry = known.get(path)
            if entry is None or entry.raw != raw:
                entry = self._read_cgroup(path, raw, reader, cfg, skipped)
            current[path] = entry
        return current

    def _read_cgroup(self, path: str, raw: bytes, reader: Reader, cfg: Groups, skipped: Counter) -> _Cgroup:
        """A cgroup whose processes changed: newcomers read on first sight, members sorted into groups."""
        seen = self._seen
        try:
            pids = [int(x) for x in raw.split()]
        except ValueError:  # not a cgroup.procs (a --path.cgroupfs that is not a cgroup filesystem)
            pids = []
        entry = _Cgroup(raw, pids)
        new = [pid for pid in entry.pids if pid not in seen and pid not in self._unwatched]
        if new:
            procs, reasons = reader.read_processes(new)
            skipped += reasons
            self.first_sight_reads += len(new)
            for proc in procs:
                seen[proc.pid] = proc._replace(cgroup=path)
            self._unwatched.update(set(new).difference(p.pid for p in procs))
        for pid in entry.pids:
            p = seen.get(pid)
            if p is None:
                continue
            if p.cgroup != path:  # moved here since its first sight
                p = seen[pid] = p._replace(cgroup=path)
            key, kind = group_key(p, cfg)
            if kind not in CGROUP_KINDS or path == "/":
                entry.per_process.append(pid)
            else:
                entry.accounted.setdefault(key, (kind, []))[1].append(p)
        return entry
