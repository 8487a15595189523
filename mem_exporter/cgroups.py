"""A cgroup of its own for `run`'s command: made, joined, limited, read, killed and removed here.

Linux only. The new cgroups are children of the cgroup this process is in, in each hierarchy
(/proc/self/cgroup), as a nested scope would be:

    cgroup v2 (mounted at ROOT, or ROOT/unified on hybrid hosts)
        cgroup.kill    SIGKILL to every member at once, forks included (kernel 5.14+)
        memory.max     the kernel limit, where the memory controller is delegated to the new cgroup
        memory.stat    anon + file_mapped: the charge read back
    cgroup v1 (ROOT/memory and ROOT/freezer), for what v2 lacks here
        memory.limit_in_bytes   the kernel limit
        memory.stat             rss + mapped_file: the charge read back
        freezer.state           FROZEN, SIGKILL to every member, THAWED: no member can fork or exit
                                in between, so none escapes and no pid is reused

The charge read back counts each page once, for the cgroup that first touched it: anonymous memory
plus file pages mapped by a member. Summed RSS counts a page shared by N members N times (forks,
shared memory, libraries), so the charge is usually lower; page cache that no member maps is in
neither. The kernel limit is on the cgroup's whole usage (page cache included, which the kernel
reclaims before it kills), so it is a backstop set above the limit `run` itself enforces.

Who may: root, or a user who may write a delegated cgroup v2 subtree (`systemd-run --user --scope
-p Delegate=yes`). Anything else (read-only, missing, no permission) leaves `run` as it was: the
reason is kept in `Made.why`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .cgroupfs_reader import charge_of
from .facilities import cgroup2_mount
from .procfs import read_file
from .signals import SIGKILL

DEFAULT_ROOT = "/sys/fs/cgroup"
V2, MEMORY, FREEZER = "v2", "memory", "freezer"  # the hierarchies used, by what they are used for
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # Linux only, like the module; imported (never used) everywhere


@dataclass(frozen=True)
class Request:
    """What `run` asks for: a cgroup named `name` in each hierarchy that has one, limited to `limit` bytes."""

    name: str
    limit: int | None = None
    root: str = DEFAULT_ROOT
    procfs: str = "/proc"


def own_paths(procfs: str = "/proc", pid: int | str = "self") -> dict[str, str]:
    """Where a process sits in each hierarchy: {"v2": path} for the unified one, {controller: path} for v1."""
    out: dict[str, str] = {}
    with open(f"{procfs}/{pid}/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            if parts[0] == "0" and not controllers:
                out[V2] = path
            for c in controllers.split(","):
                if c:
                    out[c] = path
    return out


def mounts(root: str = DEFAULT_ROOT) -> dict[str, str]:
    """The hierarchies under `root` that `run` can use: v2 (ROOT itself or ROOT/unified), v1 memory, v1 freezer."""
    out = {}
    v2 = cgroup2_mount(root)
    if v2 is not None:
        out[V2] = v2
    memory, freezer = os.path.join(root, MEMORY), os.path.join(root, FREEZER)
    if os.path.isfile(os.path.join(memory, "memory.limit_in_bytes")):
        out[MEMORY] = memory
    # a v1 freezer keeps freezer.state only below its root: the root is known by cgroup.procs without v2's files
    if os.path.isfile(os.path.join(freezer, "cgroup.procs")) and not os.path.exists(
        os.path.join(freezer, "cgroup.controllers")
    ):
        out[FREEZER] = freezer
    return out


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | _CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _stat(path: str) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.isdigit():
            out[key] = int(value)
    return out


@dataclass
class Made:
    """The cgroups made for one command, by use (v2 / memory / freezer); `why` says why there are none or fewer."""

    dirs: dict[str, str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)  # by use, as /proc/PID/cgroup names them
    limit_file: str | None = None  # where the kernel limit was written
    who: str = ""  # "root" | "delegated subtree"
    why: str = ""

    def __bool__(self) -> bool:
        return bool(self.dirs)

    # --- joining, in the child between fork and exec --------------------------------------------
    def join(self) -> None:
        """Move the calling process into every cgroup made (called in the child before exec)."""
        for d in self.dirs.values():
            _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

    def holds(self, pid: int, procfs: str = "/proc") -> bool:
        """Whether the kernel says `pid` is in every cgroup made (its /proc/PID/cgroup, not our files:
        a directory that only looks like a cgroup filesystem proves nothing)."""
        try:
            where = own_paths(procfs, pid)
        except OSError:
            return False
        return all(where.get(kind) == path for kind, path in self.paths.items())

    def describe(self) -> dict:
        """For the run log's header."""
        return {"dirs": list(self.dirs.values()), "limit_file": self.limit_file, "who": self.who}

    # --- reading --------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every process in the cgroups made (the one that kills, or any)."""
        out: set[int] = set()
        for d in self.dirs.values():
            try:
                out.update(int(x) for x in _read(os.path.join(d, "cgroup.procs")).split())
            except (OSError, ValueError):
                continue
        return sorted(out)

    def charge(self) -> int | None:
        """Anonymous memory plus mapped file pages charged to the cgroup (see the module's docstring)."""
        try:
            if V2 in self.dirs and os.path.exists(os.path.join(self.dirs[V2], "memory.stat")):
                return charge_of(read_file(os.path.join(self.dirs[V2], "memory.stat")), 2)
            if MEMORY in self.dirs:  # a leaf: its own rss is its whole tree's
                return charge_of(read_file(os.path.join(self.dirs[MEMORY], "memory.stat")), 1)
        except OSError:
            pass
        return None

    def peak(self) -> int | None:
        """The kernel's own high-water mark of the cgroup's usage (page cache included), where it keeps one."""
        for kind, name in ((V2, "memory.peak"), (MEMORY, "memory.max_usage_in_bytes")):
            if kind in self.dirs:
                try:
                    return int(_read(os.path.join(self.dirs[kind], name)))
                except (OSError, ValueError):
                    continue
        return None

    def oom_kills(self) -> int:
        """How many processes the kernel killed at the cgroup's limit (v2 memory.events, v1 memory.oom_control)."""
        for kind, name in ((V2, "memory.events"), (MEMORY, "memory.oom_control")):
            if kind in self.dirs:
                try:
                    return _stat(os.path.join(self.dirs[kind], name)).get("oom_kill", 0)
                except OSError:
                    continue
        return 0

    # --- killing --------------------------------------------------------------------------------
    def kill(self) -> bool:
        """SIGKILL every member, atomically: cgroup.kill (v2), else freeze, SIGKILL each, thaw (v1)."""
        if V2 in self.dirs:
            try:
                _write(os.path.join(self.dirs[V2], "cgroup.kill"), "1")
                return True
            except OSError:
                pass
        if FREEZER in self.dirs:
            return freeze_kill(self.dirs[FREEZER])
        return False

    def populated(self) -> bool | None:
        """cgroup v2's own word on whether any process is left (`populated` in `cgroup.events`, which counts
        a process until it has exited, zombies not); None without v2."""
        if V2 not in self.dirs:
            return None
        try:
            for line in _read(os.path.join(self.dirs[V2], "cgroup.events")).splitlines():
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
        except OSError:
            pass
        return None

    def wait_empty(self, timeout: float) -> list[int]:
        """Wait until no process is left in the cgroups; the pids still there."""
        deadline = time.monotonic() + timeout
        while (left := self.pids()) and time.monotonic() < deadline:
            if self.populated() is False:  # the kernel says so before every cgroup.procs is updated
                return []
            time.sleep(0.01)
        return left

    def drop(self, kind: str) -> None:
        os.rmdir(self.dirs.pop(kind))
        del self.paths[kind]

    def remove(self) -> list[str]:
        """rmdir every cgroup made (they must be empty); the ones left behind."""
        kept = []
        for d in self.dirs.values():
            for _ in range(50):  # a member just killed may still be leaving
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        kept.append(d)
                        break
                    time.sleep(0.02)
            else:
                kept.append(d)
        self.dirs = {k: d for k, d in self.dirs.items() if d in kept}
        self.paths = {k: p for k, p in self.paths.items() if k in self.dirs}
        return kept


