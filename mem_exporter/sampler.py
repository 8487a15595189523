"""One sampling code path for every consumer: `Sampler.tick()` -> `Sample`.

`SamplingLoop` runs ticks on their own schedule in a thread and hands each
Sample to its consumers (exposition, enforcer, logs); a scrape only ever reads
the latest Sample and never waits on /proc.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence

from .cgroupfs_reader import CGROUP_KINDS, CgroupAccounts, CgroupSampler
from .config import Config
from .enforcer import conditions
from .grouping import attach_gpu, cap_groups, group_key, group_processes, make_group
from .pressure import cgroup_pressure_path, host_pressure_path, read_pressure
from .reader import Reader
from .sample import GroupSample, MemoryPressure, ProcessInfo, Sample, SystemMemory
from .sources import make_reader

log = logging.getLogger(__name__)

_EMPTY_SYSTEM = SystemMemory(0, 0, 0, 0, 0)


def quiet_gc() -> None:
    """Keep the cyclic GC out of the /proc walk: a tick allocates thousands of tuples, none in
    cycles (refcounting frees them), yet each 700 allocations would start a GC pass. Long-lived
    objects from startup are frozen so full passes skip them. For daemons that own their process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    trim_heap()


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the heap freed after start-up (config models, imports) back to the system."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def make_cgroup_sampler(config: Config, source_name: str, quiet: bool = False):
    """For `groups.by: cgroup | container` on the procfs source: a CgroupSampler where the memory accounts
    can be read (groups measured from them), else None (every process read and summed, as for PGIDs)."""
    if config.groups.by == "pgid" or source_name != "procfs" or config.groups.memory_from != "auto":
        return None
    paths = config.paths
    if (paths.procfs.rstrip("/") == "/proc") != (paths.cgroupfs.rstrip("/") == "/sys/fs/cgroup"):
        (log.debug if quiet else log.info)(
            "procfs %s and cgroupfs %s are not one host's: groups sum their processes", paths.procfs, paths.cgroupfs
        )
        return None
    accounts = CgroupAccounts(config.paths.cgroupfs)
    if accounts.version is None:
        (log.debug if quiet else log.info)(
            "no cgroup memory accounts under %s: groups sum their processes", config.paths.cgroupfs
        )
        return None
    (log.debug if quiet else log.info)(
        "group memory from the cgroup v%d accounts under %s", accounts.version, accounts.root
    )
    return CgroupSampler(accounts, config.paths.procfs)


