"""Windows: commit charge per process and for the system, per-process GPU memory, Job Objects.

- Per process, `PrivateUsage` (psutil's `memory_info().private`): the commit charge, Task Manager's
  "Commit size". The working set (RSS) leaves out what was paged out; commit is what the process
  holds against the commit limit, and the number that runs a desktop out of memory.
- For the system, `GetPerformanceInfo`: CommitTotal and CommitLimit (RAM plus page files), in pages.
- Per-process GPU memory: NVML reports none under WDDM (every consumer card on Windows), so it comes
  from the performance counters `\\GPU Process Memory(*)\\Dedicated Usage` and `Shared Usage`, read
  through PDH. Their instances are `pid_<pid>_luid_0x<high>_0x<low>_phys_<n>`: one per process, adapter
  (LUID) and physical GPU of a linked adapter.
- Job Objects: `run` starts its command suspended inside a job with KILL_ON_JOB_CLOSE, so the whole
  tree dies when the job's last handle closes: when `run` exits or is killed.

Each call takes its library (kernel32, pdh, ntdll) as a parameter; the structures are parsed by
pure functions, so the parsing runs on any OS.
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

# --- per-process commit charge ----------------------------------------------------------------------


def private_bytes(pid: int, memory_info: Any) -> int | None:
    """PrivateUsage from psutil's memory_info (Windows only has the field); None where it is absent."""
    value = getattr(memory_info, "private", None)
    return int(value) if value is not None else None


# --- system commit charge: GetPerformanceInfo --------------------------------------------------------


class PERFORMANCE_INFORMATION(ctypes.Structure):
    _fields_ = [
        ("cb", ctypes.c_uint32),
        ("CommitTotal", ctypes.c_size_t),
        ("CommitLimit", ctypes.c_size_t),
        ("CommitPeak", ctypes.c_size_t),
        ("PhysicalTotal", ctypes.c_size_t),
        ("PhysicalAvailable", ctypes.c_size_t),
        ("SystemCache", ctypes.c_size_t),
        ("KernelTotal", ctypes.c_size_t),
        ("KernelPaged", ctypes.c_size_t),
        ("KernelNonpaged", ctypes.c_size_t),
        ("PageSize", ctypes.c_size_t),
        ("HandleCount", ctypes.c_uint32),
        ("ProcessCount", ctypes.c_uint32),
        ("ThreadCount", ctypes.c_uint32),
    ]


def parse_performance_info(raw: bytes) -> tuple[int, int]:
    """(commit charge, commit limit) in bytes from a PERFORMANCE_INFORMATION as GetPerformanceInfo fills it."""
    size = ctypes.sizeof(PERFORMANCE_INFORMATION)
    if len(raw) < size:
        raise ValueError(f"PERFORMANCE_INFORMATION is {len(raw)} bytes, need {size}")
    info = PERFORMANCE_INFORMATION.from_buffer_copy(raw[:size])
    return info.CommitTotal * info.PageSize, info.CommitLimit * info.PageSize


def _windll(name: str) -> Any:
    if sys.platform == "win32":
        return ctypes.WinDLL(name, use_last_error=True)
    raise OSError(f"{name}.dll exists on Windows only")


def commit(lib: Any = None) -> tuple[int, int] | None:
    """The system's (commit charge, commit limit) in bytes; None where they cannot be read."""
    try:
        psapi = lib if lib is not None else _windll("psapi")
    except OSError:
        return None
    info = PERFORMANCE_INFORMATION()
    info.cb = ctypes.sizeof(info)
    if not psapi.GetPerformanceInfo(ctypes.byref(info), info.cb):
        return None
    return parse_performance_info(ctypes.string_at(ctypes.addressof(info), ctypes.sizeof(info)))


# --- per-process GPU memory: the GPU Process Memory counters through PDH --------------------------

GPU_COUNTERS = {
    "dedicated": "\\GPU Process Memory(*)\\Dedicated Usage",
    "shared": "\\GPU Process Memory(*)\\Shared Usage",
}
PDH_FMT_LARGE = 0x00000400
PDH_MORE_DATA = 0x800007D2
PDH_NO_DATA = 0x800007D5  # no instance at all (no process holds GPU memory): nothing, not an error
PDH_CSTATUS_VALID = (0, 1)  # PDH_CSTATUS_VALID_DATA, PDH_CSTATUS_NEW_DATA
_INSTANCE = re.compile(r"^pid_(\d+)_luid_0x([0-9a-fA-F]{1,8})_0x([0-9a-fA-F]{1,8})_phys_(\d+)$")


