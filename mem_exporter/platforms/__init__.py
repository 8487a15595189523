"""What only one desktop OS offers, each call behind a small seam of its own.

- `macos.py`: a process's physical footprint (`proc_pid_rusage`, `ri_phys_footprint`: Activity
  Monitor's Memory column) and the kernel's memory pressure level (`kern.memorystatus_vm_pressure_level`).
- `windows.py`: a process's commit charge (`PrivateUsage`, Task Manager's Commit size), the system's
  commit charge and limit (`GetPerformanceInfo`), per-process GPU memory (the `GPU Process Memory`
  performance counters through PDH), and Job Objects for `run`.

Each OS call is one function that takes its library as a parameter (ctypes' CDLL/WinDLL by default),
and each answer is parsed by a pure function, so the parsing runs on any OS against recorded bytes.
`PLATFORM` is the OS the code acts for: `sys.platform`, forced in tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PLATFORM = sys.platform

# the per-process memory each OS shows its users, and that `run -t` limits there by default
NATIVE_MEMTYPE = {"darwin": "footprint", "win32": "private"}


def native_memtype(platform: str | None = None) -> str:
    """footprint on macOS, private on Windows, rss elsewhere."""
    return NATIVE_MEMTYPE.get(PLATFORM if platform is None else platform, "rss")


ProcessMemory = Callable[[int, Any], "int | None"]  # (pid, psutil memory_info) -> bytes, None if unreadable


def process_memory(platform: str | None = None) -> tuple[str, ProcessMemory] | None:
    """(memtype, reader) of the OS's own per-process number, read beside RSS; None where there is none."""
    memtype = native_memtype(platform)
    if memtype == "footprint":
        from . import macos

        return memtype, lambda pid, _info: macos.footprint(pid)
    if memtype == "private":
        from . import windows

        return memtype, lambda pid, info: windows.private_bytes(pid, info)
    return None


def read_system_extra(platform: str | None = None) -> dict[str, int | None]:
    """SystemMemory fields only this OS has: the pressure level (macOS), commit charge and limit (Windows).
    Empty elsewhere; a value that cannot be read is left out (None)."""
    platform = PLATFORM if platform is None else platform
    if platform == "darwin":
        from . import macos

        return {"pressure_level": macos.pressure_level()}
    if platform == "win32":
        from . import windows

        commit = windows.commit()
        return {"commit_bytes": commit[0], "commit_limit_bytes": commit[1]} if commit else {}
    return {}