class Sampler:
    def __init__(
        self,
        config: Config,
        gpu=None,
        phase_watcher=None,
        scope: Callable[[Reader], Reader] | None = None,
        host_load: bool = True,
    ):
        self.gpu = gpu
        # wraps the source's reader to narrow what a tick reads: `run`'s sampler reads one process tree (run/tree.py)
        self.scope = scope
        # the host's CPU share and PSI in each sample: two more reads of procfs a tick, which `run` makes only
        # when it serves /metrics
        self.host_load = host_load
        self.errors_total: Counter = Counter()
        self._cpu_prev: tuple[float, float] | None = None
        self._last_system = _EMPTY_SYSTEM
        self.phase: str | None = None
        self.phase_watcher = phase_watcher  # a phase.PhaseWatcher: the phase is then re-read each tick
        # between walks, fresher readings of some groups (the enforcer's lane: the groups its limits watch)
        self.fresh_groups: Callable[[], Sequence[GroupSample]] | None = None
        self._lock = threading.Lock()  # a reload must not close descriptors a tick is reading
        self._walked: Sample | None = None  # the last sample that read every process
        self.walks = 0  # ticks that read every process
        self.configure(config)

    def configure(self, config: Config) -> None:
        source_name, reader = make_reader(config)
        if self.scope is not None:
            reader = self.scope(reader)
        cgroups = make_cgroup_sampler(config, source_name)
        with self._lock:
            old: Reader | None = getattr(self, "reader", None)  # None on the first configure
            self.config, self.source_name, self.reader = config, source_name, reader
            self.cgroups = cgroups
            self._walked = None  # the next tick walks, under the new grouping
        if old is not None:
            old.close()

    def tick(self, walk: bool = True) -> Sample:
        """A sample. `walk=False` (a light tick) reads system memory, CPU, GPUs and PSI only; its processes
        and groups are those of the last walk (`Sample.light` says so)."""
        with self._lock:
            if not walk and self._walked is not None:
                return self._light_tick()
            sample = self._tick()
            self._walked = sample
            self.walks += 1
            return sample

    def read(self) -> Sample:
        """A full sample read outside the walk schedule: neither counted as a walk nor kept for light ticks.
        For a scoped reader whose processes are a few files away (`run`'s tree through child links), where
        every reading is a full one and none lists the host."""
        with self._lock:
            return self._tick()

    def release_descriptors(self) -> None:
        """Close the descriptors a walk keeps for the next one: between walks a minute apart they only
        cost (every listing of this process's descriptors, /metrics' process_open_fds, walks them all)."""
        with self._lock:
            self.reader.close()

    def _light_tick(self) -> Sample:
        start = time.perf_counter()
        last = self._walked
        assert last is not None
        up = {k: v for k, v in last.sources_up.items() if k != "gpu"}
        try:
            system = self.reader.read_system()
            cpu = self._cpu_usage()
            self._last_system = system
        except OSError as e:
            log.error("reading %s failed: %s", self.source_name, e)
            self.errors_total[self.source_name] += 1
            system, cpu = self._last_system, None
            up[self.source_name] = False
        gpus = last.gpus
        if self.gpu is not None and self.gpu.name != "none":
            reading = self.gpu.read(time.monotonic())
            up["gpu"] = reading.up
            if reading.error:
                self.errors_total["gpu"] += 1
            gpus = tuple(reading.cards)
        if self.phase_watcher is not None:
            self.phase = self.phase_watcher.read()
        pressure, cgroup_pressure = self._pressure()
        groups, exported = self._with_fresh_groups(last)
        return dataclasses.replace(
            last,
            groups=groups,
            exported=exported,
            timestamp=time.time(),
            monotonic=time.monotonic(),
            duration_seconds=time.perf_counter() - start,
            system=system,
            cpu_usage_ratio=cpu,
            gpus=gpus,
            sources_up=up,
            errors_total=dict(self.errors_total),
            phase=self.phase,
            pressure=pressure,
            cgroup_pressure=cgroup_pressure,
            interval_seconds=self.config.interval,
            light=True,
        )

    def _with_fresh_groups(self, last: Sample) -> tuple[tuple[GroupSample, ...], tuple[GroupSample, ...]]:
        """The last walk's groups, those read since (a group's limit watches it) as they were read."""
        fresh = self.fresh_groups() if self.fresh_groups is not None else ()
        if not fresh:
            return last.groups, last.exported
        cfg = self.config
        by_key = {g.key: g for g in last.groups} | {g.key: g for g in fresh}
        groups = tuple(sorted(by_key.values(), key=lambda g: g.memory_bytes(cfg.memory), reverse=True))
        return groups, tuple(cap_groups(groups, cfg.groups.max_groups, cfg.groups.min_memory, cfg.memory))

    def _tick(self) -> Sample:
        start = time.perf_counter()
        cfg = self.config
        up: dict[str, bool] = {}
        try:
            system = self.reader.read_system()
            if self.cgroups is not None:
                procs, cgroup_groups, skipped = self.cgroups.sample(self.reader, cfg.groups, cfg.memory)
            else:
                procs, skipped = self.reader.read_processes()
            cpu = self._cpu_usage()
            up[self.source_name] = True
            self._last_system = system
        except OSError as e:
            log.error("reading %s failed: %s", self.source_name, e)
            self.errors_total[self.source_name] += 1
            system, procs, skipped, cpu = self._last_system, [], Counter(), None
            up[self.source_name] = False
        gpus = ()
        if self.gpu is not None and self.gpu.name != "none":
            reading = self.gpu.read(time.monotonic())
            up["gpu"] = reading.up
            if reading.error:
                self.errors_total["gpu"] += 1
            gpus = reading.cards
        if self.cgroups is not None and up[self.source_name]:
            if gpus:
                cgroup_groups = attach_gpu(
                    cgroup_groups, {p.pid: g.key for g in cgroup_groups for p in g.members}, gpus
                )
            with_gpu = cgroup_groups
            groups = tuple(sorted(with_gpu, key=lambda g: g.memory_bytes(cfg.memory), reverse=True))
        else:
            groups = group_processes(procs, cfg.groups, cfg.memory, gpus)
        exported = tuple(cap_groups(groups, cfg.groups.max_groups, cfg.groups.min_memory, cfg.memory))
        if self.phase_watcher is not None:
            self.phase = self.phase_watcher.read()
        pressure, cgroup_pressure = self._pressure()
        return Sample(
            timestamp=time.time(),
            monotonic=time.monotonic(),
            duration_seconds=time.perf_counter() - start,
            system=system,
            cpu_usage_ratio=cpu,
            process_count=len(procs),
            groups=groups,
            processes=tuple(procs),
            gpus=tuple(gpus),
            memtype=cfg.memory,
            sources_up=up,
            skipped=dict(skipped),
            errors_total=dict(self.errors_total),
            phase=self.phase,
            exported=exported,
            pressure=pressure,
            cgroup_pressure=cgroup_pressure,
            interval_seconds=cfg.interval,
        )

    def _pressure(self) -> tuple[MemoryPressure | None, dict[str, MemoryPressure]]:
        """The host's PSI, and that of each cgroup a rule's condition needs (a few small reads; None without PSI)."""
        if not self.host_load:
            return None, {}
        paths = self.config.paths
        host = read_pressure(host_pressure_path(paths.procfs))
        cgroups = {}
        for rule in self.config.enforcer.rules:
            for cgroup in conditions.of(rule).cgroup_pressure(rule):
                if cgroup not in cgroups:
                    reading = read_pressure(cgroup_pressure_path(cgroup, paths.cgroupfs))
                    if reading is not None:
                        cgroups[cgroup] = reading
        return host, cgroups

    def _cpu_usage(self) -> float | None:
        if not self.host_load:
            return None
        busy, total = self.reader.read_cpu_times()
        prev, self._cpu_prev = self._cpu_prev, (busy, total)
        if prev is None or total <= prev[1]:
            return None
        return max(0.0, min(1.0, (busy - prev[0]) / (total - prev[1])))