class _PdhValue(ctypes.Union):
    _fields_ = [
        ("longValue", ctypes.c_int32),
        ("doubleValue", ctypes.c_double),
        ("largeValue", ctypes.c_int64),
        ("stringValue", ctypes.c_void_p),
    ]


class PDH_FMT_COUNTERVALUE(ctypes.Structure):
    _fields_ = [("CStatus", ctypes.c_uint32), ("value", _PdhValue)]


class PDH_FMT_COUNTERVALUE_ITEM_W(ctypes.Structure):
    _fields_ = [("szName", ctypes.c_wchar_p), ("FmtValue", PDH_FMT_COUNTERVALUE)]


class GpuInstance(NamedTuple):
    pid: int
    luid: int  # the adapter's LUID, HighPart << 32 | LowPart
    phys: int  # the physical GPU of a linked adapter (0 otherwise)


def parse_instance(name: str) -> GpuInstance | None:
    """`pid_1234_luid_0x00000000_0x0000C2F5_phys_0` -> GpuInstance(1234, 0xC2F5, 0); None for other names."""
    m = _INSTANCE.match(name)
    if m is None:
        return None
    return GpuInstance(int(m[1]), int(m[2], 16) << 32 | int(m[3], 16), int(m[4]))


class GpuUsage(NamedTuple):
    dedicated: int
    shared: int


def rollup(dedicated: Iterable[tuple[str, int]], shared: Iterable[tuple[str, int]]) -> dict[int, dict[int, GpuUsage]]:
    """luid -> pid -> (dedicated, shared) bytes, summed over a linked adapter's physical GPUs.
    Instances whose names are not per-process ones are left out."""
    out: dict[int, dict[int, list[int]]] = {}
    for column, items in ((0, dedicated), (1, shared)):
        for name, value in items:
            inst = parse_instance(name)
            if inst is None or value < 0:
                continue
            out.setdefault(inst.luid, {}).setdefault(inst.pid, [0, 0])[column] += value
    return {luid: {pid: GpuUsage(*v) for pid, v in per.items()} for luid, per in out.items()}


def luid_cards(
    usage: Mapping[int, Mapping[int, GpuUsage]], cards: int, known: Mapping[int, int] | None = None
) -> dict[int, int]:
    """luid -> card index. Adapters whose index is known (`known`: from their PCI address) keep it. The
    rest go by order: the `cards` adapters holding the most dedicated memory (a discrete card holds
    nearly all of it; an integrated GPU and the Basic Render Driver next to nothing; an adapter holding
    none is left out), numbered in LUID order, which is the order the adapters started in. By order, two
    cards of which only the second is in use show it as the first: order is right only when
    every card holds memory."""
    known = dict(known or {})
    free = sorted(set(range(cards)) - set(known.values()))
    held = {luid: sum(u.dedicated for u in per.values()) for luid, per in usage.items()}
    rest = [luid for luid in usage if luid not in known and held[luid] > 0]  # no VRAM held: not a card's to show
    rest.sort(key=lambda luid: held[luid], reverse=True)
    chosen = sorted(rest[: len(free)])
    known.update(zip(chosen, free, strict=False))
    return known


# --- which card an adapter LUID is: D3DKMT's adapter address (PCI bus, device, function) ---------------

KMTQAITYPE_ADAPTERADDRESS = 6


class LUID(ctypes.Structure):
    _fields_ = [("LowPart", ctypes.c_uint32), ("HighPart", ctypes.c_int32)]


class D3DKMT_OPENADAPTERFROMLUID(ctypes.Structure):
    _fields_ = [("AdapterLuid", LUID), ("hAdapter", ctypes.c_uint32)]


class D3DKMT_ADAPTERADDRESS(ctypes.Structure):
    _fields_ = [("BusNumber", ctypes.c_uint32), ("DeviceNumber", ctypes.c_uint32), ("FunctionNumber", ctypes.c_uint32)]


class D3DKMT_QUERYADAPTERINFO(ctypes.Structure):
    _fields_ = [
        ("hAdapter", ctypes.c_uint32),
        ("Type", ctypes.c_uint32),
        ("pPrivateDriverData", ctypes.c_void_p),
        ("PrivateDriverDataSize", ctypes.c_uint32),
    ]


class D3DKMT_CLOSEADAPTER(ctypes.Structure):
    _fields_ = [("hAdapter", ctypes.c_uint32)]


