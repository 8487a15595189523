"""The immutable data every consumer reads: one `Sample` per sampler tick.

Everything is plain data in base units (bytes, seconds, watts, hertz, celsius,
ratios 0..1). `None` means "not measured" (not supported, not configured),
never zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class ProcessInfo(NamedTuple):
    """One process. A NamedTuple, not a dataclass: thousands are built per tick and this is 4x cheaper."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: int
    comm: str
    cmdline: str
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22): with pid, the identity
    state: str
    rss_bytes: int
    pss_bytes: int | None = None
    swap_bytes: int | None = None
    cgroup: str | None = None
    exe: str | None = None
    footprint_bytes: int | None = None  # macOS: phys_footprint (Activity Monitor's Memory column)
    private_bytes: int | None = None  # Windows: PrivateUsage, the commit charge (Task Manager's Commit size)

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start_time)

    def memory_bytes(self, memtype: str = "rss") -> int:
        """This process's memory of one type; RSS where that type was not read."""
        value = {"pss": self.pss_bytes, "footprint": self.footprint_bytes, "private": self.private_bytes}.get(memtype)
        return self.rss_bytes if value is None else value


@dataclass(frozen=True, slots=True)
class SystemMemory:
    total_bytes: int
    available_bytes: int
    free_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    pressure_level: int | None = None  # macOS kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical
    commit_bytes: int | None = None  # Windows: the system's commit charge (GetPerformanceInfo CommitTotal)
    commit_limit_bytes: int | None = None  # Windows: the commit limit (RAM plus page files)

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.available_bytes

    @property
    def available_ratio(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True, slots=True)
class PressureLine:
    """One line of a PSI file: shares of wall time stalled on memory, and the stall since boot."""

    avg10: float  # ratio 0..1
    avg60: float
    avg300: float
    total_seconds: float


@dataclass(frozen=True, slots=True)
class MemoryPressure:
    some: PressureLine  # some tasks stalled
    full: PressureLine | None  # all non-idle tasks stalled at once (absent on old kernels' host file)

    def line(self, kind: str) -> PressureLine | None:
        return self.some if kind == "some" else self.full


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    gpu_memory_bytes: int | None  # None where the driver does not report it
    kind: str = "compute"  # compute | graphics | drm (a DRM client: the kernel does not say which)
    gtt_memory_bytes: int | None = None  # DRM only: system memory the card maps (GTT), None where not reported


@dataclass(frozen=True, slots=True)
class GpuMigInstance:
    """One MIG GPU instance of an NVIDIA card (`mig` label: its GPU instance ID)."""

    mig: str
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GpuCard:
    index: int
    uuid: str
    name: str
    driver_version: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    clock_sm_hertz: float | None = None
    clock_memory_hertz: float | None = None
    clock_sm_max_hertz: float | None = None
    clock_memory_max_hertz: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    vendor: str = ""  # nvidia | amd | intel | the PCI vendor ID for others
    pci_bus_id: str = ""  # 0000:03:00.0 (domain:bus:device.function), "" where unknown
    gtt_memory_total_bytes: int | None = None  # DRM: system memory the card may map (amdgpu GTT)
    gtt_memory_used_bytes: int | None = None
    unreadable_processes: int | None = None  # DRM: processes whose descriptors we may not read (use unknown)
    # NVIDIA health; None (or empty) where the card or driver does not offer it
    throttle_reasons: tuple[tuple[str, bool], ...] = ()  # (reason, active) for every reason the card reports
    xid_errors_total: int | None = None  # XID events seen since the source started
    last_xid: int | None = None  # the last XID code seen (0: none yet)
    ecc_corrected_total: int | None = None  # volatile: since the driver loaded
    ecc_uncorrected_total: int | None = None
    performance_state: int | None = None  # P-state: 0 (highest) .. 15 (lowest)
    mig: tuple[GpuMigInstance, ...] = ()  # MIG instances where MIG is on

    @property
    def memory_used_ratio(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes


@dataclass(frozen=True, slots=True)
class GroupSample:
    """Processes that share a group key, with their summed memory."""

    key: str  # stable identity: "pgid:1234", "named:ollama", "cgroup:/x", "other"
    label: str  # the `group` label value: "python3-1234", "ollama", "other"
    kind: str  # pgid | named | cgroup | other
    rss_bytes: int
    processes: int
    members: tuple[ProcessInfo, ...]  # largest first; empty for "other"
    pss_bytes: int | None = None
    swap_bytes: int | None = None
    pgid: int | None = None
    gpu_memory_bytes: Mapping[int, int] = field(default_factory=dict)  # gpu index -> bytes
    gpu_gtt_memory_bytes: Mapping[int, int] = field(default_factory=dict)  # gpu index -> GTT bytes (DRM cards)
    footprint_bytes: int | None = None  # macOS: summed phys_footprint
    private_bytes: int | None = None  # Windows: summed commit charge (PrivateUsage)

    def memory_bytes(self, memtype: str = "rss") -> int:
        """The group's memory of one type; RSS where that type was not read (another OS, no access)."""
        value = {"pss": self.pss_bytes, "footprint": self.footprint_bytes, "private": self.private_bytes}.get(memtype)
        return self.rss_bytes if value is None else value

    @property
    def gpu_memory_total_bytes(self) -> int:
        return sum(self.gpu_memory_bytes.values())

    def top(self, n: int = 5) -> tuple[ProcessInfo, ...]:
        return self.members[:n]


@dataclass(frozen=True, slots=True)
class Sample:
    timestamp: float  # unix seconds
    monotonic: float
    duration_seconds: float
    system: SystemMemory
    cpu_usage_ratio: float | None  # share of all CPUs busy since the previous tick
    process_count: int
    groups: tuple[GroupSample, ...]  # every group, largest first
    processes: tuple[ProcessInfo, ...] = ()
    gpus: tuple[GpuCard, ...] = ()
    memtype: str = "rss"
    sources_up: Mapping[str, bool] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)  # reason -> processes skipped this tick
    errors_total: Mapping[str, int] = field(default_factory=dict)  # source -> failed reads since start
    phase: str | None = None
    exported: tuple[GroupSample, ...] = ()  # the groups with series of their own, the rest summed in "other"
    pressure: MemoryPressure | None = None  # the host's PSI (<procfs>/pressure/memory); None without PSI
    cgroup_pressure: Mapping[str, MemoryPressure] = field(default_factory=dict)  # cgroup a rule names -> its PSI
    interval_seconds: float | None = None  # the configured sampling interval this sample was taken at
    # processes and groups are those of an earlier walk (a light tick: system memory, GPUs and PSI are fresh)
    light: bool = False