class GroupReader:
    """Reads between full walks: single groups near a limit, processes new since a listing, system
    memory. Each thread that reads has its own (a reader's caches are not thread-safe)."""

    def __init__(self, config: Config):
        self.config = config
        source_name, self.reader = make_reader(config)
        cgroups = make_cgroup_sampler(config, source_name, quiet=True)
        self.accounts = cgroups.accounts if cgroups is not None else None  # groups measured as the sampler does

    def read_system(self) -> SystemMemory:
        return self.reader.read_system()

    def refresh_group(self, group: GroupSample, newcomers: Sequence[ProcessInfo] = ()) -> GroupSample | None:
        """Re-read just this group's known members; None when all are gone.

        `newcomers` (from `new_processes`) that belong to the group join it; without them,
        members forked since the last full walk are picked up by the next one.
        """
        procs, _ = self.reader.read_processes(p.pid for p in group.members)
        known = {p.identity for p in group.members}
        procs = [p for p in procs if p.identity in known]  # a reused PID is someone else
        seen = {p.pid for p in procs}
        procs += [p for p in newcomers if p.pid not in seen and group_key(p, self.config.groups)[0] == group.key]
        if not procs:
            return None
        fresh = make_group(group.key, group.kind, procs, self.config.memory, dict(group.gpu_memory_bytes))
        return self.by_accounts(fresh, {p.cgroup for p in group.members if p.cgroup})

    def by_accounts(self, group: GroupSample, paths: Collection[str | None] = ()) -> GroupSample:
        """A cgroup group measured as the sampler measures it: by its cgroups' accounts (`paths`, else
        its members' cgroups) where they can be read; as summed from its processes otherwise."""
        if self.accounts is None or group.kind not in CGROUP_KINDS:
            return group
        charges = [self.accounts.charge(p) for p in (paths or {m.cgroup for m in group.members}) if p]
        if not charges or any(c is None for c in charges):
            return group
        swaps = [c.swap_bytes for c in charges if c is not None and c.swap_bytes is not None]
        rss = sum(c.rss_bytes for c in charges if c is not None)
        return dataclasses.replace(group, rss_bytes=rss, pss_bytes=None, swap_bytes=sum(swaps) if swaps else None)

    def new_processes(self, known_pids: Collection[int], unwatched: set[int] | None = None) -> list[ProcessInfo]:
        """Processes whose pid is not in `known_pids`: one directory listing plus the newcomers' few files.
        What the reader kept about processes gone since is dropped here (it never walks fully).
        `unwatched`, when given, receives the new pids that are no process to watch (kernel threads,
        zombies, gone), so that a caller listing often need not read them again."""
        listing = self.reader.pids()
        self.reader.forget_except(listing)
        fresh = [pid for pid in listing if pid not in known_pids]
        procs = self.reader.read_processes(fresh)[0] if fresh else []
        if unwatched is not None and fresh:
            unwatched.update(set(fresh).difference(p.pid for p in procs))
        return procs

    def read_pids(self, pids: Iterable[int], unwatched: set[int] | None = None) -> list[ProcessInfo]:
        """These processes (from process events); `unwatched` receives those that are none to watch."""
        pids = list(pids)
        procs = self.reader.read_processes(pids)[0] if pids else []
        if unwatched is not None and pids:
            unwatched.update(set(pids).difference(p.pid for p in procs))
        return procs

    def read_all(self) -> list[ProcessInfo]:
        """Every process, read without keeping descriptors (a victim's choice between full walks)."""
        return self.reader.read_processes(self.reader.pids())[0]

    def forget_except(self, live: Collection[int]) -> None:
        """Drop what the reader keeps about processes not in `live` (for a reader that never lists)."""
        self.reader.forget_except(live)

    def uptime(self) -> float | None:
        return self.reader.uptime()

    def close(self) -> None:
        self.reader.close()


