"""The fast lane: which groups are re-read between full samples, and how fast each one grows.

`Growth` is the one growth-rate estimator (the enforcer's lane and `run` both use it): a rise
counts at once, a slow-down halves the rate per reading. A group seen for the first time is
credited with its average growth since its oldest member started, so a group born between two
samples is not taken for a still one.

`Pace` says when to read again, for the fast lane's groups (GROUP_PACE) and for system memory
(SYSTEM_PACE): both are defined here.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from ..procfs import ProcfsReader
from ..reader import Reader
from ..sample import GroupSample, ProcessInfo

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
NEWCOMER_PERIOD = 0.1  # seconds between listings of the procfs root for processes born since the last sample
NEW_PROBE = 0.1  # a group first seen between samples is re-read this soon, whatever its estimate, to learn its rate
# Fast lane: how quickly a group might grow when we have no evidence, the regular shortest
# re-read period, the most groups re-read fast at once, and the predicted-crossing read.
FLOOR_RATE = 100 * 1024 * 1024  # bytes/s
MIN_PERIOD = 0.05
MAX_LANE = 32
PREDICT_MIN_RATE = 32 * 1024 * 1024  # bytes/s of sustained growth before crossings are predicted
PREDICT_LAG = 0.005
MIN_SPACING = 0.01
# System lane, like earlyoom's adaptive poll: the headroom at twice the rate memory is being used,
# but never slower than its fastest fill rate seen (6000 KiB/ms), between 20 ms and the interval.
SYSTEM_FLOOR_RATE = 6000 * 1024 * 1000  # bytes/s
SYSTEM_MIN_PERIOD = 0.02
# Memory used growing steadily (at least this fast) gets one more read just after the predicted crossing
# (PREDICT_LAG later, never closer than SYSTEM_MIN_SPACING): the act follows the crossing by milliseconds.
SYSTEM_PREDICT_MIN_RATE = 32 * 1024 * 1024  # bytes/s
SYSTEM_PREDICT_LAG = 0.002
SYSTEM_MIN_SPACING = 0.005


@dataclass(frozen=True)
class Pace:
    """When to read memory again, like earlyoom's adaptive poll: the headroom at twice the recent
    growth rate (at least `floor_rate`), clamped to [`min_period`, interval].

    Growing steadily (at least `predict_min_rate`) and predicted to cross before that: one more read
    just after the predicted crossing (`predict_lag` later, never sooner than `min_spacing`), so the
    act follows the crossing by milliseconds, not by up to a period.
    """

    floor_rate: float  # bytes/s
    min_period: float
    predict_min_rate: float  # bytes/s
    predict_lag: float
    min_spacing: float

    def period(self, headroom: float, rate: float, interval: float) -> float:
        if headroom <= 0:
            return self.min_period
        period = max(self.min_period, min(interval, headroom / max(2 * rate, self.floor_rate)))
        if rate >= self.predict_min_rate:
            period = min(period, max(self.min_spacing, headroom / rate + self.predict_lag))
        return period


GROUP_PACE = Pace(FLOOR_RATE, MIN_PERIOD, PREDICT_MIN_RATE, PREDICT_LAG, MIN_SPACING)
SYSTEM_PACE = Pace(
    SYSTEM_FLOOR_RATE, SYSTEM_MIN_PERIOD, SYSTEM_PREDICT_MIN_RATE, SYSTEM_PREDICT_LAG, SYSTEM_MIN_SPACING
)
SYSTEM_RETRY = 0.25  # below the threshold with no victim to be had: the next look for one
YOUNG = 60.0  # seconds: older groups get no first-sight rate (their memory says nothing of recent growth)
MIN_DT = 0.02  # readings closer than this do not update the rate
EXEC_SETTLE = 0.5  # seconds: a newcomer this young may not have exec'ed its program yet, so it is read again


def just_started(p: ProcessInfo, uptime: float | None) -> bool:
    """Whether the process may still be between fork and exec (its command line not yet its own)."""
    return uptime is not None and uptime - p.start_time / CLK_TCK < EXEC_SETTLE


class PidWatch:
    """Whether a process (or thread) may have started since the last look: the kernel's most recently
    allocated pid (Reader.newest_pid: the last field of loadavg) has moved. A look costs one small read
    instead of a listing of all processes; where the reader cannot tell (another pid namespace,
    unreadable, no procfs), it always says yes."""

    def __init__(self, reader: Reader | str):
        self._reader = ProcfsReader(reader) if isinstance(reader, str) else reader  # a str: a procfs root
        self._last: bytes | None = None

    def moved(self) -> bool:
        last = self._reader.newest_pid()
        if last is None:
            return True
        moved, self._last = last != self._last, last
        return moved

    def forget(self) -> None:
        """The next look says yes (a listing failed, or found processes to read again)."""
        self._last = None


def first_sight_rate(value: int, members: Iterable[ProcessInfo], uptime: float | None) -> float:
    """Bytes/s averaged since the oldest member started, for a young group; 0 otherwise."""
    if uptime is None:
        return 0.0
    starts = [p.start_time for p in members]
    if not starts:
        return 0.0
    age = uptime - min(starts) / CLK_TCK
    return value / max(age, 0.1) if age < YOUNG else 0.0


def poll_period(headroom: float, rate: float, interval: float) -> float:
    """Seconds until a group should be re-read (GROUP_PACE)."""
    return GROUP_PACE.period(headroom, rate, interval)


def system_period(headroom: float, used_rate: float, interval: float) -> float:
    """Seconds until system memory should be read again (SYSTEM_PACE)."""
    return SYSTEM_PACE.period(headroom, used_rate, interval)


class Growth:
    """Recent growth rate (bytes/s) per key."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[float, int, float]] = {}  # key -> (monotonic, value, rate)

    def observe(self, key: Hashable, value: int, now: float, first_rate: float = 0.0) -> float:
        prev = self._last.get(key)
        if prev is None:
            rate = first_rate
        else:
            t0, v0, r0 = prev
            dt = now - t0
            if dt < MIN_DT:
                return r0
            inst = max(0.0, (value - v0) / dt)
            rate = inst if inst >= r0 else 0.5 * r0 + 0.5 * inst
        self._last[key] = (now, value, rate)
        return rate

    def rate(self, key: Hashable) -> float:
        prev = self._last.get(key)
        return prev[2] if prev else 0.0

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        keys = set(keys)
        for k in [k for k in self._last if k not in keys]:
            del self._last[k]


