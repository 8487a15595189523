"""Prometheus exposition: a Collector that renders the latest Sample, the registry, and its rendered text.

A scrape renders what the sampler last produced; it never reads /proc. The HTTP server that serves the
text is `http_server`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from . import __version__
from .config import Groups
from .containers import group_ids
from .sample import GpuCard, Sample, SystemMemory

P = "mem_exporter_"


def _gauge(name: str, doc: str, labels: Iterable[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=list(labels), unit=unit)


def _os_system(m: SystemMemory) -> Iterable[Metric]:
    """What only one OS reports about the whole system: macOS's pressure level, Windows' commit charge."""
    for name, doc, value in (
        (
            "system_memory_pressure_level",
            "macOS memory pressure (kern.memorystatus_vm_pressure_level): 1 normal, 2 warn, 4 critical.",
            m.pressure_level,
        ),
        ("system_commit_bytes", "Windows commit charge: private memory the system has promised.", m.commit_bytes),
        ("system_commit_limit_bytes", "Windows commit limit: RAM plus page files.", m.commit_limit_bytes),
    ):
        if value is not None:
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g


def _add_health(
    card: GpuCard,
    idx: str,
    throttle: GaugeMetricFamily,
    xid: CounterMetricFamily,
    ecc: CounterMetricFamily,
    mig_used: GaugeMetricFamily,
    mig_total: GaugeMetricFamily,
) -> None:
    """A card's throttle reasons, XID and ECC counts and MIG instances, each where the card reports it."""
    for reason, active in card.throttle_reasons:
        throttle.add_metric([idx, reason], 1 if active else 0)
    if card.xid_errors_total is not None:
        xid.add_metric([idx], card.xid_errors_total)
    for kind, value in (("corrected", card.ecc_corrected_total), ("uncorrected", card.ecc_uncorrected_total)):
        if value is not None:
            ecc.add_metric([idx, kind], value)
    for m in card.mig:
        if m.memory_used_bytes is not None:
            mig_used.add_metric([idx, m.mig], m.memory_used_bytes)
        if m.memory_total_bytes is not None:
            mig_total.add_metric([idx, m.mig], m.memory_total_bytes)


