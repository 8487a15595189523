"""The numbers in a report: peaks, zones, phases, releases, leaks, kills, near misses, and what to change.

Pure functions of a `Run`; no files, no charts. Thresholds are module constants, documented in docs/report.md.
"""

from __future__ import annotations

import bisect
import math
import re
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ..config import Zones
from ..enforcer import conditions
from ..units import format_bytes
from ..zones import DEFAULT_ZONES, ZONE_NAMES, Kind, zone_for
from .model import Run, RunRecord, Series

ZONES = ZONE_NAMES  # shares of the capacity per kind of resource: mem_exporter/zones.py
NEAR_MISS = 0.90  # a peak at or above this share of a limit (or a card) that was not killed
# Leak: a straight-line fit over the group's life that is both good and steep enough.
LEAK_MIN_SAMPLES = 10
LEAK_MIN_R2 = 0.80
LEAK_MIN_GROWTH_BYTES = 16 * 2**20
LEAK_MIN_GROWTH_RATIO = 0.10  # of the fitted starting size
LEAK_MIN_SHARE_OF_RUN = 0.25  # sustained: a process that lived two seconds of an hour is not a leak
LEAK_MIN_SECONDS = 5.0  # a test suite that grows until it ends a few seconds in is starting up, not leaking
# A phase that gained memory should give at least half of it back by the low point of the next one.
RELEASE_MIN_SHARE = 0.5
RELEASE_MIN_BYTES = 256 * 2**20
_IDLE = re.compile(r"idle", re.I)
_NOT_KILLS = ("dry_run", "no_victim")


RUN_MB = 1000**2  # `run` speaks MB (10^6 bytes): a report of run logs does too
RUN_HEADROOM = 1.25  # a suggested `-t`: the peak plus this share, rounded up to RUN_STEP_MB
RUN_STEP_MB = 100


def format_mb(n: int | float | None) -> str:
    """A size in `run`'s unit, as its exit line prints it: `201.3 MB`."""
    return "-" if n is None else f"{float(n) / RUN_MB:.1f} MB"


def limit_text(r: RunRecord) -> str:
    """A run's limit as the user typed it: `-t 800` is `800 MB` (a bare number is MB), `-t 1.5GB` stays."""
    text = (r.threshold_text or "").strip()
    if not text:
        return f"{r.threshold_bytes / RUN_MB:g} MB"
    try:
        float(text)
    except ValueError:
        return text
    return f"{text} MB"


def suggested_threshold(peak: float) -> int:
    """A `-t` (MB) with headroom over `peak`: 201 MB gives 300, 823 MB gives 1100."""
    return int(math.ceil(peak * RUN_HEADROOM / RUN_MB / RUN_STEP_MB) * RUN_STEP_MB)


def zone(ratio: float, kind: Kind = "limit") -> str:
    return zone_for(kind, ratio)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def durations(times: list[float]) -> list[float]:
    """How long each sample stands for: until the next one, but a gap (the exporter was down) counts as
    at most three usual steps; the last sample counts as one usual step."""
    if len(times) < 2:
        return [0.0] * len(times)
    step = statistics.median(b - a for a, b in pairwise(times))
    return [min(b - a, 3 * step) for a, b in pairwise(times)] + [step]


@dataclass
class Stats:
    name: str
    peak: float
    peak_t: float
    mean: float
    p95: float
    samples: int
    capacity: float | None
    zones: dict[str, float] | None  # zone -> seconds, where a capacity is known
    kind: Kind = "system_memory"  # which zones apply
    critical_from: float = DEFAULT_ZONES.system_memory.critical

    @property
    def peak_ratio(self) -> float | None:
        return self.peak / self.capacity if self.capacity else None


