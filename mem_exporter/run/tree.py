"""`run`'s tree: a reader scoped to it, read from its root down through the kernel's child links.

Every thread keeps a list of the children it forked (`/proc/PID/task/TID/children`, kernels with
CONFIG_PROC_CHILDREN): reading those files from the wrapper down finds the whole tree, newcomers
included, and costs what the tree costs however many processes the host runs. As a child subreaper
the wrapper inherits every orphan of its tree, so a member whose parent exits is found under the
wrapper at the next reading. Without those files (or with a source other than procfs) `run` falls
back to parent links from a full listing.

TreeReader is what `run`'s Sampler reads: the source's reader with its processes narrowed to the tree, so a
tick of that Sampler is a sample of the tree (system memory, CPU and the rest as for any sample).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping

from ..grouping import descendants, sum_os_memory
from ..procfs import ProcfsReader, read_all
from ..reader import Reader
from ..sample import GroupSample, ProcessInfo, SystemMemory

log = logging.getLogger(__name__)


def links_available(procfs: str, pid: int) -> bool:
    """Whether this kernel lists a thread's children (the main thread's tid is the pid)."""
    return os.path.exists(f"{procfs.rstrip('/')}/{pid}/task/{pid}/children")


class TreeWalk:
    """Reads the tree under `root` (not counted itself) through child links."""

    def __init__(self, reader: ProcfsReader, procfs: str, root: int):
        self.reader = reader
        self.prefix = procfs.rstrip("/") + "/"
        self.root = root

    def children(self, pid: int) -> list[int]:
        """The pids forked by any of the process's threads (a child's parent is the thread that forked it)."""
        task = f"{self.prefix}{pid}/task/"
        try:
            tids = os.listdir(task)
        except OSError:  # gone
            return []
        out: list[int] = []
        for tid in tids:
            try:
                out.extend(map(int, read_all(f"{task}{tid}/children").split()))
            except (OSError, ValueError):  # the thread exited meanwhile
                continue
        return out

    def read(self, previous: Mapping[int, ProcessInfo]) -> dict[int, ProcessInfo]:
        """Fresh readings of the tree: the known members that are still the same process (pid and start
        time), then everything their and the root's child links reach."""
        reader = self.reader
        members: dict[int, ProcessInfo] = {}
        # a known member stays one even when its parent link is broken (no subreaper: orphans go to init)
        for pid, known in previous.items():
            proc, _ = reader.read_process(pid, keep_open=True)
            if proc is not None and proc.start_time == known.start_time:
                members[pid] = proc
        stack = [self.root, *members]
        while stack:
            parent = stack.pop()
            for pid in self.children(parent):
                if pid in members or pid == self.root:
                    continue
                proc, _ = reader.read_process(pid, keep_open=True)
                # its parent is in the tree (the one it was listed under, or the wrapper or a member that
                # inherited it since): a pid freed and reused between the two reads is someone else's
                if proc is None or not (proc.ppid == parent or proc.ppid == self.root or proc.ppid in members):
                    continue
                members[pid] = proc
                stack.append(pid)
        reader.forget_except(members)  # the reader keeps descriptors for members only
        return members


def tree_members(
    procs: Iterable[ProcessInfo], previous: Mapping[int, ProcessInfo], root: int
) -> dict[int, ProcessInfo]:
    """The tree among fresh readings: known members (same pid and start time) and every process
    whose ppid chain reaches the root or a member."""
    procs = list(procs)
    known = {p.identity for p in previous.values()}
    out = {p.pid: p for p in procs if p.identity in known and p.pid != root}
    out.update((p.pid, p) for p in descendants(procs, [root, *out]))
    return out


def tree_group(members: Iterable[ProcessInfo], pid: int, label: str, memtype: str) -> GroupSample:
    """The tree as one group, keyed by the command's pid, its members largest first."""
    ordered = sorted(members, key=lambda p: p.memory_bytes(memtype), reverse=True)
    return GroupSample(
        key=f"tree:{pid}",
        label=label,
        kind="tree",
        rss_bytes=sum(p.rss_bytes for p in ordered),
        processes=len(ordered),
        members=tuple(ordered),
        pgid=pid,
        footprint_bytes=sum_os_memory(ordered, "footprint"),
        private_bytes=sum_os_memory(ordered, "private"),
    )


class TreeReader:
    """A Reader scoped to the tree under `root` (the wrapper, not counted itself): `read_processes()`
    gives the tree only; system memory and CPU times are the wrapped reader's.

    Through child links (TreeWalk) where the kernel has them and the source is procfs: every reading
    costs what the tree costs. Otherwise (`lists_host`) from parent links: `read_processes()` reads the
    whole host (a walk) and keeps the tree, `read_members()` re-reads the members and the pids new since.
    `members` is the tree of the last reading; a reading that fails leaves it as it was."""

    def __init__(self, reader: Reader, procfs: str, root: int):
        self.reader = reader
        self.root = root
        self.members: dict[int, ProcessInfo] = {}
        self._seen: set[int] = set()  # pids listed once: one outside the tree then never joins it
        self.walk: TreeWalk | None = None  # None: parent links from full listings (the fallback)
        if isinstance(reader, ProcfsReader) and links_available(procfs, root):
            self.walk = TreeWalk(reader, procfs, root)

    @property
    def lists_host(self) -> bool:
        """Whether a full reading lists and reads every process of the host (no child links)."""
        return self.walk is None

    def read_system(self) -> SystemMemory:
        return self.reader.read_system()

    def read_cpu_times(self) -> tuple[float, float]:
        return self.reader.read_cpu_times()

    def pids(self) -> list[int]:
        return list(self.members)

    def read_processes(self, pids: Iterable[int] | None = None) -> tuple[list[ProcessInfo], Counter]:
        """The tree, read afresh (`pids`: those of its members only)."""
        if pids is not None:
            return self.reader.read_processes([pid for pid in pids if pid in self.members])
        if self.walk is not None:
            self.members = self.walk.read(self.members)
            return list(self.members.values()), Counter()
        procs, skipped = self.reader.read_processes()
        self._seen = {p.pid for p in procs}
        self.members = tree_members(procs, self.members, self.root)
        return list(self.members.values()), skipped

    def read_members(self) -> None:
        """Between full readings: the tree through child links, or (from parent links) the members
        plus the pids new since the last listing; the fresh tree is `members`."""
        if self.walk is not None:
            self.members = self.walk.read(self.members)  # OSError: the caller counts it
            return
        reader = self.reader
        try:
            procs, _ = reader.read_processes(list(self.members))
            fresh = [pid for pid in reader.pids() if pid not in self._seen and pid not in self.members]
            self._seen.update(fresh)  # read once: one outside the tree now never joins it
            if fresh:
                procs += reader.read_processes(fresh)[0]
            self.members = tree_members(procs, self.members, self.root)
        except OSError as e:
            log.debug("fast read failed: %s", e)

    def uptime(self) -> float | None:
        return self.reader.uptime()

    def newest_pid(self) -> bytes | None:
        return self.reader.newest_pid()

    def ancestors(self, pid: int) -> frozenset[int]:
        return self.reader.ancestors(pid)

    def forget_except(self, live: Iterable[int]) -> None:
        self.reader.forget_except(live)

    def close(self) -> None:
        self.reader.close()
