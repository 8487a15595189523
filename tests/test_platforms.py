"""What only macOS and Windows can answer, fed with their answers as bytes: rusage structs, sysctl values,
PERFORMANCE_INFORMATION, PDH counter arrays. The ctypes plumbing runs for real here against stand-in libraries
that fill the buffers the way the OS's functions do; only the library itself is not there (docs/platforms.md)."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest
from helpers.golden import assert_golden, render

from mem_exporter import platforms
from mem_exporter.config import validate_config
from mem_exporter.grouping import cap_groups, group_processes
from mem_exporter.platforms import macos, windows
from mem_exporter.psutil_source import PsutilReader
from mem_exporter.sample import ProcessInfo, Sample, SystemMemory

MB = 1024 * 1024
PAGE = 4096


def rusage_v2(resident: int, footprint: int) -> bytes:
    """A struct rusage_info_v2 as proc_pid_rusage fills it: uuid, then 18 uint64 (<sys/resource.h>)."""
    fields = [0] * 18
    fields[0:2] = [1_250_000_000, 310_000_000]  # user, system time (ns)
    fields[4] = 812  # pageins
    fields[6], fields[7] = resident, footprint
    return bytes(range(16)) + struct.pack("<18Q", *fields)


class Libproc:
    """proc_pid_rusage: fills the caller's buffer with a recorded struct, returns 0 (or -1: EPERM/ESRCH)."""

    def __init__(self, raw: bytes | None):
        self.raw, self.calls = raw, []

    def proc_pid_rusage(self, pid, flavor, buf):
        self.calls.append((pid.value, flavor.value, len(buf)))
        if self.raw is None:
            return -1
        ctypes.memmove(buf, self.raw, len(self.raw))
        return 0


class Libc:
    def __init__(self, value: bytes | None):
        self.value = value

    def sysctlbyname(self, name, buf, size, newp, newlen):
        assert name == b"kern.memorystatus_vm_pressure_level" and newp is None
        if self.value is None:
            return -1
        ctypes.memmove(buf, self.value, len(self.value))
        size._obj.value = len(self.value)
        return 0


def test_footprint_is_read_from_rusage_v2_not_resident_size():
    lib = Libproc(rusage_v2(resident=180 * MB, footprint=395 * MB))
    assert macos.footprint(4242, lib) == 395 * MB
    assert lib.calls == [(4242, macos.RUSAGE_INFO_V2, macos.RUSAGE_INFO_V2_SIZE)]
    assert macos.parse_rusage(rusage_v2(180 * MB, 395 * MB)) == (180 * MB, 395 * MB)


def test_footprint_of_a_process_not_ours_is_none():
    assert macos.footprint(1, Libproc(None)) is None
    with pytest.raises(ValueError, match="rusage_info is 40 bytes"):
        macos.parse_rusage(bytes(40))


@pytest.mark.parametrize("raw,level", [(b"\x01\x00\x00\x00", 1), (b"\x02\x00\x00\x00", 2), (b"\x04\x00\x00\x00", 4)])
def test_pressure_level_from_the_sysctl(raw, level):
    assert macos.pressure_level(Libc(raw)) == level


def test_pressure_level_unreadable_is_none():
    assert macos.pressure_level(Libc(None)) is None
    assert macos.pressure_level(Libc(b"\x01\x00")) is None  # a wrong size is not a level


def performance_information(commit_pages: int, limit_pages: int, page: int = PAGE) -> bytes:
    """PERFORMANCE_INFORMATION on 64-bit Windows: DWORD cb (padded), 10 SIZE_T, 3 DWORD."""
    return struct.pack(
        "<I4x10Q3I4x",
        104,
        commit_pages,
        limit_pages,
        commit_pages + 10,
        2_000_000,
        900_000,
        300_000,
        0,
        0,
        0,
        page,
        51_000,
        280,
        3_900,
    )


class Psapi:
    def __init__(self, raw: bytes | None):
        self.raw = raw

    def GetPerformanceInfo(self, ref, cb):
        if self.raw is None:
            return 0
        ctypes.memmove(ref, self.raw, cb)
        return 1


def test_commit_charge_and_limit_in_bytes():
    raw = performance_information(commit_pages=3_000_000, limit_pages=5_000_000)
    assert ctypes.sizeof(windows.PERFORMANCE_INFORMATION) == len(raw) == 104
    assert windows.parse_performance_info(raw) == (3_000_000 * PAGE, 5_000_000 * PAGE)
    assert windows.commit(Psapi(raw)) == (3_000_000 * PAGE, 5_000_000 * PAGE)
    assert windows.commit(Psapi(None)) is None


