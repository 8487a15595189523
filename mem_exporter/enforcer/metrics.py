"""The enforcer's metric families, defined once: `enforce`, `serve` with the enforcer and `run --listen`
all export them through `EnforcerCollector`, with the same names and labels.

Every counter starts at 0 for every rule it can count (and every action a rule can take), so
`increase()` sees the first kill. `mem_exporter_enforcer_limit_bytes` carries `memtype` (rss, pss,
gpu) so alerts join it with `mem_exporter_group_memory_bytes` on (group, memtype).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..outbox import SINKS

PREFIX = "mem_exporter_enforcer_"

# every action an event can record, so each (rule, action) series exists from the start
ACTIONS = (
    "term",
    "kill",
    "dry_run",
    "skipped_protected",
    "skipped_other_user",
    "no_victim",
    "skipped_gone",
    "skipped_identity",
    "failed",
)


@dataclass(frozen=True)
class EnforcerState:
    """What the families are rendered from: a snapshot taken under the owner's lock."""

    rules: tuple[str, ...] = ()
    kills: Mapping[str, int] = field(default_factory=dict)  # rule -> groups killed
    actions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (rule, action) -> count
    limits: tuple[tuple[str, str, str, float], ...] = ()  # (rule, group, memtype, bytes)
    dry_run: bool = False
    fast_lane_groups: int = 0
    kills_in_progress: int = 0
    last_kill: Mapping[str, float] = field(default_factory=dict)  # rule -> unix time
    last_time_to_death: Mapping[str, float] = field(default_factory=dict)  # rule -> seconds
    events_dropped: Mapping[str, int] = field(default_factory=dict)  # sink -> items a full queue dropped


def families(s: EnforcerState) -> Iterable[Metric]:
    rules = sorted(set(s.rules) | set(s.kills))
    c = CounterMetricFamily(PREFIX + "kills", "Process groups killed (a signal delivered), by rule.", labels=["rule"])
    for r in rules:
        c.add_metric([r], s.kills.get(r, 0))
    yield c
    c = CounterMetricFamily(
        PREFIX + "actions",
        "Enforcer actions by rule and action (term, kill, dry_run, skipped_...).",
        labels=["rule", "action"],
    )
    for r, a in sorted({(r, a) for r in rules for a in ACTIONS} | set(s.actions)):
        c.add_metric([r, a], s.actions.get((r, a), 0))
    yield c
    g = GaugeMetricFamily(
        PREFIX + "limit_bytes",
        "The limit a rule holds an exported group to, by memory type.",
        labels=["rule", "group", "memtype"],
    )
    for r, grp, memtype, lim in s.limits:
        g.add_metric([r, grp, memtype], lim)
    yield g
    g = GaugeMetricFamily(PREFIX + "rules", "Enforcer rules loaded.")
    g.add_metric([], len(s.rules))
    yield g
    g = GaugeMetricFamily(PREFIX + "dry_run", "1 when the enforcer only logs what it would kill.")
    g.add_metric([], 1 if s.dry_run else 0)
    yield g
    g = GaugeMetricFamily(PREFIX + "fast_lane_groups", "Groups near a limit, re-read between full samples.")
    g.add_metric([], s.fast_lane_groups)
    yield g
    g = GaugeMetricFamily(PREFIX + "kills_in_progress", "Kills between the first signal and confirmed death.")
    g.add_metric([], s.kills_in_progress)
    yield g
    g = GaugeMetricFamily(PREFIX + "last_kill_timestamp_seconds", "Unix time of the rule's last kill.", labels=["rule"])
    for r, ts in sorted(s.last_kill.items()):
        g.add_metric([r], ts)
    yield g
    g = GaugeMetricFamily(
        PREFIX + "last_time_to_death_seconds", "From the first signal to confirmed death, last kill.", labels=["rule"]
    )
    for r, sec in sorted(s.last_time_to_death.items()):
        g.add_metric([r], sec)
    yield g
    c = CounterMetricFamily(
        PREFIX + "events_dropped",
        "Log lines, event records and notifications dropped because their sink (stderr, the event log file, "
        "a webhook) did not keep up; dropped, never waited for.",
        labels=["sink"],
    )
    for sink in sorted(set(SINKS) | set(s.events_dropped)):
        c.add_metric([sink], s.events_dropped.get(sink, 0))
    yield c


class EnforcerCollector:
    """Renders `families()` from a snapshot each scrape; `describe()` names them, so a registry refuses
    a second collector of the same names."""

    def __init__(self, snapshot: Callable[[], EnforcerState]):
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return list(families(EnforcerState()))

    def collect(self) -> Iterable[Metric]:
        return families(self.snapshot())


class Tally:
    """Counts events into the families' numbers: one place decides what a kill is."""

    def __init__(self) -> None:
        self.kills: Counter[str] = Counter()
        self.actions: Counter[tuple[str, str]] = Counter()
        self.last_kill: dict[str, float] = {}
        self.last_time_to_death: dict[str, float] = {}

    def count(self, event: Mapping, now: float) -> None:
        rule, action = event["rule"], event["action"]
        self.actions[(rule, action)] += 1
        if any(s.get("sent") for s in event.get("signals_sent") or ()):
            self.kills[rule] += 1
            self.last_kill[rule] = now
            if event.get("time_to_death_seconds") is not None:
                self.last_time_to_death[rule] = event["time_to_death_seconds"]