def adapter_address(luid: int, gdi32: Any = None) -> tuple[int, int, int] | None:
    """(PCI bus, device, function) of the adapter with this LUID (D3DKMTOpenAdapterFromLuid, then
    D3DKMTQueryAdapterInfo(KMTQAITYPE_ADAPTERADDRESS)); None for an adapter with no PCI address (the
    Basic Render Driver) or where it cannot be asked."""
    try:
        gdi = gdi32 if gdi32 is not None else _windll("gdi32")
    except OSError:
        return None
    opened = D3DKMT_OPENADAPTERFROMLUID()
    opened.AdapterLuid.LowPart = luid & 0xFFFFFFFF
    opened.AdapterLuid.HighPart = ctypes.c_int32(luid >> 32).value
    if gdi.D3DKMTOpenAdapterFromLuid(ctypes.byref(opened)) != 0:  # NTSTATUS: 0 is success
        return None
    try:
        address = D3DKMT_ADAPTERADDRESS()
        query = D3DKMT_QUERYADAPTERINFO(
            opened.hAdapter, KMTQAITYPE_ADAPTERADDRESS, ctypes.addressof(address), ctypes.sizeof(address)
        )
        if gdi.D3DKMTQueryAdapterInfo(ctypes.byref(query)) != 0:
            return None
        return address.BusNumber, address.DeviceNumber, address.FunctionNumber
    finally:
        gdi.D3DKMTCloseAdapter(ctypes.byref(D3DKMT_CLOSEADAPTER(opened.hAdapter)))


def parse_bus_id(text: str) -> tuple[int, int, int] | None:
    """ "0000:41:00.0" (a card's pci_bus_id) -> (0x41, 0, 0); None when empty or not of that form."""
    m = re.match(r"^(?:[0-9a-fA-F]+:)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$", text)
    return (int(m[1], 16), int(m[2], 16), int(m[3])) if m else None


def known_luids(luids: Iterable[int], bus_ids: Sequence[str], gdi32: Any = None) -> dict[int, int]:
    """luid -> card position, for the adapters whose PCI address is a card's (`bus_ids`: each card's
    pci_bus_id, in card order). Adapters not found keep going by order (`luid_cards`)."""
    cards = {addr: i for i, text in enumerate(bus_ids) if (addr := parse_bus_id(text)) is not None}
    out: dict[int, int] = {}
    for luid in luids:
        address = adapter_address(luid, gdi32)
        if address is not None and address in cards:
            out[luid] = cards[address]
    return out


def counter_items(pdh: Any, counter: Any) -> list[tuple[str, int]]:
    """(instance name, value) of every instance of a counter: PdhGetFormattedCounterArrayW, asked for its
    size first. An instance whose status is not valid is left out."""
    size, count = ctypes.c_uint32(0), ctypes.c_uint32(0)
    status = pdh.PdhGetFormattedCounterArrayW(counter, PDH_FMT_LARGE, ctypes.byref(size), ctypes.byref(count), None)
    if status & 0xFFFFFFFF != PDH_MORE_DATA:
        if status == 0 or status & 0xFFFFFFFF == PDH_NO_DATA:
            return []
        raise OSError(f"PdhGetFormattedCounterArrayW: status 0x{status & 0xFFFFFFFF:08X}")
    buf = (ctypes.c_byte * size.value)()
    status = pdh.PdhGetFormattedCounterArrayW(counter, PDH_FMT_LARGE, ctypes.byref(size), ctypes.byref(count), buf)
    if status != 0:
        raise OSError(f"PdhGetFormattedCounterArrayW: status 0x{status & 0xFFFFFFFF:08X}")
    items = ctypes.cast(buf, ctypes.POINTER(PDH_FMT_COUNTERVALUE_ITEM_W))
    return [
        (items[i].szName or "", int(items[i].FmtValue.value.largeValue))
        for i in range(count.value)
        if items[i].FmtValue.CStatus in PDH_CSTATUS_VALID
    ]


