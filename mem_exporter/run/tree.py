"""`run`'s tree read from its root down through the kernel's child links, never by listing the host.

Every thread keeps a list of the children it forked (`/proc/PID/task/TID/children`, kernels with
CONFIG_PROC_CHILDREN): reading those files from the wrapper down finds the whole tree, newcomers
included, and costs what the tree costs however many processes the host runs. As a child subreaper
the wrapper inherits every orphan of its tree, so a member whose parent exits is found under the
wrapper at the next reading. Without those files (or with a source other than procfs) `run` falls
back to parent links from a full listing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..procfs import ProcfsReader, read_all
from ..sample import ProcessInfo


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