def stats(
    series: Series,
    capacity: float | None = None,
    start: float | None = None,
    end: float | None = None,
    kind: Kind = "system_memory",
    zones: Zones = DEFAULT_ZONES,
) -> Stats | None:
    """Peak, mean over samples, p95 and time per zone, optionally only for start <= t < end."""
    lo = 0 if start is None else bisect.bisect_left(series.times, start)
    hi = len(series.times) if end is None else bisect.bisect_left(series.times, end)
    times, values = series.times[lo:hi], series.values[lo:hi]
    if not values:
        return None
    capacity = capacity if capacity is not None else series.capacity
    i = max(range(len(values)), key=values.__getitem__)
    time_in = None
    if capacity:
        time_in = dict.fromkeys(ZONES, 0.0)
        for v, d in zip(values, durations(times), strict=True):
            time_in[zone_for(kind, v / capacity, zones)] += d
    return Stats(
        series.name,
        values[i],
        times[i],
        sum(values) / len(values),
        percentile(values, 0.95),
        len(values),
        capacity,
        time_in,
        kind,
        getattr(zones, kind).critical,
    )


def fit(times: list[float], values: list[float]) -> tuple[float, float, float]:
    """Least squares line: (slope per second, value at times[0], R²)."""
    t0 = times[0]
    xs = [t - t0 for t in times]
    mx, my = sum(xs) / len(xs), sum(values) / len(values)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in values)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True))
    if sxx == 0:
        return 0.0, my, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy else 0.0
    return slope, my - slope * mx, r2


@dataclass
class Leak:
    group: str
    slope: float  # bytes per second
    r2: float
    growth: float  # bytes over the fitted span
    seconds: float
    start: float  # fitted size at the start
    flagged: bool


def leak(series: Series, run_seconds: float) -> Leak | None:
    if len(series.values) < LEAK_MIN_SAMPLES:
        return None
    slope, start, r2 = fit(series.times, series.values)
    seconds = series.times[-1] - series.times[0]
    growth = slope * seconds
    flagged = (
        r2 >= LEAK_MIN_R2
        and growth >= LEAK_MIN_GROWTH_BYTES
        and seconds >= LEAK_MIN_SHARE_OF_RUN * run_seconds
        and seconds >= LEAK_MIN_SECONDS
        and growth >= LEAK_MIN_GROWTH_RATIO * max(start, 1.0)
    )
    return Leak(series.name, slope, r2, growth, seconds, start, flagged)


@dataclass
class Segment:
    phase: str | None
    start: float
    end: float  # the next segment's start (or the run's end plus one step)


def segments(run: Run) -> list[Segment]:
    out: list[Segment] = []
    step = durations(run.times)[-1] if run.times else 0.0
    for t, p in zip(run.times, run.phases, strict=True):
        if not out or out[-1].phase != p:
            if out:
                out[-1].end = t
            out.append(Segment(p, t, t))
    if out:
        out[-1].end = run.end + (step or 1e-3)
    return out


@dataclass
class Transition:
    before: str | None
    after: str | None
    at: float
    resource: str
    gained: float  # during the earlier phase: its last value minus its first
    end_before: float
    low_after: float

    @property
    def released(self) -> float:
        return self.end_before - self.low_after


def _window(series: Series, start: float, end: float) -> list[float]:
    return series.values[bisect.bisect_left(series.times, start) : bisect.bisect_left(series.times, end)]


def transitions(run: Run, segs: list[Segment]) -> list[Transition]:
    out = []
    resources = [run.system] + [run.gpus[k] for k in sorted(run.gpus)]
    for a, b in pairwise(segs):
        for series in resources:
            va, vb = _window(series, a.start, a.end), _window(series, b.start, b.end)
            if va and vb and (va[0], va[-1]) != (min(vb), min(vb)):  # skip what never moved (an idle card)
                out.append(Transition(a.phase, b.phase, b.start, series.name, va[-1] - va[0], va[-1], min(vb)))
    return out


def is_kill(ev: dict[str, Any]) -> bool:
    action = str(ev.get("action", ""))
    return bool(action) and action not in _NOT_KILLS and not action.startswith("skipped")


@dataclass
class NearMiss:
    what: str
    peak: float
    limit: float
    rule: str | None  # None: the limit is the card's (or the host's) memory

    @property
    def ratio(self) -> float:
        return self.peak / self.limit