# PDH's answer for `\GPU Process Memory(*)\Dedicated Usage` and `Shared Usage` on a desktop with an NVIDIA card
# (LUID 0xD1C3), an integrated GPU (0xB2F0) and the Basic Render Driver (0x1_0000_8A2E): (instance, bytes).
DEDICATED = [
    ("pid_4120_luid_0x00000000_0x0000D1C3_phys_0", 9_663_676_416),  # ollama's runner
    ("pid_4120_luid_0x00000000_0x0000B2F0_phys_0", 0),
    ("pid_1888_luid_0x00000000_0x0000D1C3_phys_0", 402_653_184),  # dwm.exe
    ("pid_1888_luid_0x00000000_0x0000B2F0_phys_0", 0),
    ("pid_5004_luid_0x00000000_0x0000D1C3_phys_0", 104_857_600),  # a browser, on both physical GPUs of nothing
    ("pid_5004_luid_0x00000000_0x0000D1C3_phys_1", 4_194_304),
    ("pid_700_luid_0x00000001_0x00008A2E_phys_0", 0),
    ("_Total", 10_175_381_504),  # not a process: left out
]
SHARED = [
    ("pid_4120_luid_0x00000000_0x0000D1C3_phys_0", 268_435_456),
    ("pid_4120_luid_0x00000000_0x0000B2F0_phys_0", 0),
    ("pid_1888_luid_0x00000000_0x0000B2F0_phys_0", 150_994_944),
    ("pid_5004_luid_0x00000000_0x0000D1C3_phys_0", 0),
]


def test_instance_names_parse_to_pid_luid_and_physical_gpu():
    assert windows.parse_instance("pid_4120_luid_0x00000000_0x0000D1C3_phys_0") == (4120, 0xD1C3, 0)
    assert windows.parse_instance("pid_700_luid_0x00000001_0x00008A2E_phys_1") == (700, 0x1_0000_8A2E, 1)
    for other in ("_Total", "pid_x_luid_0x0_0x0_phys_0", "luid_0x00000000_0x0000D1C3_phys_0_eng_0"):
        assert windows.parse_instance(other) is None


def test_rollup_sums_physical_gpus_per_process_and_adapter():
    usage = windows.rollup(DEDICATED, SHARED)
    assert usage[0xD1C3][4120] == (9_663_676_416, 268_435_456)
    assert usage[0xD1C3][5004] == (104_857_600 + 4_194_304, 0)
    assert usage[0xB2F0][1888] == (0, 150_994_944)
    assert set(usage) == {0xD1C3, 0xB2F0, 0x1_0000_8A2E}


def test_luids_map_to_cards_by_dedicated_memory_then_luid_order():
    usage = windows.rollup(DEDICATED, SHARED)
    assert windows.luid_cards(usage, cards=1) == {0xD1C3: 0}  # the iGPU and Basic Render hold no VRAM
    two = {**usage, 0x0000_F000: {9: windows.GpuUsage(1 << 30, 0)}}
    assert windows.luid_cards(two, cards=2) == {0xD1C3: 0, 0xF000: 1}  # numbered in LUID order
    assert windows.luid_cards(two, cards=2, known={0xF000: 0}) == {0xF000: 0, 0xD1C3: 1}
    assert windows.luid_cards(usage, cards=0) == {}


class Pdh:
    """PdhGetFormattedCounterArrayW: size first (PDH_MORE_DATA), then an array of PDH_FMT_COUNTERVALUE_ITEM_W
    whose names point into the same buffer, as PDH lays it out."""

    def __init__(
        self, items: dict[int, list[tuple[str, int]] | int], invalid: frozenset[str] = frozenset()
    ):  # a counter's rows, or the status PDH answers for it
        self.items, self.invalid, self.keep = items, invalid, []
        self.collected = 0

    def PdhOpenQueryW(self, source, user, query):
        query._obj.value = 0x51
        return 0

    def PdhAddEnglishCounterW(self, query, path, user, counter):
        counter._obj.value = 1 if path.endswith("Dedicated Usage") else 2
        return 0

    def PdhCollectQueryData(self, query):
        self.collected += 1
        return 0

    def PdhCloseQuery(self, query):
        return 0

    def PdhGetFormattedCounterArrayW(self, counter, fmt, size, count, buf):
        assert fmt == windows.PDH_FMT_LARGE
        rows = self.items[counter.value]
        if isinstance(rows, int):
            return ctypes.c_int32(rows).value
        item = ctypes.sizeof(windows.PDH_FMT_COUNTERVALUE_ITEM_W)
        need = item * len(rows) + 512 * len(rows)
        if buf is None:
            size._obj.value, count._obj.value = need, len(rows)
            return ctypes.c_int32(windows.PDH_MORE_DATA).value  # PDH_STATUS is a LONG: negative in ctypes
        array = ctypes.cast(buf, ctypes.POINTER(windows.PDH_FMT_COUNTERVALUE_ITEM_W))
        for i, (name, value) in enumerate(rows):
            text = ctypes.create_unicode_buffer(name)
            self.keep.append(text)
            array[i].szName = ctypes.cast(text, ctypes.c_wchar_p).value
            array[i].FmtValue.CStatus = 0xC0000BC6 if name in self.invalid else 0
            array[i].FmtValue.value.largeValue = value
        count._obj.value = len(rows)
        return 0


