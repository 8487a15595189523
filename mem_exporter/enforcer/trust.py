"""What the enforcer believes about a process before sparing it: only what a local user cannot forge.

Built-in protection (policy.builtin_protection) asks the running system, never a name alone:

- root: the real and the effective uid are 0 (the `Uid:` line of /proc/PID/status) and the process
  lives in our own user namespace. Inside a user namespace a user is "root" of nothing: the kernel
  shows us the uid it maps to, and the namespace differs.
- the executable: the file the process runs (stat through /proc/PID/exe, which reaches the file even
  after an upgrade deleted or replaced it) belongs to root and nobody else may write it, nor any
  directory above its path, seen from the process's own root (a container's files for a container).
  The name that counts is that path's last part: a bind mount in a user's mount namespace renames
  a file, but such a process is not root.
- the cgroup: its directory, every one above it and its `cgroup.procs` belong to root and nobody
  else may write them. Moving a process into a cgroup needs write access to that `cgroup.procs`,
  so no user put a process there (one a root unit started may still have forked it: the unit rule
  asks for root as well).

Each answer is True, False, or None when the enforcer may not look (an unprivileged enforcer and
another user's process): the policy decides what the benefit of the doubt is worth.
"""

from __future__ import annotations

import os

from ..facilities import cgroup2_mount
from ..sample import ProcessInfo

DELETED = " (deleted)"


def _owned_by_root(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


class Inspector:
    """The three questions above, asked of one process through `procfs` and `cgroupfs`."""

    def __init__(self, procfs: str = "/proc", cgroupfs: str = "/sys/fs/cgroup"):
        self.procfs = procfs.rstrip("/") or "/"
        self.cgroupfs = cgroupfs.rstrip("/") or "/"
        try:
            st = os.stat(f"{self.procfs}/self/ns/user")
            self.user_ns: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:  # no namespaces to compare (a fixture tree, an old kernel): nobody counts as root
            self.user_ns = None

    def is_root(self, p: ProcessInfo) -> bool | None:
        """Real and effective uid 0 in our user namespace."""
        base = f"{self.procfs}/{p.pid}"
        try:
            with open(f"{base}/status", "rb") as f:
                status = f.read()
        except OSError:
            return False  # gone
        uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith(b"Uid:")), None)
        if uids != [b"0", b"0"]:
            return False
        try:
            st = os.stat(f"{base}/ns/user")
        except PermissionError:
            return None  # a namespace link needs ptrace access: an unprivileged enforcer may not look
        except OSError:
            return False
        return self.user_ns is not None and (st.st_dev, st.st_ino) == self.user_ns

    def exe(self, p: ProcessInfo) -> tuple[str | None, bool | None]:
        """(the executable's path, " (deleted)" dropped; whether root alone owns it and its directories)."""
        base = f"{self.procfs}/{p.pid}"
        try:
            link = os.readlink(f"{base}/exe")
        except PermissionError:
            return None, None
        except OSError:
            return None, False  # gone, or no executable (a kernel thread)
        path = link.removesuffix(DELETED)
        if not path.startswith("/"):
            return path, False
        try:
            if not _owned_by_root(os.stat(f"{base}/exe")):  # the very file it runs, deleted or not
                return path, False
            return path, _dirs_owned_by_root(f"{base}/root", os.path.dirname(path))
        except PermissionError:
            return path, None
        except OSError:
            return path, False

    def cgroup(self, p: ProcessInfo) -> tuple[str | None, bool | None]:
        """(the cgroup path as `groups.by: cgroup` names it; whether root alone owns it, its parents and
        its cgroup.procs, so that no user can have moved the process there)."""
        from ..procfs import parse_cgroup

        try:
            with open(f"{self.procfs}/{p.pid}/cgroup", "rb") as f:
                data = f.read()
        except PermissionError:
            return None, None
        except OSError:
            return None, False
        path = parse_cgroup(data)
        if not path:
            return None, False
        v2 = any(line == b"0::" + path.encode() for line in data.splitlines())  # else the v1 memory controller's
        mount = self._v2_mount() if v2 else f"{self.cgroupfs}/memory"
        if mount is None or ".." in path.split("/"):
            return path, False
        try:
            if not _dirs_owned_by_root(mount, path):
                return path, False
            return path, _owned_by_root(os.stat(f"{mount}{path.rstrip('/')}/cgroup.procs"))
        except OSError:
            return path, False

    def _v2_mount(self) -> str | None:
        """The cgroup2 hierarchy: `cgroupfs` itself (unified hosts) or `cgroupfs/unified` (hybrid ones)."""
        return cgroup2_mount(self.cgroupfs)


def _dirs_owned_by_root(root: str, path: str) -> bool:
    """`path` (below `root`) and every directory above it: owned by root, not writable by group or others.
    Not followed: a symlink on the way is itself checked (and fails: links are mode 0777)."""
    parts = [x for x in path.split("/") if x]
    for i in range(len(parts), -1, -1):
        if not _owned_by_root(os.stat(root + "/" + "/".join(parts[:i]), follow_symlinks=False)):
            return False
    return True