@dataclass
class Analysis:
    run: Run
    system: Stats | None
    swap: Stats | None
    gpus: list[Stats]
    groups: list[Stats]  # the top groups by peak
    phases: list[dict[str, Any]]
    segments: list[Segment]
    transitions: list[Transition]
    leaks: list[Leak]  # every group checked, flagged first
    kills: list[dict[str, Any]]
    dry_runs: list[dict[str, Any]]
    near_misses: list[NearMiss]
    recommendations: list[str] = field(default_factory=list)
    zones: Zones = DEFAULT_ZONES
    fmt: Callable[[int | float | None], str] = format_bytes  # sizes as the logs' writer speaks them

    def run_of(self, series: str) -> RunRecord | None:
        return next((r for r in self.run.runs if r.series == series), None)


def group_capacity(run: Run, series: Series) -> float | None:
    """A group's zones are measured against its tightest limit, else the host's RAM."""
    return min(series.limits.values()) if series.limits else run.system.capacity


def group_kind(series: Series) -> Kind:
    return "limit" if series.limits else "system_memory"


def phase_rows(run: Run, segs: list[Segment], zones: Zones = DEFAULT_ZONES) -> list[dict[str, Any]]:
    """One row per phase name, in order of first appearance; a phase that recurs is summed."""
    rows: dict[str | None, dict[str, Any]] = {}
    for seg in segs:
        row = rows.setdefault(seg.phase, {"phase": seg.phase, "seconds": 0.0, "windows": []})
        row["seconds"] += seg.end - seg.start
        row["windows"].append((seg.start, seg.end))
    out = []

    def merged(series: Series, windows: list[tuple[float, float]], kind: Kind = "system_memory") -> Stats | None:
        part = Series(series.name, series.capacity)
        for s, e in windows:
            lo, hi = bisect.bisect_left(series.times, s), bisect.bisect_left(series.times, e)
            part.times += series.times[lo:hi]
            part.values += series.values[lo:hi]
        return stats(part, kind=kind, zones=zones)

    for row in rows.values():
        windows = row["windows"]
        row["system"] = merged(run.system, windows)
        row["gpus"] = {k: merged(run.gpus[k], windows, kind="gpu_memory") for k in sorted(run.gpus)}
        groups = [g for g in (merged(s, windows) for s in run.groups.values() if s.name != "other") if g]
        row["top_group"] = max(groups, key=lambda g: g.peak, default=None)
        out.append(row)
    return out


def analyse(run: Run, top: int = 8, zones: Zones = DEFAULT_ZONES) -> Analysis:
    """Everything the report says about `run`, judged by `zones` (the config's, or the defaults)."""
    segs = segments(run)
    group_stats = [
        st
        for st in (stats(s, group_capacity(run, s), kind=group_kind(s), zones=zones) for s in run.groups.values())
        if st
    ]
    group_stats.sort(key=lambda st: st.peak, reverse=True)
    leaks = [lk for lk in (leak(s, run.end - run.start) for s in run.groups.values() if s.name != "other") if lk]
    leaks.sort(key=lambda lk: (not lk.flagged, -lk.growth))
    kills = [e for e in run.events if is_kill(e)]
    killed = {e.get("group") for e in kills}
    near: list[NearMiss] = []
    for s in run.groups.values():
        if s.limits and s.values and s.name not in killed:
            rule, limit = min(s.limits.items(), key=lambda kv: kv[1])
            if max(s.values) >= NEAR_MISS * limit:
                near.append(NearMiss(s.name, max(s.values), limit, rule))
    for s in [run.system, *run.gpus.values()]:
        if s.capacity and s.values and max(s.values) >= NEAR_MISS * s.capacity:
            near.append(NearMiss(s.name, max(s.values), s.capacity, None))
    a = Analysis(
        run=run,
        system=stats(run.system, zones=zones),
        swap=stats(run.swap, zones=zones) if run.swap.capacity else None,
        gpus=[st for k in sorted(run.gpus) if (st := stats(run.gpus[k], kind="gpu_memory", zones=zones))],
        groups=group_stats[:top],
        phases=phase_rows(run, segs, zones),
        segments=segs,
        transitions=transitions(run, segs),
        leaks=leaks,
        kills=kills,
        dry_runs=[e for e in run.events if e.get("action") == "dry_run"],
        near_misses=near,
        zones=zones,
        fmt=format_mb if run.only_runs else format_bytes,
    )
    a.recommendations = recommendations(a)
    return a


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second * 60)}/min"


