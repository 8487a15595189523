"""macOS: a process's physical footprint and the kernel's memory pressure level, through libproc and sysctl.

Footprint (`ri_phys_footprint` of `proc_pid_rusage`) is what Activity Monitor's Memory column and
Bun's memory report show: the process's dirty anonymous memory plus what of it the compressor holds
(and IOKit/graphics memory it owns). RSS leaves compressed pages out, so on a Mac under pressure a
process's footprint is often twice its RSS. No root is needed for one's own processes; another user's
answer EPERM (None here: the process is then limited by RSS).

The pressure level is the one the kernel acts on (jetsam, `memory_pressure`): 1 normal, 2 warn,
4 critical. macOS has no MemAvailable: psutil's `available` there is free + inactive pages (the
file cache that can be dropped), which is neither counted compressed memory nor what the kernel
uses to decide when to kill, hence the level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from typing import Any

RUSAGE_INFO_V2 = 2
RUSAGE_INFO_V2_SIZE = 160  # bytes of struct rusage_info_v2 (<sys/resource.h>)
# rusage_info_v2: uint8 ri_uuid[16], then uint64s: user_time, system_time, pkg_idle_wkups,
# interrupt_wkups, pageins, wired_size, resident_size, phys_footprint, ...
RESIDENT_OFFSET = 16 + 6 * 8
FOOTPRINT_OFFSET = 16 + 7 * 8

PRESSURE_SYSCTL = b"kern.memorystatus_vm_pressure_level"
PRESSURE_LEVELS = {1: "normal", 2: "warn", 4: "critical"}
LEVEL_OF_NAME = {name: level for level, name in PRESSURE_LEVELS.items()}

_libs: dict[str, Any] = {}


def _lib(name: str) -> Any:
    """libproc / libc, opened once (ctypes.CDLL; on macOS both live in libSystem)."""
    if name not in _libs:
        path = ctypes.util.find_library(name) or f"/usr/lib/lib{name}.dylib"
        _libs[name] = ctypes.CDLL(path, use_errno=True)
    return _libs[name]


def parse_rusage(raw: bytes) -> tuple[int, int]:
    """(resident, phys_footprint) bytes from a struct rusage_info_v2 as proc_pid_rusage fills it."""
    if len(raw) < FOOTPRINT_OFFSET + 8:
        raise ValueError(f"rusage_info is {len(raw)} bytes, need at least {FOOTPRINT_OFFSET + 8}")
    resident, footprint = struct.unpack_from("<QQ", raw, RESIDENT_OFFSET)
    return resident, footprint


def footprint(pid: int, lib: Any = None) -> int | None:
    """The process's phys_footprint in bytes; None when it is gone or not ours to read (EPERM)."""
    buf = ctypes.create_string_buffer(RUSAGE_INFO_V2_SIZE)
    try:
        libproc = lib if lib is not None else _lib("proc")
        if libproc.proc_pid_rusage(ctypes.c_int(pid), ctypes.c_int(RUSAGE_INFO_V2), buf) != 0:
            return None
    except (OSError, AttributeError):  # no libproc, or one without the call (not macOS)
        return None
    return parse_rusage(buf.raw)[1]


def parse_pressure_level(raw: bytes) -> int:
    """The sysctl's value: a native-endian int32 (little-endian on every Mac there is)."""
    if len(raw) != 4:
        raise ValueError(f"{PRESSURE_SYSCTL.decode()} is {len(raw)} bytes, expected 4")
    return struct.unpack("<i", raw)[0]


def pressure_level(lib: Any = None) -> int | None:
    """kern.memorystatus_vm_pressure_level (1 normal, 2 warn, 4 critical); None where it cannot be read."""
    buf = ctypes.create_string_buffer(4)
    size = ctypes.c_size_t(4)
    try:
        libc = lib if lib is not None else _lib("c")
        if libc.sysctlbyname(PRESSURE_SYSCTL, buf, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
            return None
    except (OSError, AttributeError):  # not macOS: no such call
        return None
    try:
        return parse_pressure_level(buf.raw[: size.value])
    except ValueError:
        return None