class SamplingLoop:
    """Ticks every `config.interval` in a daemon thread; `latest` is the newest Sample.

    Every tick walks all processes unless `walk_period` (set by `enforce`, whose rules may not need
    it) says how often to: the ticks between are light (Sampler.tick(walk=False))."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.latest: Sample | None = None
        self.consumers: list[Callable[[Sample], None]] = []
        self.walk_period: Callable[[], float] | None = None
        self._last_walk: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> SamplingLoop:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Sample now instead of at the next interval (after a reload, say)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            period = self.walk_period() if self.walk_period is not None else 0.0
            walk = self._last_walk is None or began - self._last_walk >= period - 0.05
            try:
                sample = self.sampler.tick(walk)
                if not sample.light:
                    self._last_walk = began
                    if period > self.sampler.config.interval:
                        self.sampler.release_descriptors()
            except Exception:  # a bug in one tick must not stop monitoring
                log.exception("sample failed")
                self.sampler.errors_total["sampler"] += 1
                sample = None
            if sample is not None:
                self.latest = sample
                for consume in list(self.consumers):
                    try:
                        consume(sample)
                    except Exception:
                        log.exception("consumer %r failed", consume)
            delay = max(0.0, self.sampler.config.interval - (time.monotonic() - began))
            self._wake.wait(delay)
            self._wake.clear()