def _per_group(event: dict) -> bool:
    """Whether the event's condition holds each group to a limit of its own (max_rss, max_pss, ...)."""
    cond = conditions.named(str(event.get("condition", "")))
    return cond is not None and cond.per_group


def recommendations(a: Analysis) -> list[str]:
    """Concrete advice from the numbers, most urgent first."""
    out = [
        *_kill_advice(a),
        *_near_miss_advice(a),
        *_leak_advice(a),
        *_zone_advice(a),
        *_release_advice(a),
        *_swap_advice(a),
    ]
    if not out:
        out.append(
            "Nothing to change: every peak stayed out of the critical zone, no group came near a limit, "
            "and no group grew steadily."
        )
    return out


def _kill_advice(a: Analysis) -> list[str]:
    """Per group and rule that killed: what to do about the limit."""
    out: list[str] = []
    format_bytes = a.fmt  # every size below in the logs' own unit (MB for run logs)
    by_group: dict[tuple[str, str], list[dict]] = {}
    for e in a.kills:
        by_group.setdefault((str(e.get("group") or "a group"), str(e.get("rule"))), []).append(e)
    for (group, rule), evs in by_group.items():
        held = max((e.get("memory_bytes") or 0 for e in evs), default=0)
        r = a.run_of(group) if rule == "run" else None
        if r is not None:
            peak = max(r.peak_bytes or 0, held)
            out.append(
                f"`{shlex.join(r.command)}` was killed at {format_bytes(held)} (limit {limit_text(r)}, peak "
                f"{format_bytes(peak)}): if it needs that much, rerun with `-t {suggested_threshold(peak)}` "
                "(the peak + 25 %, rounded up) and see where it settles; otherwise cut its memory (fewer "
                "workers, smaller fixtures), since the limit did its job."
            )
            continue
        limit = next((e.get("limit") for e in evs if e.get("limit")), None)
        text = f"**{group}** was killed {len(evs)}× by rule `{rule}`"
        if held:
            text += f" holding {format_bytes(held)}"
        if limit and _per_group(evs[0]):  # a group's own limit, in bytes (gpu_memory_above's is a ratio)
            text += f" (limit {format_bytes(limit)})"
        out.append(
            text + ": if it really needs that much, raise the limit to about 25 % above that; "
            "otherwise cut its memory (smaller batches, fewer workers), since the limit did its job."
        )
    return out


def _near_miss_advice(a: Analysis) -> list[str]:
    """Per group that came near its limit, without a kill."""
    out: list[str] = []
    format_bytes = a.fmt
    for nm in a.near_misses:
        if nm.rule is None:
            continue
        r = a.run_of(nm.what) if nm.rule == "run" else None
        if r is not None:
            out.append(
                f"`{shlex.join(r.command)}` peaked at {format_bytes(nm.peak)}, {nm.ratio:.0%} of its limit "
                f"({limit_text(r)}): rerun with `-t {suggested_threshold(nm.peak)}` (the peak + 25 %, rounded up) "
                "or reduce its memory; one larger spike and `run` kills it."
            )
            continue
        out.append(
            f"**{nm.what}** peaked at {format_bytes(nm.peak)}, {nm.ratio:.0%} of the {format_bytes(nm.limit)} "
            f"limit of rule `{nm.rule}`: raise the limit to at least {format_bytes(nm.peak * 1.25)} "
            "(peak + 25 %) or reduce its memory; one larger spike and the enforcer kills it."
        )
    return out