def test_counter_arrays_are_read_through_pdh():
    pdh = Pdh({1: DEDICATED, 2: SHARED}, invalid=frozenset({"pid_700_luid_0x00000001_0x00008A2E_phys_0"}))
    counters = windows.GpuCounters(pdh)
    assert windows.counter_items(pdh, counters.counters["dedicated"]) == DEDICATED[:6] + DEDICATED[7:]
    usage = counters.read()
    assert pdh.collected == 1 and usage == windows.rollup(DEDICATED[:6], SHARED)


def test_no_gpu_process_at_all_is_empty_and_a_failure_an_error():
    assert windows.GpuCounters(Pdh({1: windows.PDH_NO_DATA, 2: windows.PDH_NO_DATA})).read() == {}
    with pytest.raises(OSError, match="0xC0000BB8"):
        windows.GpuCounters(Pdh({1: 0xC0000BB8, 2: []})).read()


def test_private_bytes_come_from_psutils_windows_field():
    class WindowsMemoryInfo:  # psutil's pmem on Windows: rss is the working set, private the commit charge
        rss, vms, private = 50 * MB, 700 * MB, 700 * MB

    assert windows.private_bytes(1, WindowsMemoryInfo()) == 700 * MB
    assert windows.private_bytes(1, os.stat_result((0,) * 10)) is None  # a memory_info without the field


def status_anon(pid: int) -> int:
    """Linux's nearest number to a footprint or a commit charge: anonymous resident plus swapped memory."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "VmSwap") if k in fields)


@pytest.mark.parametrize("platform,memtype", [("darwin", "footprint"), ("win32", "private")])
def test_the_portable_reader_reads_the_native_number_beside_rss(monkeypatch, spawn_group, platform, memtype):
    """The psutil source on macOS/Windows (forced) gives each process its OS's own number, summed per group."""
    monkeypatch.setattr(macos, "footprint", lambda pid: 3 * status_anon(pid))
    monkeypatch.setattr(windows, "private_bytes", lambda pid, info: 2 * status_anon(pid))
    monkeypatch.setattr(macos, "pressure_level", lambda: 2)
    monkeypatch.setattr(windows, "commit", lambda: (6 << 30, 20 << 30))
    hog = spawn_group("--mb", "60", "--children", "1", "--child-mb", "20")
    hog.wait_ready()
    reader = PsutilReader(platform=platform)
    procs = [p for p in reader.read_processes()[0] if p.pgid == hog.pgid]
    factor = 3 if platform == "darwin" else 2
    assert len(procs) == 2
    for p in procs:
        value = getattr(p, f"{memtype}_bytes")
        assert value is not None and abs(value - factor * status_anon(p.pid)) < 4 * MB
        assert getattr(p, "private_bytes" if memtype == "footprint" else "footprint_bytes") is None
    (group,) = [g for g in group_processes(procs, validate_config({}).groups) if g.pgid == hog.pgid]
    assert group.memory_bytes(memtype) == sum(getattr(p, f"{memtype}_bytes") for p in procs) > 80 * MB * factor * 0.9
    system = reader.read_system()
    if platform == "darwin":
        assert (system.pressure_level, system.commit_bytes) == (2, None)
    else:
        assert (system.pressure_level, system.commit_bytes, system.commit_limit_bytes) == (None, 6 << 30, 20 << 30)
    assert PsutilReader(platform="linux").read_system().pressure_level is None


def test_native_memtype_per_os():
    assert [platforms.native_memtype(p) for p in ("darwin", "win32", "linux")] == ["footprint", "private", "rss"]


def desktop_sample(platform: str) -> tuple[Sample, object]:
    footprint = platform == "darwin"

    def proc(pid, pgid, comm, rss_mb, native_mb):
        native = native_mb * MB
        return ProcessInfo(
            pid,
            1,
            pgid,
            pgid,
            501,
            comm,
            comm,
            1000 + pid,
            "S",
            rss_mb * MB,
            footprint_bytes=native if footprint else None,
            private_bytes=None if footprint else native,
        )

    procs = [proc(300, 300, "bun", 210, 430), proc(301, 300, "node", 90, 150), proc(400, 400, "ollama", 1200, 5100)]
    cfg = validate_config({"groups": {"max_groups": 2, "min_memory": "1MB"}})
    groups = group_processes(procs, cfg.groups)
    extra = {"pressure_level": 2} if footprint else {"commit_bytes": 14 << 30, "commit_limit_bytes": 40 << 30}
    sample = Sample(
        timestamp=1_700_000_000.0,
        monotonic=1.0,
        duration_seconds=0.01,
        system=SystemMemory(8 << 30, 1 << 30, 200 * MB, 2 << 30, 1 << 29, **extra),
        cpu_usage_ratio=0.5,
        process_count=3,
        groups=groups,
        processes=tuple(procs),
        sources_up={"psutil": True},
        exported=tuple(cap_groups(groups, 2, MB)),
    )
    return sample, cfg


@pytest.mark.parametrize("platform,name", [("darwin", "macos"), ("win32", "windows")])
def test_golden_metrics_on_macos_and_windows(platform, name):
    """memtype="footprint" / "private" series beside rss, the pressure level / commit gauges; promtool clean."""
    sample, cfg = desktop_sample(platform)
    assert_golden(render(sample, cfg), f"metrics-{name}.txt")
