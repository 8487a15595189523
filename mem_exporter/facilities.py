"""Which platform facilities this host has: the one place that probes for them.

- a process source: `procfs` (Linux's /proc, or any tree laid out like it: a fixture) or `psutil`
  (macOS, Windows; forced anywhere). `SOURCES` names them for the config, the CLI and `run`.
- pidfds (`PIDFD`, Linux >= 5.3 with Python >= 3.9): a signal reaches the very process checked.
- prctl (`prctl()`, Linux): PR_SET_CHILD_SUBREAPER (a wrapper stays the parent of its tree's
  orphans) and PR_SET_PDEATHSIG (a child dies with the thread that forked it).
- cgroups (`cgroup2_mount()`, v2 at the root or hybrid's `unified`; v1 hierarchies are looked up by
  the controller a caller needs, as each needs its own file).
- the kernel's process events (`proc_connector_unavailable()`: Linux, root).

Nothing here imports the rest of the project: every layer may ask. Where a branch uses what only one
OS has (os.getpgid, os.geteuid, resource, AF_NETLINK), the code tests `sys.platform` itself: that is
the form mypy narrows by, so tests/test_portability.py can type-check each OS's branch.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Literal, get_args

LINUX = sys.platform.startswith("linux")
PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")

# --- process sources ----------------------------------------------------------------------------

Source = Literal["procfs", "psutil"]
SourceChoice = Literal["auto", "procfs", "psutil"]  # `auto`: resolved by procfs_at()
SOURCES: tuple[str, ...] = get_args(Source)
SOURCE_CHOICES: tuple[str, ...] = get_args(SourceChoice)
assert SOURCE_CHOICES == ("auto", *SOURCES)


def procfs_at(root: str) -> bool:
    """Whether processes are read from a procfs at `root`: this host's /proc where it has one, and any
    other root given (a fixture tree, a host's /proc mounted into a container) as it is."""
    return root != "/proc" or os.path.exists(os.path.join(root, "self", "stat"))


# --- prctl: subreaper, death signal -------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), or None."""
    if not LINUX:
        return None
    import ctypes  # only where there is a prctl to call

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# --- the kernel's process events ---------------------------------------------------------------


def proc_connector_unavailable() -> str | None:
    """Why this process cannot listen to process events here before trying, or None when it may try (the
    kernel's acknowledgement of the subscription settles the rest: it ignores other namespaces)."""
    if sys.platform != "linux":
        return "process events are Linux's"
    if os.geteuid() != 0:
        return "not root"
    return None


# --- cgroups ------------------------------------------------------------------------------------


def cgroup2_mount(cgroupfs: str) -> str | None:
    """The cgroup2 hierarchy: `cgroupfs` itself (unified hosts) or `cgroupfs/unified` (hybrid ones); None."""
    for mount in (cgroupfs, os.path.join(cgroupfs, "unified")):
        if os.path.isfile(os.path.join(mount, "cgroup.controllers")):
            return mount
    return None