def _leak_advice(a: Analysis) -> list[str]:
    """Per group that grew steadily: look for a leak, and when it reaches its limit at this rate."""
    run, out = a.run, []
    format_bytes = a.fmt
    killed = {e.get("group") for e in a.kills}  # no "time to the limit" for a group already killed
    for lk in (lk for lk in a.leaks if lk.flagged):
        series = run.groups[lk.group]
        text = (
            f"**{lk.group}** grew steadily by {format_bytes(lk.slope * 60)}/min (R² {lk.r2:.2f}) over "
            f"{format_seconds(lk.seconds)}, {format_bytes(lk.growth)} in all: look for a leak (caches that never "
            "shrink, lists that keep growing, tensors kept alive)"
        )
        ceiling = min(series.limits.values()) if series.limits else None
        if ceiling and lk.slope > 0 and ceiling > series.values[-1] and lk.group not in killed:
            text += (
                f"; at this rate it reaches its {format_bytes(ceiling)} limit in "
                f"{format_seconds((ceiling - series.values[-1]) / lk.slope)}"
            )
        out.append(text + ".")
    return out


def _zone_advice(a: Analysis) -> list[str]:
    """For the host and each GPU: time in the critical zone, or much of the run in the caution zone."""
    run, out = a.run, []
    format_bytes = a.fmt
    for st in [a.system, *a.gpus]:
        if st is None or not st.zones:
            continue
        total = sum(st.zones.values()) or 1.0
        where = run.phase_at(st.peak_t)
        during = f" during phase '{where}'" if where else ""
        if st.zones["critical"] > 0:
            fix = (
                (
                    "add RAM or swap, run fewer jobs at once, or let the enforcer guard the host "
                    "(a rule with `system_available_below: 10%`)"
                )
                if st is a.system
                else (
                    "load fewer models at once, use smaller or quantized models, or cap VRAM per group "
                    "(a rule with `max_gpu_memory`)"
                )
            )
            out.append(
                f"**{st.name}** was critical (> {st.critical_from:.0%}) for "
                f"{format_seconds(st.zones['critical'])} "
                f"({st.zones['critical'] / total:.0%} of the run) and peaked at {format_bytes(st.peak)} of "
                f"{format_bytes(st.capacity)} ({st.peak_ratio:.0%}){during}: {fix}."
            )
        elif st.zones["caution"] / total > 0.25:
            out.append(
                f"**{st.name}** spent {st.zones['caution'] / total:.0%} of the run in the caution zone "
                f"(peak {format_bytes(st.peak)}, {st.peak_ratio:.0%}){during}: little headroom is left "
                "for a bigger input or one more job."
            )
    return out


def _release_advice(a: Analysis) -> list[str]:
    """Memory a phase gained and did not give back when the run moved on to an idle phase."""
    out: list[str] = []
    format_bytes = a.fmt
    for tr in a.transitions:
        if (
            tr.gained >= RELEASE_MIN_BYTES
            and tr.released < RELEASE_MIN_SHARE * tr.gained
            and (tr.after is None or _IDLE.search(tr.after or ""))
        ):
            out.append(
                f"**{tr.resource}** kept {format_bytes(tr.gained - max(tr.released, 0))} of the "
                f"{format_bytes(tr.gained)} it gained in phase '{tr.before}' after switching to "
                f"'{tr.after}': free it before the next phase (drop references, `gc.collect()`, "
                "`torch.cuda.empty_cache()`, unload the model)."
            )
    return out


def _swap_advice(a: Analysis) -> list[str]:
    """Swap that was used in earnest."""
    out: list[str] = []
    format_bytes = a.fmt
    if a.swap and a.swap.peak >= max(RELEASE_MIN_BYTES, 0.1 * (a.swap.capacity or 0)):
        out.append(
            f"**Swap** peaked at {format_bytes(a.swap.peak)}: the host ran short of RAM and paged out; "
            "expect slowdowns, and treat the RAM numbers above as a floor."
        )
    return out
