"""The Enforcer: its own thread runs the policy on each full sample and on the fast lane's re-reads.

    enforcer = Enforcer(config, dry_run=False)
    loop.consumers.append(enforcer.on_sample)    # called from the sampler thread; returns at once
    registry.register(enforcer.collector)        # kills_total, actions_total, limit_bytes, ...
    enforcer.configure(new_config)               # SIGHUP: new rules, state kept by rule name
    enforcer.stop()                              # waits for a kill in progress
    enforcer.listeners.append(fn)                # fn(event) after each event (a cached /metrics can refresh)

Threads: the sampler thread only hands samples over. The enforcer's thread decides under its
lock and acts outside it: each kill runs in a thread of its own (kill.execute), so one slow
kill never delays the next decision, and event records are written (fsync) outside the lock,
so a slow disk delays neither decisions nor scrapes. Every thread that reads /proc has its
own reader (the readers' caches are not thread-safe).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..cgroupfs_reader import CGROUP_KINDS
from ..config import Config
from ..grouping import group_key, group_processes, make_group
from ..outbox import dropped
from ..pressure import FALLBACK_PERIOD, PressureWatches
from ..procconnector import ProcConnector
from ..records import QUIET_ACTIONS, make_event
from ..sample import GroupSample, ProcessInfo, Sample
from ..sampler import GroupReader
from ..signals import signal_number
from . import conditions
from .actuator import Actuator, own_context
from .actuators import make_actuator
from .conditions import FAST, PRESSURE, SAMPLE, SYSTEM, in_lane
from .events import EventLog, Notifier
from .kill import KillOrder, execute
from .lane import (
    MAX_LANE,
    NEWCOMER_PERIOD,
    SYSTEM_MIN_PERIOD,
    SYSTEM_RETRY,
    FastLane,
    Growth,
    PidWatch,
    first_sight_rate,
    just_started,
    system_period,
)
from .metrics import EnforcerCollector, EnforcerState, Tally
from .policy import (
    Action,
    PolicyState,
    decide,
    eligible,
    forget_processes,
    group_limit,
    group_value,
    limits,
    selects,
)

__all__ = ["Enforcer"]

log = logging.getLogger(__name__)

CANDIDATES = 8  # groups re-read for a fresh victim choice when the system lane fires


class Kill(NamedTuple):
    """A kill decided under the lock, carried out on a thread of its own."""

    action: Action
    group: GroupSample  # the victim (action.group, never None for a kill)
    sample: Sample  # what the decision saw


class Enforcer:
    def __init__(
        self,
        config: Config,
        dry_run: bool = False,
        actuator: Actuator | None = None,
        start_thread: Callable[[threading.Thread], None] = threading.Thread.start,
        lean: bool = False,
    ):
        self._force_dry_run = dry_run  # `--dry-run` holds across reloads
        # `enforce`: every process is read only as often as the rules need it (walk_period); `serve`
        # with the enforcer walks every interval for the metrics it exports
        self._lean = lean
        self.walk_period_seconds = 0.0  # read by the sampler thread without the lock: one float
        self.victim_walks = 0  # every process read between walks, to choose a victim from fresh readings
        self._events: ProcConnector | None = None
        self.state = PolicyState()
        self.tally = Tally()
        self.events: deque = deque(maxlen=200)
        self.latest: Sample | None = None
        self.limit_series: list[tuple[str, str, str, int]] = []  # (rule, group label, memtype, limit)
        self.lane = FastLane()
        self.growth = Growth()
        self.fast_reads = 0
        self.system_reads = 0
        self.newcomer_scans = 0
        self._next_scan = 0.0
        self._next_system = 0.0
        self._next_pressure = 0.0
        self.pressure: PressureWatches | None = None
        self._known: set[int] = set()
        self._selected: set[str] = set()  # keys of the groups a group-memory rule selected at the last walk
        self._ignored: set[int] = set()
        self._settling: set[int] = set()  # newcomers too young to be judged by their command line yet
        self._pending: Sample | None = None
        self._outbox: list[dict] = []  # events decided under the lock, written after it
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._jobs: set[threading.Thread] = set()
        self._jobs_lock = threading.Lock()
        self._start_thread = start_thread
        self._actuator = actuator
        self.notifier: Notifier | None = None
        self.collector = EnforcerCollector(self.snapshot)
        self.listeners: list = []  # called with each event after it is recorded (e.g. Exposition.invalidate)
        self.configure(config)
        self._thread = threading.Thread(target=self._run, name="enforcer", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------------------------
    def configure(self, config: Config) -> None:
        """Take new rules (already validated); per-rule state is kept by rule name."""
        reader = GroupReader(config)  # the fast lane's own reader
        group_rules = bool(in_lane(config.enforcer.rules, FAST))
        want_events = group_rules and config.enforcer.process_events == "auto" and config.source != "psutil"
        events = self._events if want_events and self._events is not None else None
        if want_events and events is None:
            events = ProcConnector.open(config.paths.procfs)
        with self._lock:
            self.config = config
            self.rules = list(config.enforcer.rules)
            # each lane judges the rules whose condition it serves (conditions.py: a condition's lane)
            self.group_rules = in_lane(self.rules, FAST)
            self.system_rules = in_lane(self.rules, SYSTEM)
            self.pressure_rules = in_lane(self.rules, PRESSURE)
            old_pressure, self.pressure = self.pressure, PressureWatches.from_config(config)
            self.dry_run = self._force_dry_run or config.enforcer.dry_run
            self.ctx = own_context(
                config.paths.procfs,
                tuple(config.enforcer.protect),
                self.dry_run,
                cgroupfs=config.paths.cgroupfs,
                reader=reader.reader,
            )
            self.event_log = EventLog(
                config.enforcer.event_log, config.enforcer.event_log_max_size, config.enforcer.event_log_keep
            )
            if self.notifier is None:
                self.notifier = Notifier(config.enforcer.notify)
            else:
                self.notifier.notify = config.enforcer.notify
            self.actuator = self._actuator or make_actuator(config)
            old, self._reader = getattr(self, "_reader", None), reader
            self._pids = PidWatch(reader.reader)
            self.state.keep_only(r.name for r in self.rules)
            self.lane.clear()
            old_events, self._events = self._events, events
            self.walk_period_seconds = self._walk_period(config)
        if old_events is not None and old_events is not events:
            old_events.close()
        if old_pressure is not None:
            old_pressure.close()
        if old is not None:
            old.close()  # under no lock: the enforcer thread holds the lock whenever it reads
        log.info("enforcer: %d rule(s)%s", len(self.rules), " (dry run: nothing is killed)" if self.dry_run else "")
        self._wake.set()

    def walk_period(self) -> float:
        """How often the sampler must read every process for these rules (SamplingLoop.walk_period):
        0 for every tick. Between walks system memory, PSI and GPUs are read each tick, the groups a
        group-memory rule selects stay in the fast lane (re-read at least each interval), newcomers
        come from process events (or the listing), and a victim is chosen from a fresh walk."""
        return self.walk_period_seconds

    def _walk_period(self, config: Config, selected: int = 0) -> float:
        slow = config.enforcer.walk_interval
        if not self._lean or slow <= config.interval:
            return 0.0
        if self.group_rules and self._events is None:
            return 0.0  # without process events only a walk sees a program exec in place (same pid, new command line)
        if any(c.per_group and c.lane == SAMPLE for c in map(conditions.of, self.rules)):
            return 0.0  # no lane reads it between walks (a group's GPU memory: its members' GPU processes)
        if selected > MAX_LANE:  # more selected groups than the lane holds: the walk reads them all
            return 0.0
        return slow

    @property
    def process_events(self) -> bool:
        """Whether newcomers come from the kernel's process events (else: listing procfs)."""
        return self._events is not None

    def on_sample(self, sample: Sample) -> None:
        """A full sample from the sampler thread: handed to the enforcer thread, never blocks."""
        pending = self._pending
        if sample.light and pending is not None and not pending.light:
            # a walk not yet taken in must not be lost behind a light tick: this one carries its groups
            sample = dataclasses.replace(sample, light=False)
        self._pending = sample
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop deciding; wait for kills in progress to finish (never stops in the middle of one)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        for job in list(self._jobs):
            job.join(max(0.0, deadline - time.monotonic()))
        if self.notifier is not None:
            self.notifier.flush(3.0)
        self.event_log.close()  # fsync what the kills above wrote
        if self._events is not None:
            self._events.close()
            self._events = None

    def kills_in_progress(self) -> int:
        return len(self._jobs)

    def watched_groups(self) -> list[GroupSample]:
        """The latest reading of each group in the fast lane (between slow walks: every selected group)."""
        with self._lock:
            return list(self.lane.groups().values())

    def current_limits(self) -> list[tuple[str, str, str, int]]:
        """(rule, group label, memtype, limit) of every group a limit watches: the last walk's; between slow
        walks the lane keeps every selected group, so its groups (newcomers too) are the ones watched now."""
        with self._lock:  # the lane changes on the enforcer thread; the session log asks from the sampler's
            if not self.walk_period_seconds:
                return self.limit_series
            memtype = {r.name: conditions.of(r).memtype for r in self.rules}
            return [
                (e.rule, e.group.label, memtype[e.rule], e.limit)
                for e in list(self.lane.entries.values())
                if e.rule in memtype
            ]

    def snapshot(self) -> EnforcerState:
        with self._lock:
            t = self.tally
            return EnforcerState(
                rules=tuple(r.name for r in self.rules),
                kills=dict(t.kills),
                actions=dict(t.actions),
                limits=tuple(self.current_limits()),
                dry_run=self.dry_run,
                fast_lane_groups=len(self.lane),
                kills_in_progress=self.kills_in_progress(),
                last_kill=dict(t.last_kill),
                last_time_to_death=dict(t.last_time_to_death),
                events_dropped=dropped(),
            )

    # --- the enforcer thread ----------------------------------------------------------------
    def _next_wake(self) -> float | None:
        """When the thread has work before the next full sample: a lane re-read, a newcomer scan, a
        system-memory read. The last two run only while a rule needs them and a sample has been seen."""
        times = [self.lane.next_due()]
        if self.latest is not None:
            if self.group_rules:
                times.append(self._next_scan)
            if self.system_rules:
                times.append(self._next_system)
            if self.pressure:
                times.append(self._next_pressure)
        return min((t for t in times if t is not None), default=None)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = self._next_wake()
            timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            kills: list[Kill] = []
            try:
                with self._lock:
                    sample, self._pending = self._pending, None
                    if sample is not None:
                        kills += self._on_full(sample)
                    now = time.monotonic()
                    latest = self.latest
                    if self.system_rules and latest is not None and now >= self._next_system:
                        kills += self._system_lane(now, latest)
                    if self.pressure and self.latest is not None and now >= self._next_pressure:
                        kills += self._pressure_lane(now)
                    if self.group_rules and latest is not None and now >= self._next_scan:
                        kills += self._newcomers(now, latest)
                    kills += self._fast_lane()
                    events, self._outbox = self._outbox, []
                for kill in kills:
                    self._start_kill(kill)
                self._publish(events)
            except Exception:  # a bug in one pass must not stop enforcement
                log.exception("enforcer pass failed")
                time.sleep(0.05)

    def _on_full(self, sample: Sample) -> list[Kill]:
        self.latest = sample
        if sample.light:  # processes as of the last walk: only the conditions read afresh are judged
            rules = [r for r in self.rules if not conditions.of(r).per_group]
            return self._decide_fresh(sample, rules) if rules else []
        self._known = {p.pid for p in sample.processes}
        self._ignored.clear()
        if self._events is not None:  # no listing prunes the lane reader's cache: the walk does
            self._reader.forget_except(self._known)
        kills = self._dispatch(decide(sample, self.rules, self.state, self.ctx, full=True), sample)
        watched = limits(sample, self.rules, self.ctx.user_name)
        exported = {x.label for x in sample.exported if x.kind != "other"}
        self.limit_series = [
            (r.name, grp.label, conditions.of(r).memtype, lim) for r, grp, lim in watched if grp.label in exported
        ]
        uptime = self._uptime()
        keys = set()
        for rule, grp, lim in watched:
            if conditions.of(rule).lane != FAST:
                continue
            keys.add(grp.key)
            value = group_value(rule, grp)
            rate = self.growth.observe(grp.key, value, sample.monotonic, first_sight_rate(value, grp.members, uptime))
            self._schedule(rule.name, grp, lim, value, rate, sample.monotonic)
        self.growth.keep_only(keys | {"system"})
        self.lane.keep_only(keys - self.state.busy)
        # every per-group and per-process map is bounded by what is alive (thousands of short-lived groups)
        if all(sample.sources_up.values()):  # a failed read shows no groups: they are not gone
            live = {g.key for g in sample.groups} | self.state.busy
            self.state.forget_gone(live, sample.monotonic, self.rules, sample.monotonic - sample.duration_seconds)
        forget_processes({(p.pid, p.start_time) for p in sample.processes})
        self._selected = keys
        self.walk_period_seconds = self._walk_period(self.config, len(keys))
        return kills

    def _decide_fresh(self, sample: Sample, rules: list) -> list[Kill]:
        """Decide victim-choosing rules (system memory, PSI, a card's memory) on `sample`; if it is light
        and a rule would act, every process is read now and the decision taken again on fresh groups."""
        saved = copy.deepcopy(self.state) if sample.light else None
        actions = decide(sample, rules, self.state, self.ctx, full=True)
        if not actions or saved is None:
            return self._dispatch(actions, sample)
        self.state = saved
        fresh = self._walk(sample)
        return self._dispatch(decide(fresh, rules, self.state, self.ctx, full=True), fresh)

    def _walk(self, sample: Sample) -> Sample:
        """`sample` with every process read now (the victim's choice needs fresh groups); it becomes the
        latest. A failed read keeps the sample's own groups."""
        try:
            procs = self._reader.read_all()
        except OSError:
            return sample
        self.victim_walks += 1
        cfg = self.config
        now = time.monotonic()
        fresh = dataclasses.replace(
            sample,
            groups=tuple(
                sorted(
                    (self._reader.by_accounts(g) for g in group_processes(procs, cfg.groups, cfg.memory, sample.gpus)),
                    key=lambda g: g.memory_bytes(cfg.memory),
                    reverse=True,
                )
            ),
            processes=tuple(procs),
            process_count=len(procs),
            monotonic=now,
            light=False,
            timestamp=time.time(),
        )
        self.latest = fresh  # `_known` stays: a process born since the last walk is still a newcomer for the lane
        return fresh

    def _schedule(
        self, rule: str, group: GroupSample, limit: int, value: int, rate: float, now: float, probe: bool = False
    ) -> None:
        if group.key in self.state.busy:
            self.lane.drop_group(group.key)
        else:
            # between slow walks the lane is what reads a selected group: it keeps every one
            keep = self.walk_period_seconds > 0
            self.lane.schedule(rule, group, limit, value, rate, now, self.config.interval, probe, keep)

    def _newcomers(self, now: float, latest: Sample) -> list[Kill]:
        """No blind spot between full samples: processes started since are read (only they), and a
        group they start or join that a group-memory rule selects goes into the fast lane at once,
        its growth estimated from its age, or is acted on now if it is already over its limit."""
        self._next_scan = now + NEWCOMER_PERIOD
        newcomers = self._read_newcomers()
        if not newcomers:
            return []
        fresh = self._joined_groups(newcomers, latest)
        now = time.monotonic()
        uptime = self._uptime()
        claimed: set[int] = set()
        for rule in self.group_rules:
            lim = group_limit(rule)
            for g in fresh:
                if not selects(rule.match, g, self.ctx.user_name):
                    continue
                claimed.update(p.pid for p in g.members)
                value = group_value(rule, g)
                rate = self.growth.observe(g.key, value, now, first_sight_rate(value, g.members, uptime))
                self._schedule(rule.name, g, lim, value, rate, now, probe=True)
        self._known |= claimed
        for p in newcomers:  # unclaimed: ignored until the next full sample, unless it may not have exec'ed yet
            if p.pid not in claimed:  # (with process events, an exec is an event of its own: no settling)
                settle = just_started(p, uptime) and self._events is None
                (self._settling if settle else self._ignored).add(p.pid)
        if not claimed:
            return []
        partial = dataclasses.replace(
            latest,
            groups=tuple(fresh),
            monotonic=now,
            timestamp=time.time(),
            processes=latest.processes + tuple(newcomers),
        )
        return self._dispatch(decide(partial, self.group_rules, self.state, self.ctx, full=False), partial)

    def _read_newcomers(self) -> list[ProcessInfo]:
        """The processes started (or exec'ed) since the last scan, read: from process events where they
        come, else by listing procfs when a pid was handed out since."""
        unwatched: set[int] = set()
        fresh_pids = self._event_pids()
        if fresh_pids is not None:  # from the kernel's events: exactly the processes forked or exec'ed since
            if not fresh_pids:
                return []
            self.newcomer_scans += 1
            try:
                newcomers = self._reader.read_pids(sorted(fresh_pids), unwatched)
            except OSError:
                return []
        else:
            if not self._settling and not self._pids.moved():  # no pid handed out since the last scan
                return []
            self.newcomer_scans += 1
            try:
                newcomers = self._reader.new_processes(self._known | self.lane.member_pids() | self._ignored, unwatched)
            except OSError:
                self._pids.forget()
                return []
        self._ignored |= unwatched  # kernel threads, zombies: not read again until the next full sample
        self._settling.clear()
        return newcomers

    def _joined_groups(self, newcomers: list[ProcessInfo], latest: Sample) -> list[GroupSample]:
        """The groups newcomers start or join that a group-memory rule selects (or selected at the last
        walk), read now; the groups being killed are left to their kill."""
        cfg = self.config
        # a group in the lane has members that joined since the last walk: start from the lane's reading
        known_groups = {g.key: g for g in latest.groups} | self.lane.groups()
        fresh: list[GroupSample] = []
        for key, (kind, procs) in self._by_group(newcomers).items():
            if key in self.state.busy:
                continue
            base = known_groups.get(key)
            # a group no rule selected at the last walk, joined by newcomers no rule selects, is not re-read
            joined = make_group(key, kind, list(procs), cfg.memory)
            if key not in self._selected and not any(
                selects(r.match, joined, self.ctx.user_name) for r in self.group_rules
            ):
                continue
            try:
                g = self._reader.refresh_group(base, procs) if base is not None else joined
            except OSError:
                continue
            if g is not None:
                fresh.append(g)
        return fresh

    def _event_pids(self) -> set[int] | None:
        """Pids forked or exec'ed since the last look, from process events; None without events, or after a
        loss (the caller then lists procfs: a full rescan for newcomers). Exits are forgotten here."""
        if self._events is None:
            return None
        events, lost = self._events.read()
        pids: set[int] = set()
        for e in events:
            if e.kind == "exit":
                pids.discard(e.pid)
                self._known.discard(e.pid)
                self._ignored.discard(e.pid)
            else:  # a fork, or an exec (a new program, even in a process seen before)
                pids.add(e.pid)
        if lost:
            log.warning("process events were lost: listing %s for newcomers", self.config.paths.procfs)
            self._pids.forget()
            return None
        return pids

    def _by_group(self, procs: list[ProcessInfo]) -> dict[str, tuple[str, list[ProcessInfo]]]:
        """Processes read between full samples, by the group key (and kind) a full sample would give them."""
        by_key: dict[str, tuple[str, list[ProcessInfo]]] = {}
        for p in procs:
            key, kind = group_key(p, self.config.groups)
            by_key.setdefault(key, (kind, []))[1].append(p)
        return by_key

    def _system_lane(self, now: float, latest: Sample) -> list[Kill]:
        """System memory read adaptively, like earlyoom (sooner as the headroom shrinks and the faster
        it falls); past a threshold, the victim is chosen from fresh readings of the largest candidates."""
        try:
            system = self._reader.read_system()
        except OSError:
            self._next_system = now + self.config.interval
            return []
        self.system_reads += 1
        now = time.monotonic()
        used_rate = self.growth.observe("system", system.used_bytes, now)
        headroom = min(conditions.of(r).headroom(r, system) for r in self.system_rules)
        self._next_system = now + system_period(headroom, used_rate, self.config.interval)
        if headroom >= 0:
            return []
        # Below: the candidates are re-read only when a rule may act now (not cooling down, its `for` held);
        # otherwise the next read waits for the first rule that could, and the decision only keeps time.
        waits = []
        for r in self.system_rules:
            rs, key = self.state.for_rule(r.name), conditions.of(r).key
            last = rs.last_action.get(key)
            cooling = 0.0 if last is None else last + r.cooldown - now
            waits.append(max(cooling, rs.since.get(key, now) + r.for_ - now))
        if min(waits) > 0:
            self._next_system = now + min(self.config.interval, max(SYSTEM_MIN_PERIOD, min(waits)))
            partial = dataclasses.replace(latest, system=system, groups=(), monotonic=now, timestamp=time.time())
            return self._dispatch(decide(partial, self.system_rules, self.state, self.ctx, full=True), partial)
        if latest.light:  # the groups are as old as the last walk: choose from every process read now
            partial = self._walk(dataclasses.replace(latest, system=system))
            kills = self._dispatch(decide(partial, self.system_rules, self.state, self.ctx, full=True), partial)
            if not kills:
                self._next_system = now + min(self.config.interval, SYSTEM_RETRY)
            return kills
        try:
            newcomers = self._reader.new_processes(self._known | self._ignored)
        except OSError:
            newcomers = []
        candidates = [
            g
            for g in latest.groups
            if g.key not in self.state.busy
            and g.kind != "other"
            and any(selects(r.match, g, self.ctx.user_name) for r in self.system_rules)
        ][:CANDIDATES]
        by_key = self._by_group(newcomers)
        fresh: dict[str, GroupSample] = {}
        for g in candidates:
            try:
                now_g = self._reader.refresh_group(g, by_key.pop(g.key, (None, []))[1])
            except OSError:
                now_g = g
            if now_g is not None:
                fresh[now_g.key] = now_g
        for key, (kind, procs) in by_key.items():  # groups born since the last full sample
            if key not in fresh and key not in self.state.busy:
                fresh[key] = make_group(key, kind, procs, self.config.memory)
        groups = tuple(sorted(fresh.values(), key=lambda g: g.memory_bytes(latest.memtype), reverse=True))
        partial = dataclasses.replace(
            latest,
            system=system,
            groups=groups,
            monotonic=now,
            timestamp=time.time(),
            processes=latest.processes + tuple(newcomers),
        )
        kills = self._dispatch(decide(partial, self.system_rules, self.state, self.ctx, full=True), partial)
        if not kills:  # no eligible victim: looking again at the fastest pace would only burn the CPU it needs
            self._next_system = now + min(self.config.interval, SYSTEM_RETRY)
        return kills

    def _pressure_lane(self, now: float) -> list[Kill]:
        """PSI between full samples: kernel triggers where accepted, reads where not (pressure.py),
        checked every FALLBACK_PERIOD; a crossing is decided on the latest sample with PSI read now."""
        self._next_pressure = now + FALLBACK_PERIOD
        if self.pressure is None or self.latest is None or not self.pressure.wait(0):
            return []
        return self._decide_fresh(self.pressure.refresh(self.latest), self.pressure_rules)

    def _fast_lane(self) -> list[Kill]:
        now = time.monotonic()
        due = self.lane.due(now)
        latest = self.latest
        if not due or latest is None:
            return []
        try:  # with process events, newcomers join the lane's groups through _newcomers instead
            newcomers = (
                []
                if self._events is not None
                else self._reader.new_processes(self._known | self.lane.member_pids() | self._ignored)
            )
        except OSError:
            newcomers = []
        refreshed: dict[str, GroupSample | None] = {}
        for e in due:
            if e.group.key not in refreshed:
                try:
                    refreshed[e.group.key] = self._reader.refresh_group(e.group, newcomers)
                except OSError:
                    refreshed[e.group.key] = e.group
                self.fast_reads += 1
        claimed = {p.pid for g in refreshed.values() if g for p in g.members}
        uptime = self._uptime() if newcomers else None
        for p in newcomers:  # as in _newcomers: one that may not have exec'ed yet is read again
            if p.pid not in claimed:
                (self._settling if just_started(p, uptime) else self._ignored).add(p.pid)
        now = time.monotonic()
        by_rule = {r.name: r for r in self.rules}
        for e in due:
            g = refreshed[e.group.key]
            rule = by_rule.get(e.rule)
            if g is None or rule is None:
                self.lane.entries.pop((e.rule, e.group.key), None)
                continue
            value = group_value(rule, g)
            rate = self.growth.observe(g.key, value, now)
            e.group, e.due = g, now  # _schedule below sets the next due time
            self._schedule(e.rule, g, e.limit, value, rate, now)
        groups = tuple(g for g in refreshed.values() if g is not None)
        if not groups:
            return []
        partial = dataclasses.replace(
            latest, groups=groups, monotonic=now, timestamp=time.time(), processes=latest.processes + tuple(newcomers)
        )
        return self._dispatch(decide(partial, self.rules, self.state, self.ctx, full=False), partial)

    def _uptime(self) -> float | None:
        return self._reader.uptime()

    # --- acting -----------------------------------------------------------------------------
    def _dispatch(self, actions: Iterable[Action], sample: Sample) -> list[Kill]:
        """Kills to start (their groups marked busy); every other action becomes an event now."""
        kills = []
        for a in actions:
            if a.kind == "kill" and a.group is not None:  # a kill always names its victim
                self.state.busy.add(a.group.key)
                self.lane.drop_group(a.group.key)
                kills.append(Kill(a, a.group, sample))
            else:
                if a.kind == "dry_run":
                    a = self._fresh_members(a, self._reader)
                self._count(make_event(a, sample.timestamp, self.config.groups.top_processes, sample.memtype))
        return kills

    @staticmethod
    def _fresh_members(action: Action, reader: GroupReader) -> Action:
        """A cgroup group measured by its accounts carries its members as first seen: the event's top
        processes are read now (the group's own figure stays the one the decision saw)."""
        g = action.group
        if g is None or reader.accounts is None or g.kind not in CGROUP_KINDS:
            return action
        try:
            now = reader.refresh_group(g)
        except OSError:
            return action
        return action if now is None else dataclasses.replace(action, group=dataclasses.replace(g, members=now.members))

    def _count(self, event: dict) -> None:
        """Under the lock: the event counts at once; it is written and sent after the lock is released."""
        self.tally.count(event, time.time())
        self.events.append(event)
        self._outbox.append(event)

    def _publish(self, events: list[dict]) -> None:
        for event in events:
            self.event_log.write(event)
            if event["action"] not in QUIET_ACTIONS and self.notifier is not None:
                self.notifier.send(event)
            for listener in list(self.listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("event listener %r failed", listener)

    def _start_kill(self, kill: Kill) -> None:
        job = threading.Thread(target=self._kill_job, args=(kill,), name=f"kill-{kill.group.label}", daemon=True)
        with self._jobs_lock:
            self._jobs.add(job)
        try:
            self._start_thread(job)
        except RuntimeError as e:  # no thread to be had: the kill still happens, on this thread
            log.error("cannot start a kill thread (%s): killing %s on the enforcer thread", e, kill.group.label)
            self._kill_job(kill, job)

    def _kill_job(self, kill: Kill, job: threading.Thread | None = None) -> None:
        job = job or threading.current_thread()
        action, sample = kill.action, kill.sample
        try:
            event = self._kill(kill)
        except Exception as e:
            log.exception("kill of %s failed", kill.group.label)
            a = dataclasses.replace(action, kind="failed", reason=f"{type(e).__name__}: {e}")
            event = make_event(a, time.time(), self.config.groups.top_processes, sample.memtype)
        finally:
            with self._lock:
                self.state.busy.discard(kill.group.key)
            with self._jobs_lock:
                self._jobs.discard(job)
        with self._lock:
            self._count(event)
            events, self._outbox = self._outbox, []
        self._publish(events)

    def _kill(self, kill: Kill) -> dict:
        """Stop the group through the kill engine: members, descendants and newcomers, hard ceiling."""
        action, group, sample = kill
        rule = action.rule
        measured = conditions.of(rule).lane == FAST  # the group's memory is what the rule limits: its peak is told
        reader = GroupReader(self.config)  # this thread's own reader
        known = {p.pid for p in sample.processes}
        current: GroupSample | None = group
        peak = action.value
        targets: dict[int, ProcessInfo] = {p.pid: p for p in action.targets}
        judged = {p.identity: True for p in action.targets} | {p.identity: False for p in action.spared}

        def refresh() -> tuple[list[ProcessInfo], bool]:
            nonlocal current, peak
            if current is None:
                return [], False
            try:
                newcomers = reader.new_processes(known | set(targets))
                g = reader.refresh_group(current, newcomers)
            except OSError:
                return [], False
            current = g
            if g is not None and measured:
                peak = max(peak, group_value(rule, g))

            # new members, and new children of any target (a fork that left the group); a member this rule
            # may not signal ends every group-wide signal (killpg, cgroup.kill) from here on
            def may(p: ProcessInfo) -> bool:
                ok = judged.get(p.identity)
                if ok is None:
                    ok = judged[p.identity] = eligible(p, rule, self.ctx)
                return ok

            members = g.members if g else ()
            if not all(map(may, members)):
                order.pgid = order.cgroup = None
            joined = [p for p in members if may(p)] + [n for n in newcomers if n.ppid in targets and may(n)]
            targets.update((p.pid, p) for p in joined)
            return joined, self._over_ceiling(action, g, reader)

        signals = [n for n in map(signal_number, rule.signals) if n is not None]  # the config checked each name
        order = KillOrder(
            signals=signals,
            grace=rule.grace,
            targets=action.targets,
            # group-wide signals only where they reach no one the rule spares
            pgid=group.pgid if group.kind == "pgid" and not action.spared else None,
            cgroup=group.key[7:] if group.kind == "cgroup" and not action.spared else None,
        )
        shown = self._fresh_members(action, reader)  # read before the signals: after them they are gone
        try:
            report = execute(self.actuator, order, refresh)
        finally:
            reader.close()
        a = dataclasses.replace(shown, kind=report.kind)
        return make_event(
            a,
            time.time(),
            self.config.groups.top_processes,
            sample.memtype,
            **report.event_fields(),
            ceiling=action.ceiling,
            peak_bytes=peak if measured else None,
            dry_run=False,
        )

    @staticmethod
    def _over_ceiling(action: Action, group: GroupSample | None, reader: GroupReader) -> bool:
        if action.ceiling is None:
            return False
        return conditions.of(action.rule).past_ceiling(action, group, reader.read_system)