@dataclass
class LaneEntry:
    rule: str
    group: GroupSample
    limit: int
    due: float


class FastLane:
    """Groups near a limit, each with the monotonic time of its next re-read."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], LaneEntry] = {}  # (rule, group key) -> entry

    def __len__(self) -> int:
        return len(self.entries)

    def next_due(self) -> float | None:
        return min((e.due for e in self.entries.values()), default=None)

    def due(self, now: float) -> list[LaneEntry]:
        return [e for e in self.entries.values() if e.due <= now]

    def groups(self) -> dict[str, GroupSample]:
        """The latest reading of each group in the lane, by key."""
        return {e.group.key: e.group for e in self.entries.values()}

    def member_pids(self) -> set[int]:
        return {p.pid for e in self.entries.values() for p in e.group.members}

    def schedule(
        self,
        rule: str,
        group: GroupSample,
        limit: int,
        value: int,
        rate: float,
        now: float,
        interval: float,
        probe: bool = False,
        keep: bool = False,
    ) -> None:
        """Put the group in the lane when it may cross its limit before the next full sample.
        `probe`: first seen between samples, so re-read within NEW_PROBE to learn how fast it grows.
        `keep`: the next full sample is further than an interval away, so the group is re-read at
        least each interval whatever its headroom."""
        period = poll_period(limit - value, rate, interval)
        if probe:
            period = min(period, NEW_PROBE)
        if keep:
            period = min(period, interval)
        elif period >= interval:
            self.entries.pop((rule, group.key), None)
            return
        entry = self.entries.get((rule, group.key))
        if entry is None:
            self.entries[(rule, group.key)] = LaneEntry(rule, group, limit, now + period)
        else:
            entry.group, entry.limit = group, limit
            entry.due = min(entry.due, now + period) if entry.due > now else now + period

    def drop_group(self, key: str) -> None:
        for lk in [lk for lk in self.entries if lk[1] == key]:
            del self.entries[lk]

    def keep_only(self, keys: set[str]) -> None:
        for lk in [lk for lk, e in self.entries.items() if e.group.key not in keys]:
            del self.entries[lk]
        if len(self.entries) > MAX_LANE:  # keep the groups due soonest
            for lk, _ in sorted(self.entries.items(), key=lambda kv: kv[1].due)[MAX_LANE:]:
                del self.entries[lk]

    def clear(self) -> None:
        self.entries.clear()