def freeze_kill(freezer_dir: str, timeout: float = 2.0) -> bool:
    """cgroup v1 freezer: freeze the cgroup (no member forks or exits), SIGKILL each member, thaw."""
    state = os.path.join(freezer_dir, "freezer.state")
    try:
        _write(state, "FROZEN")
        deadline = time.monotonic() + timeout
        while _read(state).strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in _read(os.path.join(freezer_dir, "cgroup.procs")).split():
            try:
                os.kill(int(pid), SIGKILL)  # frozen in our cgroup: the pid cannot be reused meanwhile
            except (ProcessLookupError, ValueError):
                pass
        return True
    except OSError:
        return False
    finally:
        try:
            _write(state, "THAWED")
        except OSError:
            pass


def make(request: Request, uses: Iterable[str] = (V2, MEMORY, FREEZER)) -> Made:
    """A cgroup named `request.name` below this process's own, in each usable hierarchy, limited where
    a memory controller is there. Made() with `why` when none could be made (nothing is left behind)."""
    made = Made(who="root" if getattr(os, "geteuid", lambda: -1)() == 0 else "delegated subtree")
    try:
        own = own_paths(request.procfs)
    except OSError as e:
        made.why = f"cannot read {request.procfs}/self/cgroup: {e.strerror or e}"
        return made
    found = mounts(request.root)
    wanted = [k for k in uses if k in found and k in own]
    if not wanted:
        made.why = f"no usable cgroup hierarchy under {request.root}"
        return made
    problems = []
    for kind in wanted:
        parent = os.path.join(found[kind], own[kind].strip("/"))
        d = os.path.join(parent, request.name)
        try:
            try:
                os.mkdir(d)
            except FileExistsError:  # left empty by a killed wrapper that had our pid: only an empty one goes
                os.rmdir(d)
                os.mkdir(d)
        except OSError as e:
            problems.append(f"{parent}: {e.strerror or e}")
            continue
        made.dirs[kind] = d
        made.paths[kind] = f"{own[kind].rstrip('/')}/{request.name}"
    has_v2_memory = V2 in made.dirs and os.path.exists(os.path.join(made.dirs[V2], "memory.max"))
    if MEMORY in made.dirs and has_v2_memory:  # one limit is enough: v2's, where it is delegated
        made.drop(MEMORY)
    if FREEZER in made.dirs and V2 in made.dirs and os.path.exists(os.path.join(made.dirs[V2], "cgroup.kill")):
        made.drop(FREEZER)  # cgroup.kill does what the freezer would
    if request.limit is not None:
        target = (
            os.path.join(made.dirs[V2], "memory.max")
            if has_v2_memory
            else os.path.join(made.dirs[MEMORY], "memory.limit_in_bytes")
            if MEMORY in made.dirs
            else None
        )
        if target is not None:
            try:
                _write(target, str(request.limit))
                made.limit_file = target
            except OSError as e:
                problems.append(f"{target}: {e.strerror or e}")
    if not made.dirs:
        made.why = "; ".join(problems) or "nothing to make"
    elif problems:
        made.why = "; ".join(problems)
    return made
