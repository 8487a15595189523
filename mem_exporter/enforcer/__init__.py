"""The enforcer: rules evaluated on every sample, a fast lane for groups near a limit, kills as events.

    enforcer = Enforcer(config, sampler, dry_run=False)
    loop.consumers.append(enforcer.on_sample)    # called from the sampler thread; returns at once
    registry.register(enforcer.collector)        # kills_total, actions_total, limit_bytes, ...
    enforcer.configure(new_config)               # SIGHUP: new rules, state kept by rule name
    enforcer.stop()                              # waits for a kill in progress
    enforcer.listeners.append(fn)                # fn(event) after each event (a cached /metrics can refresh)

Threads: the sampler thread only hands samples over. The enforcer's own thread runs the
policy on each full sample and re-reads groups near their limit every 50..100 ms (the fast
lane); each kill runs in a thread of its own (TERM, grace with re-reads and the hard
ceiling, KILL, confirmed death), so one slow kill never delays the next decision.
Every thread that reads /proc has its own reader (the readers' caches are not thread-safe).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..config import Config
from ..grouping import cap_groups
from ..procfs import parse_stat
from ..sample import GroupSample, ProcessInfo, Sample
from ..sampler import Sampler
from .actuator import Actuator, PidfdWatch
from .events import EventLog, Notifier, make_event
from .policy import (GROUP_MEMORY, LIMIT_MEMTYPE, MAX_LANE, Action, Context, PolicyState, decide, group_value, limits,
                     poll_period, protection)

__all__ = ["Enforcer", "make_context"]

log = logging.getLogger(__name__)

DEATH_TIMEOUT = 10.0  # after the last signal, how long to wait for confirmed death
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def ancestors(pid: int, procfs: str = "/proc") -> frozenset[int]:
    out = set()
    while pid > 1 and pid not in out:
        try:
            with open(f"{procfs}/{pid}/stat", "rb") as f:
                ppid = int(parse_stat(f.read())[1][1])
        except (OSError, ValueError, IndexError):
            break
        if ppid <= 0:
            break
        out.add(ppid)
        pid = ppid
    return frozenset(out)


def make_context(config: Config, dry_run: bool = False) -> Context:
    """The enforcer's own identity (uid, pid, process group, ancestors) and the protect list."""
    return Context(uid=os.geteuid(), pid=os.getpid(), pgid=os.getpgrp(), ancestors=ancestors(os.getpid()),
                   protect=tuple(config.enforcer.protect), dry_run=dry_run)


@dataclasses.dataclass
class _LaneEntry:
    rule: str
    group: GroupSample
    limit: int
    due: float


