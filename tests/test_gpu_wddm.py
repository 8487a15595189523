"""Windows per-process GPU memory: the `GPU Process Memory` counters (as PDH returns them) fill the processes NVML
lists without memory under WDDM, roll up per group like NVML's numbers, and a `max_gpu_memory` rule acts on them:
a real process group killed for the VRAM its counter reports."""

from __future__ import annotations

import dataclasses
import json

from helpers.processes import pid_alive
from helpers.waiting import wait_for
from test_platforms import DEDICATED, SHARED, Pdh

from mem_exporter import platforms
from mem_exporter.config import validate_config
from mem_exporter.gpu import GpuReading, open_gpu_source
from mem_exporter.gpu.wddm import WddmProcessMemory, attach
from mem_exporter.grouping import group_processes
from mem_exporter.platforms import windows
from mem_exporter.sample import GpuCard, GpuProcess, ProcessInfo

GB = 1 << 30


def wddm_card(*pids: int, index: int = 0) -> GpuCard:
    """A card as NVML reports it under WDDM: processes listed, their memory not available."""
    return GpuCard(
        index,
        f"GPU-{index}",
        "NVIDIA GeForce RTX 4070",
        "566.14",
        memory_total_bytes=12 * GB,
        memory_used_bytes=11 * GB,
        processes=tuple(GpuProcess(pid, None, "compute") for pid in pids),
    )


class Nvml:
    """The inner source: NVML's reading, cards as given."""

    name = "nvml"

    def __init__(self, *cards: GpuCard):
        self.cards, self.closed = cards, False

    def read(self, now):
        return GpuReading(self.cards, True)

    def close(self):
        self.closed = True


def test_counters_fill_the_processes_nvml_lists_without_memory():
    usage = windows.rollup(DEDICATED, SHARED)
    (card,) = attach([wddm_card(4120)], usage)
    by_pid = {p.pid: p for p in card.processes}
    assert by_pid[4120] == GpuProcess(4120, 9_663_676_416, "compute", 268_435_456)  # NVML's kind, the counter's bytes
    assert by_pid[1888] == GpuProcess(1888, 402_653_184, "graphics", 0)  # only the counters know dwm.exe
    assert by_pid[5004].gpu_memory_bytes == 104_857_600 + 4_194_304
    assert set(by_pid) == {4120, 1888, 5004}  # the iGPU's and Basic Render's processes are not this card's


def test_nvmls_own_number_wins_and_unmatched_cards_stay_as_they_were():
    measured = GpuCard(0, "GPU-0", "x", "1", processes=(GpuProcess(4120, 5 * GB, "compute"),))
    (card,) = attach([measured], windows.rollup(DEDICATED, SHARED))
    assert {p.pid: p.gpu_memory_bytes for p in card.processes}[4120] == 5 * GB
    two = attach([wddm_card(1), wddm_card(2, index=1)], windows.rollup(DEDICATED, SHARED))
    assert two[1].processes == (GpuProcess(2, None, "compute"),)  # one adapter with VRAM in use: one card matched


def test_per_group_vram_on_windows_rolls_up_like_nvml():
    procs = [
        ProcessInfo(4120, 4000, 4000, 4000, -1, "ollama_llama_server.exe", "", 10, "R", 500 << 20),
        ProcessInfo(4000, 3000, 4000, 4000, -1, "ollama.exe", "", 5, "S", 90 << 20),
        ProcessInfo(5004, 3000, 5004, 5004, -1, "chrome.exe", "", 7, "S", 300 << 20),
    ]
    source = WddmProcessMemory(Nvml(wddm_card(4120)), counters=windows.GpuCounters(Pdh({1: DEDICATED, 2: SHARED})))
    reading = source.read(0.0)
    groups = {g.label: g for g in group_processes(procs, validate_config({}).groups, gpus=reading.cards)}
    assert groups["ollama.exe-4000"].gpu_memory_bytes == {0: 9_663_676_416}
    assert groups["ollama.exe-4000"].gpu_gtt_memory_bytes == {0: 268_435_456}
    assert groups["chrome.exe-5004"].gpu_memory_bytes == {0: 109_051_904}
    source.close()


def test_unreadable_counters_count_an_error_and_keep_nvmls_cards():
    class Broken:
        def read(self):
            raise OSError("PdhCollectQueryData: PDH status 0xC0000BC6")

        def close(self):
            pass

    reading = WddmProcessMemory(Nvml(wddm_card(7)), counters=Broken()).read(0.0)
    assert not reading.up and "0xC0000BC6" in reading.error
    assert reading.cards[0].processes == (GpuProcess(7, None, "compute"),)


def test_on_windows_nvml_is_wrapped(monkeypatch):
    monkeypatch.setattr(platforms, "PLATFORM", "win32")
    assert isinstance(open_gpu_source("nvml"), WddmProcessMemory)
    monkeypatch.setattr(platforms, "PLATFORM", "linux")
    assert not isinstance(open_gpu_source("nvml"), WddmProcessMemory)