class SampleCollector:
    """Yields fresh metric families from `get_sample()` on every scrape."""

    def __init__(self, get_sample: Callable[[], Sample | None], get_groups_config: Callable[[], Groups]):
        self.get_sample = get_sample
        self.get_groups_config = get_groups_config

    def describe(self) -> list:
        return []  # families depend on the sample; nothing to pre-register

    def collect(self) -> Iterable[Metric]:
        s = self.get_sample()
        if s is None:
            return
        yield from self._system(s)
        yield from self._groups(s)
        yield from self._gpus(s)
        yield from self._self(s)

    def _system(self, s: Sample) -> Iterable[Metric]:
        m = s.system
        for name, doc, value in (
            ("system_memory_total_bytes", "Total usable RAM.", m.total_bytes),
            (
                "system_memory_available_bytes",
                "RAM available for new work without swapping (MemAvailable).",
                m.available_bytes,
            ),
            ("system_memory_used_bytes", "RAM in use: total minus available.", m.used_bytes),
            ("system_memory_free_bytes", "RAM not used at all (MemFree).", m.free_bytes),
            ("system_swap_total_bytes", "Total swap space.", m.swap_total_bytes),
            ("system_swap_used_bytes", "Swap space in use.", m.swap_used_bytes),
            (
                "processes",
                "Processes counted in the last sample (kernel threads and zombies excluded).",
                s.process_count,
            ),
        ):
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g
        if s.cpu_usage_ratio is not None:
            g = _gauge("system_cpu_usage_ratio", "Share of all CPUs busy since the previous sample (0..1).")
            g.add_metric([], s.cpu_usage_ratio)
            yield g
        if s.pressure is not None:
            ratio = _gauge(
                "system_memory_pressure_ratio",
                "Share of wall time tasks stalled on memory (PSI), "
                "some: at least one task, full: all non-idle tasks at once; by averaging window.",
                ["kind", "window"],
            )
            stall = CounterMetricFamily(
                P + "system_memory_pressure_stall_seconds",
                "Time tasks stalled on memory since boot (PSI total).",
                labels=["kind"],
            )
            for kind in ("some", "full"):
                line = s.pressure.line(kind)
                if line is not None:
                    for window in ("avg10", "avg60", "avg300"):
                        ratio.add_metric([kind, window], getattr(line, window))
                    stall.add_metric([kind], line.total_seconds)
            yield from (ratio, stall)
        yield from _os_system(m)
        g = _gauge(
            "skipped_processes",
            "Processes left out of the last sample (or, for permission, read in part), by reason.",
            ["reason"],
        )
        for reason in ("vanished", "zombie", "kernel_thread", "permission"):
            g.add_metric([reason], s.skipped.get(reason, 0))
        yield g
        if s.phase:
            g = _gauge("phase_info", "The current phase of the run, as set by `mem-exporter phase`.", ["phase"])
            g.add_metric([s.phase], 1)
            yield g

    def _groups(self, s: Sample) -> Iterable[Metric]:
        cfg = self.get_groups_config()
        groups = s.exported  # capped once per sample, by the sampler
        mem = _gauge(
            "group_memory_bytes", "Memory summed over a group's processes, by memory type.", ["group", "memtype"]
        )
        count = _gauge("group_processes", "Processes in a group.", ["group"])
        by_container = cfg.by == "container"  # only then: the other layouts keep their label sets
        info_labels = (
            ["group", "kind", "pgid", "leader"]
            + (["container", "pod"] if by_container else [])
            + (["cmdline"] if cfg.cmdline_label else [])
        )
        info = _gauge(
            "group_info",
            "A group's identity: kind (pgid, named, cgroup, container, unit, other), PGID, "
            "leader command, and with groups.by=container the short container ID and pod UID.",
            info_labels,
        )
        vram = _gauge("group_gpu_memory_bytes", "GPU memory used by a group's processes, per card.", ["group", "gpu"])
        gtt = _gauge(
            "group_gpu_gtt_memory_bytes",
            "System memory mapped by a DRM card (GTT) for a group's processes, per card.",
            ["group", "gpu"],
        )
        for g in groups:
            mem.add_metric([g.label, "rss"], g.rss_bytes)
            if g.pss_bytes is not None:
                mem.add_metric([g.label, "pss"], g.pss_bytes)
            if g.swap_bytes is not None:
                mem.add_metric([g.label, "swap"], g.swap_bytes)
            if g.footprint_bytes is not None:
                mem.add_metric([g.label, "footprint"], g.footprint_bytes)
            if g.private_bytes is not None:
                mem.add_metric([g.label, "private"], g.private_bytes)
            count.add_metric([g.label], g.processes)
            leader = next((p for p in g.members if p.pid == g.pgid), g.members[0]) if g.members else None
            values = [g.label, g.kind, str(g.pgid or ""), leader.comm if leader else ""]
            if by_container:
                values += group_ids(leader.cgroup) if leader and g.kind == "container" else ["", ""]
            if cfg.cmdline_label:
                values.append(leader.cmdline[:200] if leader else "")
            info.add_metric(values, 1)
            for idx, used in sorted(g.gpu_memory_bytes.items()):
                vram.add_metric([g.label, str(idx)], used)
            for idx, used in sorted(g.gpu_gtt_memory_bytes.items()):
                gtt.add_metric([g.label, str(idx)], used)
        yield from (mem, count, info, vram)
        if gtt.samples:
            yield gtt

    def _gpus(self, s: Sample) -> Iterable[Metric]:
        if not s.gpus:
            return
        info = _gauge(
            "gpu_info", "A GPU's identity; always 1.", ["gpu", "uuid", "name", "driver_version", "vendor", "pci_bus_id"]
        )
        fields = (
            ("gpu_memory_total_bytes", "Total GPU memory.", "memory_total_bytes"),
            ("gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
            ("gpu_memory_free_bytes", "GPU memory free.", "memory_free_bytes"),
            ("gpu_memory_reserved_bytes", "GPU memory reserved by the driver.", "memory_reserved_bytes"),
            (
                "gpu_utilization_ratio",
                "Share of time a kernel ran on the GPU over the last sample period (0..1).",
                "utilization_ratio",
            ),
            (
                "gpu_memory_utilization_ratio",
                "Share of time GPU memory was read or written (0..1).",
                "memory_utilization_ratio",
            ),
            ("gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
            ("gpu_power_watts", "GPU power draw.", "power_watts"),
            ("gpu_power_limit_watts", "Enforced GPU power limit.", "power_limit_watts"),
            ("gpu_gtt_memory_total_bytes", "System memory a DRM card may map (GTT).", "gtt_memory_total_bytes"),
            ("gpu_gtt_memory_used_bytes", "System memory a DRM card maps now (GTT).", "gtt_memory_used_bytes"),
            (
                "gpu_unreadable_processes",
                "Processes whose GPU use could not be read (other users' descriptors "
                "without privilege): unknown, not zero.",
                "unreadable_processes",
            ),
            ("gpu_performance_state", "Performance state: 0 is the highest, 15 the lowest.", "performance_state"),
            ("gpu_last_xid", "The last XID error code seen on the card (0: none since start).", "last_xid"),
        )
        families = {attr: _gauge(name, doc, ["gpu"]) for name, doc, attr in fields}
        energy = CounterMetricFamily(
            P + "gpu_energy_joules", "Energy used by the GPU since the driver loaded.", labels=["gpu"]
        )
        clock = _gauge("gpu_clock_hertz", "Current GPU clock.", ["gpu", "clock"])
        clock_max = _gauge("gpu_clock_max_hertz", "Highest GPU clock the card supports.", ["gpu", "clock"])
        procs = _gauge("gpu_processes", "Processes using a GPU.", ["gpu"])
        throttle = _gauge(
            "gpu_throttle_active",
            "Whether a clock-event (throttle) reason holds the clocks down now (1) or not (0).",
            ["gpu", "reason"],
        )
        xid = CounterMetricFamily(
            P + "gpu_xid_errors", "XID errors reported by the driver since start.", labels=["gpu"]
        )
        ecc = CounterMetricFamily(
            P + "gpu_ecc_errors", "ECC errors since the driver loaded (volatile counters).", labels=["gpu", "type"]
        )
        mig_used = _gauge("gpu_mig_memory_used_bytes", "Memory used in a MIG GPU instance.", ["gpu", "mig"])
        mig_total = _gauge("gpu_mig_memory_total_bytes", "Memory of a MIG GPU instance.", ["gpu", "mig"])
        for card in s.gpus:
            idx = str(card.index)
            info.add_metric([idx, card.uuid, card.name, card.driver_version, card.vendor, card.pci_bus_id], 1)
            _add_health(card, idx, throttle, xid, ecc, mig_used, mig_total)
            for attr, fam in families.items():
                value = getattr(card, attr)
                if value is not None:
                    fam.add_metric([idx], value)
            if card.energy_joules is not None:
                energy.add_metric([idx], card.energy_joules)
            for name, cur, top in (
                ("sm", card.clock_sm_hertz, card.clock_sm_max_hertz),
                ("memory", card.clock_memory_hertz, card.clock_memory_max_hertz),
            ):
                if cur is not None:
                    clock.add_metric([idx, name], cur)
                if top is not None:
                    clock_max.add_metric([idx, name], top)
            procs.add_metric([idx], len(card.processes))
        yield info
        yield from (f for f in families.values() if f.samples)
        yield from (f for f in (energy, clock, clock_max, throttle, xid, ecc, mig_used, mig_total) if f.samples)
        yield procs

    def _self(self, s: Sample) -> Iterable[Metric]:
        g = _gauge("sample_duration_seconds", "How long the last sample took.")
        g.add_metric([], s.duration_seconds)
        yield g
        g = _gauge("last_sample_timestamp_seconds", "Unix time of the last sample.")
        g.add_metric([], s.timestamp)
        yield g
        if s.interval_seconds is not None:  # staleness alerts compare the sample age with it
            g = _gauge("sample_interval_seconds", "The configured sampling interval.")
            g.add_metric([], s.interval_seconds)
            yield g
        g = _gauge("source_up", "Whether a data source worked in the last sample (1) or not (0).", ["source"])
        for source, up in sorted(s.sources_up.items()):
            g.add_metric([source], 1 if up else 0)
        yield g
        c = CounterMetricFamily(P + "sample_errors", "Failed reads of a data source since start.", labels=["source"])
        for source in sorted(set(s.sources_up) | set(s.errors_total)):
            c.add_metric([source], s.errors_total.get(source, 0))
        yield c


def build_registry(*collectors) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    registry.register(ProcessCollector(registry=None))
    registry.register(_BuildInfo())
    return registry


class _BuildInfo:
    def collect(self):
        m = InfoMetricFamily(P + "build", "mem-exporter version.")
        m.add_metric([], {"version": __version__})
        yield m


class Exposition:
    """The registry's rendered text, cached until the next sample.

    Rendering happens once per sample in the sampler's thread (`refresh`), so a
    scrape only copies bytes: a flood of scrapes costs no sampling time.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def refresh(self, *_ignored) -> None:
        fresh = {}
        encoder, content_type = choose_encoder("")
        fresh[content_type] = encoder(self.registry)
        self._cache = fresh

    def invalidate(self) -> None:
        self._cache = {}

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        body = self._cache.get(content_type)
        if body is None:
            with self._lock:
                body = encoder(self.registry)
            self._cache = {**self._cache, content_type: body}
        return body, content_type