class GpuCounters:
    """One PDH query with both GPU Process Memory counters, opened once and collected on each read."""

    def __init__(self, pdh: Any = None):
        self.pdh = pdh if pdh is not None else _windll("pdh")
        self.query = ctypes.c_void_p()
        self._check(self.pdh.PdhOpenQueryW(None, 0, ctypes.byref(self.query)), "PdhOpenQueryW")
        self.counters: dict[str, ctypes.c_void_p] = {}
        for key, path in GPU_COUNTERS.items():
            handle = ctypes.c_void_p()
            self._check(self.pdh.PdhAddEnglishCounterW(self.query, path, 0, ctypes.byref(handle)), path)
            self.counters[key] = handle

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise OSError(f"{what}: PDH status 0x{status & 0xFFFFFFFF:08X}")

    def read(self) -> dict[int, dict[int, GpuUsage]]:
        """luid -> pid -> usage, now. The counters are raw (not rates): one collection is enough."""
        self._check(self.pdh.PdhCollectQueryData(self.query), "PdhCollectQueryData")
        return rollup(
            counter_items(self.pdh, self.counters["dedicated"]), counter_items(self.pdh, self.counters["shared"])
        )

    def close(self) -> None:
        if self.query:
            self.pdh.PdhCloseQuery(self.query)
            self.query = ctypes.c_void_p()


# --- Job Objects: the whole tree dies with `run` ------------------------------------------------------

CREATE_SUSPENDED = 0x00000004
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9


class JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class IO_COUNTERS(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ReadOperationCount",
            "WriteOperationCount",
            "OtherOperationCount",
            "ReadTransferCount",
            "WriteTransferCount",
            "OtherTransferCount",
        )
    ]


class JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", JOBOBJECT_BASIC_LIMIT_INFORMATION),
        ("IoInfo", IO_COUNTERS),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


def kill_on_close_limits() -> JOBOBJECT_EXTENDED_LIMIT_INFORMATION:
    info = JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    return info


class JobObject:
    """A job that kills every process in it when its last handle closes (KILL_ON_JOB_CLOSE).

    The handle is not inheritable, so only `run` holds it: when `run` ends, however it ends (even
    TerminateProcess from Task Manager), Windows closes it and ends the tree. Children inherit the job:
    processes the tree starts later are inside it too (breakaway is not allowed).

    The command is started suspended (CREATE_SUSPENDED), put in the job, then resumed: it runs no
    instruction outside the job, so nothing it starts can escape. Assigning a process that already
    runs would leave a window in which a child it started is outside the job, and would die with
    `run` only through `run`'s own kill of its tree, not when `run` itself is killed.
    """

    creationflags = CREATE_SUSPENDED

    def __init__(self, kernel32: Any = None, ntdll: Any = None):
        self.kernel32 = kernel32 if kernel32 is not None else _job_kernel32()
        self.ntdll = ntdll if ntdll is not None else _job_ntdll()
        self.handle = self.kernel32.CreateJobObjectW(None, None)
        if not self.handle:
            raise OSError("CreateJobObjectW failed")
        info = kill_on_close_limits()
        if not self.kernel32.SetInformationJobObject(
            self.handle, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info), ctypes.sizeof(info)
        ):
            self.kernel32.CloseHandle(self.handle)
            raise OSError("SetInformationJobObject(KILL_ON_JOB_CLOSE) failed")

    def adopt(self, process_handle: int) -> bool:
        """Put a process started with `creationflags` in the job, then let it run. False when it could not
        be put in the job (it runs anyway: `run` still watches and kills its tree, only not when `run`
        is killed itself)."""
        inside = bool(self.kernel32.AssignProcessToJobObject(self.handle, process_handle))
        if self.ntdll.NtResumeProcess(process_handle) != 0:  # NTSTATUS: 0 is success
            raise OSError("NtResumeProcess failed: the command stays suspended")
        return inside


def _job_kernel32() -> Any:
    """kernel32 with the job calls typed: a HANDLE is pointer-sized, not ctypes' default int."""
    k = _windll("kernel32")
    handle, dword, bool_ = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    k.CreateJobObjectW.restype, k.CreateJobObjectW.argtypes = handle, [ctypes.c_void_p, ctypes.c_wchar_p]
    k.SetInformationJobObject.restype = bool_
    k.SetInformationJobObject.argtypes = [handle, ctypes.c_int, ctypes.c_void_p, dword]
    k.AssignProcessToJobObject.restype, k.AssignProcessToJobObject.argtypes = bool_, [handle, handle]
    k.CloseHandle.restype, k.CloseHandle.argtypes = bool_, [handle]
    return k


def _job_ntdll() -> Any:
    n = _windll("ntdll")
    n.NtResumeProcess.restype, n.NtResumeProcess.argtypes = ctypes.c_int32, [ctypes.c_void_p]  # NTSTATUS (HANDLE)
    return n