def test_a_vram_rule_kills_the_group_its_windows_counter_names(spawn_group, tag, tmp_path):
    """The counters say the spawned hog holds 9 GiB of dedicated VRAM (NVML: not available); `max_gpu_memory: 8GiB`
    on the tagged group kills the real process group."""
    from mem_exporter.enforcer import Enforcer
    from mem_exporter.sampler import Sampler, SamplingLoop

    hog = spawn_group("--mb", "10", "--children", "1", "--tag", tag)
    kids = hog.wait_ready()
    luid = "luid_0x00000000_0x0000D1C3_phys_0"
    counters = windows.GpuCounters(
        Pdh({1: [(f"pid_{kids[0]}_{luid}", 9 * GB), (f"pid_{hog.pid}_{luid}", 64 << 20)], 2: []})
    )
    gpu = WddmProcessMemory(Nvml(wddm_card(kids[0])), counters=counters)
    events = tmp_path / "events.jsonl"
    cfg = validate_config(
        {
            "interval": "0.3s",
            "gpu": {"backend": "none"},
            "enforcer": {
                "event_log": str(events),
                "rules": [{"name": "vram", "match": {"cmdline": tag}, "max_gpu_memory": "8GiB", "grace": "1s"}],
            },
        }
    )
    loop = SamplingLoop(Sampler(cfg, gpu=gpu))
    enf = Enforcer(cfg)
    loop.consumers.append(enf.on_sample)
    loop.start()
    try:

        def killed():
            lines = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            return next((e for e in lines if e.get("outcome") == "dead"), None)

        ev = wait_for(killed, 30, what="the kill event")
        assert (ev["rule"], ev["condition"], ev["pgid"]) == ("vram", "max_gpu_memory", hog.pgid)
        assert ev["value"] == 9 * GB + (64 << 20) > ev["limit"] == 8 * GB
        wait_for(lambda: not pid_alive(hog.pid) and not any(pid_alive(k) for k in kids), 10, what="the group gone")
    finally:
        loop.stop()
        enf.stop(timeout=30)


class Gdi32:
    """D3DKMT as gdi32 answers it: adapters by LUID, each with a PCI address; the Basic Render Driver has none."""

    def __init__(self, addresses: dict[int, tuple[int, int, int] | None]):
        self.addresses, self.handles, self.closed = addresses, {}, []

    def D3DKMTOpenAdapterFromLuid(self, ref):
        arg = ref._obj
        luid = arg.AdapterLuid.HighPart << 32 | arg.AdapterLuid.LowPart
        if luid not in self.addresses:
            return 0xC000000D  # STATUS_INVALID_PARAMETER
        arg.hAdapter = 0x40000000 + len(self.handles)
        self.handles[arg.hAdapter] = luid
        return 0

    def D3DKMTQueryAdapterInfo(self, ref):
        q = ref._obj
        address = self.addresses[self.handles[q.hAdapter]]
        assert q.Type == windows.KMTQAITYPE_ADAPTERADDRESS and q.PrivateDriverDataSize == 12
        if address is None:
            return 0xC00000BB  # STATUS_NOT_SUPPORTED
        out = windows.D3DKMT_ADAPTERADDRESS.from_address(q.pPrivateDriverData)
        out.BusNumber, out.DeviceNumber, out.FunctionNumber = address
        return 0

    def D3DKMTCloseAdapter(self, ref):
        self.closed.append(ref._obj.hAdapter)
        return 0


def test_adapters_are_matched_to_cards_by_pci_address():
    gdi = Gdi32({0xD1C3: (0x41, 0, 0), 0xB2F0: (0, 2, 0), 0xF000: (0x01, 0, 0), 0x1_0000_8A2E: None})
    assert windows.adapter_address(0xD1C3, gdi) == (0x41, 0, 0)
    assert windows.adapter_address(0x1_0000_8A2E, gdi) is None and windows.adapter_address(0x77, gdi) is None
    assert len(gdi.closed) == 2  # every adapter opened is closed again
    assert windows.parse_bus_id("0000:41:00.0") == (0x41, 0, 0) and windows.parse_bus_id("") is None
    bus_ids = ["0000:01:00.0", "0000:41:00.0"]  # card 0 at 01:00.0 is idle; card 1 at 41:00.0 runs everything
    known = windows.known_luids([0xD1C3, 0xB2F0, 0xF000, 0x1_0000_8A2E], bus_ids, gdi)
    assert known == {0xF000: 0, 0xD1C3: 1}
    cards = [
        dataclasses.replace(wddm_card(index=0), pci_bus_id=bus_ids[0]),
        dataclasses.replace(wddm_card(4120, index=1), pci_bus_id=bus_ids[1]),
    ]
    locate_calls = []

    def locate(luids, ids):
        locate_calls.append(sorted(luids))
        return windows.known_luids(luids, ids, gdi)

    source = WddmProcessMemory(
        Nvml(*cards), counters=windows.GpuCounters(Pdh({1: DEDICATED, 2: SHARED})), locate=locate
    )
    idle, busy = source.read(0.0).cards
    assert idle.processes == () and {p.pid for p in busy.processes} == {4120, 1888, 5004}  # by order: the other way
    source.read(1.0)
    assert len(locate_calls) == 1  # an adapter keeps its LUID: asked once