class Enforcer:
    def __init__(self, config: Config, sampler: Sampler | None = None, dry_run: bool = False,
                 actuator: Actuator | None = None):
        self.sampler = sampler
        self._force_dry_run = dry_run  # `--dry-run` holds across reloads
        self.state = PolicyState()
        self.kills_total: Counter = Counter()
        self.actions_total: Counter = Counter()
        self.last_kill: dict[str, float] = {}
        self.last_time_to_death: dict[str, float] = {}
        self.events: deque = deque(maxlen=200)
        self.latest: Sample | None = None
        self.limit_series: list[tuple[str, str, str, int]] = []  # (rule, group label, memtype, limit)
        self.lane: dict[tuple[str, str], _LaneEntry] = {}
        self.fast_reads = 0
        self._history: dict[str, tuple[float, int, float]] = {}  # group key -> (monotonic, value, bytes/s)
        self._known: set[int] = set()
        self._ignored: set[int] = set()
        self._pending: Sample | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._jobs: set[threading.Thread] = set()
        self._jobs_lock = threading.Lock()
        self._actuator = actuator
        self.collector = EnforcerCollector(self)
        self.listeners: list = []  # called with each event after it is recorded (e.g. Exposition.invalidate)
        self.configure(config)
        self._thread = threading.Thread(target=self._run, name="enforcer", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------------------------
    def configure(self, config: Config) -> None:
        """Take new rules (already validated); per-rule state is kept by rule name."""
        with self._lock:
            self.config = config
            self.rules = list(config.enforcer.rules)
            self.dry_run = self._force_dry_run or config.enforcer.dry_run
            self.ctx = make_context(config, self.dry_run)
            self.event_log = EventLog(config.enforcer.event_log)
            if getattr(self, "notifier", None) is None:
                self.notifier = Notifier(config.enforcer.notify)
            else:
                self.notifier.notify = config.enforcer.notify
            self.actuator = self._actuator or Actuator(config.paths.procfs, config.paths.cgroupfs)
            self._reader = Sampler(config)  # the fast lane's own reader
            self.state.keep_only(r.name for r in self.rules)
            self.lane.clear()
        log.info("enforcer: %d rule(s)%s", len(self.rules), " (dry run: nothing is killed)" if self.dry_run else "")
        self._wake.set()

    def on_sample(self, sample: Sample) -> None:
        """A full sample from the sampler thread: handed to the enforcer thread, never blocks."""
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
        self.notifier.flush(3.0)

    def kills_in_progress(self) -> int:
        return len(self._jobs)

    # --- the enforcer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = min((e.due for e in self.lane.values()), default=None)
            timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                with self._lock:
                    sample, self._pending = self._pending, None
                    if sample is not None:
                        self._on_full(sample)
                    self._fast_lane()
            except Exception:  # a bug in one pass must not stop enforcement
                log.exception("enforcer pass failed")
                time.sleep(0.05)

    def _on_full(self, sample: Sample) -> None:
        self.latest = sample
        self._known = {p.pid for p in sample.processes}
        self._ignored.clear()
        self._dispatch(decide(sample, self.rules, self.state, self.ctx, full=True), sample)
        watched = limits(sample, self.rules, self.ctx.user_name)
        g = self.config.groups
        exported = {x.label for x in cap_groups(sample.groups, g.max_groups, g.min_memory, sample.memtype)
                    if x.kind != "other"}
        self.limit_series = [(r.name, grp.label, LIMIT_MEMTYPE[r.condition], lim)
                             for r, grp, lim in watched if grp.label in exported]
        uptime = self._uptime()
        keys = set()
        for rule, grp, lim in watched:
            if rule.condition not in GROUP_MEMORY:
                continue
            keys.add(grp.key)
            value = group_value(rule, grp)
            rate = self._observe(grp, value, sample.monotonic, uptime)
            self._schedule(rule.name, grp, lim, value, rate, sample.monotonic)
        for key in [k for k in self._history if k not in keys]:
            del self._history[key]
        for lk in [lk for lk, e in self.lane.items() if e.group.key not in keys or e.group.key in self.state.busy]:
            del self.lane[lk]
        if len(self.lane) > MAX_LANE:  # keep the groups due soonest
            for lk, _ in sorted(self.lane.items(), key=lambda kv: kv[1].due)[MAX_LANE:]:
                del self.lane[lk]

    def _observe(self, group: GroupSample, value: int, now: float, uptime: float | None = None) -> float:
        """Record a reading; the group's recent growth rate in bytes/s."""
        prev = self._history.get(group.key)
        if prev is None:
            rate = 0.0
            if uptime is not None and group.members:  # first sight: average growth since the oldest member started
                age = uptime - min(p.start_time for p in group.members) / CLK_TCK
                rate = value / max(age, 0.1) if age < 60 else 0.0
        else:
            t0, v0, r0 = prev
            dt = now - t0
            if dt < 0.02:
                return r0
            inst = max(0.0, (value - v0) / dt)
            rate = inst if inst >= r0 else 0.5 * r0 + 0.5 * inst
        self._history[group.key] = (now, value, rate)
        return rate

    def _schedule(self, rule: str, group: GroupSample, limit: int, value: int, rate: float, now: float) -> None:
        interval = self.config.interval
        period = poll_period(limit - value, rate, interval)
        if period >= interval or group.key in self.state.busy:
            self.lane.pop((rule, group.key), None)
            return
        entry = self.lane.get((rule, group.key))
        if entry is None:
            self.lane[(rule, group.key)] = _LaneEntry(rule, group, limit, now + period)
        else:
            entry.group, entry.limit = group, limit
            entry.due = min(entry.due, now + period) if entry.due > now else now + period

    def _fast_lane(self) -> None:
        now = time.monotonic()
        due = [e for e in self.lane.values() if e.due <= now]
        if not due or self.latest is None:
            return
        members = {p.pid for e in self.lane.values() for p in e.group.members}
        try:
            newcomers = self._reader.new_processes(self._known | members | self._ignored)
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
        self._ignored.update(p.pid for p in newcomers if p.pid not in claimed)
        now = time.monotonic()
        by_rule = {r.name: r for r in self.rules}
        for e in due:
            g = refreshed[e.group.key]
            rule = by_rule.get(e.rule)
            if g is None or rule is None:
                self.lane.pop((e.rule, e.group.key), None)
                continue
            value = group_value(rule, g)
            rate = self._observe(g, value, now)
            e.group, e.due = g, now  # _schedule below sets the next due time
            self._schedule(e.rule, g, e.limit, value, rate, now)
        groups = tuple(g for g in refreshed.values() if g is not None)
        if groups:
            partial = dataclasses.replace(self.latest, groups=groups, monotonic=now, timestamp=time.time(),
                                          processes=self.latest.processes + tuple(newcomers))
            self._dispatch(decide(partial, self.rules, self.state, self.ctx, full=False), partial)

    def _uptime(self) -> float | None:
        try:
            with open(f"{self.config.paths.procfs}/uptime") as f:
                return float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # --- acting -----------------------------------------------------------------------------
    def _dispatch(self, actions: Iterable[Action], sample: Sample) -> None:
        for a in actions:
            if a.kind == "kill":
                self.state.busy.add(a.group.key)
                for lk in [lk for lk in self.lane if lk[1] == a.group.key]:
                    del self.lane[lk]
                job = threading.Thread(target=self._kill_job, args=(a, sample), name=f"kill-{a.group.label}",
                                       daemon=True)
                with self._jobs_lock:
                    self._jobs.add(job)
                job.start()
            else:
                self._record(make_event(a, sample.timestamp, self.config.groups.top_processes, sample.memtype))

    def _record(self, event: dict) -> None:
        rule, action = event["rule"], event["action"]
        self.actions_total[(rule, action)] += 1
        if any(s.get("sent") for s in event.get("signals_sent") or ()):
            self.kills_total[rule] += 1
            self.last_kill[rule] = time.time()
            if event.get("time_to_death_seconds") is not None:
                self.last_time_to_death[rule] = event["time_to_death_seconds"]
        self.events.append(event)
        self.event_log.write(event)
        if action not in ("skipped_protected", "skipped_other_user", "no_victim"):
            self.notifier.send(event)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed", listener)

    def _kill_job(self, action: Action, sample: Sample) -> None:
        try:
            event = self._kill(action, sample)
            with self._lock:
                self._record(event)
        except Exception:
            log.exception("kill of %s failed", action.group.label)
        finally:
            with self._lock:
                self.state.busy.discard(action.group.key)
            with self._jobs_lock:
                self._jobs.discard(threading.current_thread())

    def _kill(self, action: Action, sample: Sample) -> dict:
        """First signal to every member, grace with re-reads (hard ceiling), last signal, confirmed death."""
        rule, group, act = action.rule, action.group, self.actuator
        sigs = [signal.Signals[name] for name in rule.signals]
        pgid = group.pgid if group.kind == "pgid" else None
        cgroup = group.key[7:] if group.kind == "cgroup" else None
        reader = Sampler(self.config)  # this thread's own reader
        targets: dict[tuple[int, int], ProcessInfo] = {p.identity: p for p in action.targets}
        watch = PidfdWatch(act)
        watch.add(targets.values())
        t0 = time.monotonic()
        log_sent: list[dict] = []
        hard = False
        peak = action.value

        def deliver(sig: signal.Signals) -> None:
            live = [p for p in targets.values() if act.alive(p)]
            d = act.signal_all(live, sig, pgid, cgroup)
            log_sent.append({"signal": sig.name, "at_seconds": round(time.monotonic() - t0, 3), "sent": len(d.sent),
                             "mismatch": len(d.mismatch), "denied": len(d.denied), "group": d.group})

        def resample(current: GroupSample) -> GroupSample | None:
            nonlocal peak
            try:
                known = {p.pid for p in targets.values()} | {p.pid for p in sample.processes}
                newcomers = reader.new_processes(known)
                g = reader.refresh_group(current, newcomers)
            except OSError:
                return current
            members = list(g.members) if g else []
            # new members, and new children of any target (a fork that left the group)
            pids = {p.pid for p in targets.values()}
            for p in members + [n for n in newcomers if n.ppid in pids]:
                if (p.identity not in targets and (rule.other_users or p.uid == self.ctx.uid)
                        and protection(p, self.ctx) is None):
                    targets[p.identity] = p
                    watch.add([p])
            if g is not None and action.condition in GROUP_MEMORY:
                peak = max(peak, group_value(rule, g))
            return g

        def over_ceiling(g: GroupSample | None) -> bool:
            if action.ceiling is None:
                return False
            if action.condition in GROUP_MEMORY:
                return g is not None and group_value(rule, g) > action.ceiling
            if action.condition == "system_available_below":
                try:
                    return reader.reader.read_system().available_bytes < action.ceiling
                except OSError:
                    return False
            return False

        deliver(sigs[0])
        current: GroupSample | None = group
        steps = len(sigs) - 1
        gone_at = None
        i = 1
        if not log_sent[0]["sent"] and not log_sent[0]["group"]:
            steps = 0  # nothing verified to signal (gone, or a reused pid): no grace, no second signal
        while i <= steps:
            deadline = t0 + rule.grace * i / steps
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                watch.wait(min(0.05, left))
                current = resample(current) if current is not None else None
                if current is None and not any(act.alive(p) for p in targets.values()):
                    gone_at = time.monotonic()
                    break
                if not hard and over_ceiling(current):
                    hard = True
                    break
            if gone_at is not None:
                break
            if hard:
                i = steps  # straight to the last signal
            deliver(sigs[i])
            i += 1
        if gone_at is None and (steps or log_sent[0]["sent"]):
            for _ in range(3):  # confirm death; catch members that appeared meanwhile
                left = act.wait_gone(list(targets.values()), DEATH_TIMEOUT)
                if left:
                    break
                if current is not None:
                    current = resample(current)
                if not [p for p in targets.values() if act.alive(p)]:
                    break
                deliver(sigs[-1])
            alive = [p for p in targets.values() if act.alive(p)]
            gone_at = time.monotonic() if not alive else None
        watch.close()
        sent_any = any(s["sent"] for s in log_sent)
        alive = [p for p in targets.values() if act.alive(p)]
        mismatch_only = not sent_any and any(s["mismatch"] for s in log_sent)
        last_sent = next((s["signal"] for s in reversed(log_sent) if s["sent"]), None)
        kind = last_sent[3:].lower() if last_sent else ("skipped_identity" if mismatch_only else "skipped_gone")
        outcome = "survived" if alive else ("dead" if sent_any else ("identity_mismatch" if mismatch_only else "gone"))
        a = dataclasses.replace(action, kind=kind)
        return make_event(a, time.time(), self.config.groups.top_processes, sample.memtype,
                          outcome=outcome, signals_sent=[s for s in log_sent if s["sent"] or s["mismatch"] or s["denied"]],
                          hard_ceiling=hard, ceiling=action.ceiling, peak_bytes=peak if action.condition in GROUP_MEMORY else None,
                          signalled=[{"pid": p.pid, "comm": p.comm} for p in targets.values()][:50],
                          survivors=[p.pid for p in alive],
                          time_to_death_seconds=round(gone_at - t0, 3) if gone_at is not None and sent_any else None,
                          dry_run=False)


class EnforcerCollector:
    """Enforcement metrics, fresh per scrape."""

    def __init__(self, enforcer: Enforcer):
        self.e = enforcer

    def describe(self) -> list:
        return []

    def collect(self):
        e = self.e
        P = "mem_exporter_enforcer_"
        with e._lock:
            rules = [r.name for r in e.rules]
            kills = dict(e.kills_total)
            actions = dict(e.actions_total)
            series = list(e.limit_series)
            lane = len(e.lane)
            last_kill = dict(e.last_kill)
            ttd = dict(e.last_time_to_death)
        c = CounterMetricFamily(P + "kills", "Process groups killed (a signal delivered), by rule.", labels=["rule"])
        for r in sorted(set(rules) | set(kills)):
            c.add_metric([r], kills.get(r, 0))
        yield c
        c = CounterMetricFamily(P + "actions", "Enforcer actions by rule and action (term, kill, dry_run, skipped_...).",
                                labels=["rule", "action"])
        for (r, a), n in sorted(actions.items()):
            c.add_metric([r, a], n)
        yield c
        # memtype matches group_memory_bytes' label (rss, pss) so alerts join on it; gpu for VRAM limits
        g = GaugeMetricFamily(P + "limit_bytes", "The limit a rule holds an exported group to, by memory type.",
                              labels=["rule", "group", "memtype"])
        for r, grp, memtype, lim in series:
            g.add_metric([r, grp, memtype], lim)
        yield g
        g = GaugeMetricFamily(P + "rules", "Enforcer rules loaded.")
        g.add_metric([], len(rules))
        yield g
        g = GaugeMetricFamily(P + "dry_run", "1 when the enforcer only logs what it would kill.")
        g.add_metric([], 1 if e.dry_run else 0)
        yield g
        g = GaugeMetricFamily(P + "fast_lane_groups", "Groups near a limit, re-read between full samples.")
        g.add_metric([], lane)
        yield g
        g = GaugeMetricFamily(P + "kills_in_progress", "Kills between the first signal and confirmed death.")
        g.add_metric([], e.kills_in_progress())
        yield g
        g = GaugeMetricFamily(P + "last_kill_timestamp_seconds", "Unix time of the rule's last kill.", labels=["rule"])
        for r, ts in sorted(last_kill.items()):
            g.add_metric([r], ts)
        yield g
        g = GaugeMetricFamily(P + "last_time_to_death_seconds", "From the first signal to confirmed death, last kill.",
                              labels=["rule"])
        for r, s in sorted(ttd.items()):
            g.add_metric([r], s)
        yield g
