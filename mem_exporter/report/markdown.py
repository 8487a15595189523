"""The Markdown text of a report."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from ..config import Zones
from ..enforcer import conditions
from ..units import format_bytes
from .analysis import (
    LEAK_MIN_GROWTH_BYTES,
    LEAK_MIN_GROWTH_RATIO,
    LEAK_MIN_R2,
    LEAK_MIN_SAMPLES,
    LEAK_MIN_SECONDS,
    LEAK_MIN_SHARE_OF_RUN,
    NEAR_MISS,
    ZONES,
    Analysis,
    Stats,
    format_seconds,
    limit_text,
)
from .model import Run


def _zone_text(z: Zones) -> str:
    return ", ".join(
        f"{what} {getattr(z, kind).caution:.0%} / {getattr(z, kind).critical:.0%}"
        for what, kind in (("system RAM", "system_memory"), ("GPU memory", "gpu_memory"), ("a group's limit", "limit"))
    )


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _zones(st: Stats) -> list[str]:
    if not st.zones:
        return ["-"] * len(ZONES)
    total = sum(st.zones.values()) or 1.0
    return [f"{st.zones[z] / total:.0%}" for z in ZONES]


def _stats_row(st: Stats, fmt=format_bytes) -> list[str]:
    share = f"{st.peak_ratio:.0%}" if st.peak_ratio is not None else "-"
    return [st.name, fmt(st.capacity), fmt(st.peak), share, fmt(st.mean), fmt(st.p95), *_zones(st)]


def _exit_text(status: int | None, cause: str | None) -> str:
    if status is None:
        return "- (no exit line: still running, or `run` was killed)"
    why = {"memory": "killed for memory", "signal": "stopped by a signal", "not_started": "not started"}
    return f"{status}" + (f" ({why[cause]})" if cause in why else "")


def _run_seconds(seconds: float | None) -> str:
    """A run's duration as its exit line has it: tenths of a second for a short one (a 3.3 s test suite)."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else format_seconds(seconds)


def _run_rows(run: Run, fmt) -> list[list[str]]:
    """One row per `mem-exporter run`, from its own lines: what it ran, its limit as typed, peak, exit, kill."""
    rows = []
    for i, r in enumerate(run.runs, 1):
        killed = "-"
        if r.killed is not None:
            killed = f"yes, at {fmt(r.killed.get('memory_bytes'))}" + (
                "" if r.killed.get("outcome") in (None, "dead") else f" ({r.killed.get('outcome')})"
            )
        rows.append(
            [
                str(i),
                f"`{shlex.join(r.command)}`",
                _when(r.started),
                _run_seconds(r.duration),
                limit_text(r),
                fmt(r.peak_bytes),
                _exit_text(r.exit_status, r.cause),
                killed,
            ]
        )
    return rows


def _run_facts(run: Run, fmt) -> list[list[str]]:
    """The facts of a report of one `run`: from its own records, as `run` itself printed them."""
    if len(run.runs) != 1 or not run.only_runs:
        return [["Runs", str(len(run.runs))]] if run.runs else []
    r = run.runs[0]
    return [
        ["Command", f"`{shlex.join(r.command)}`"],
        ["Limit", limit_text(r)],
        ["Peak", fmt(r.peak_bytes)],
        ["Exit status", _exit_text(r.exit_status, r.cause)],
    ]


STATS_HEADER = ["Resource", "Capacity", "Peak", "Peak share", "Mean", "p95", "Safe", "Caution", "Critical"]


def render(a: Analysis, charts: dict[str, Path], note: str = "") -> str:
    run = a.run
    names = sorted({name for s in run.sessions if (name := s.get("session"))})
    lines = [f"# Memory report{': ' + ', '.join(names) if names else ''}", ""]
    if not run.times:
        return "\n".join(lines + ["No samples found in: " + ", ".join(run.sources), ""])
    lines += _facts(a, note)
    lines += _runs(a)
    lines += _summary(a, charts)
    lines += _groups(a, charts)
    lines += _phases(a)
    lines += _leaks(a)
    lines += _kills(a)
    lines += _recommendations(a)
    return "\n".join(lines)


def _facts(a: Analysis, note: str) -> list[str]:
    """The table of facts: sources, the run's command and limit, the time span, the samples, the host."""
    run = a.run
    hosts = sorted({host for s in run.sessions if (host := s.get("host"))})
    fmt = a.fmt
    lines: list[str] = []
    start, end = run.start, run.end
    if run.only_runs:  # a run's own start and end, not its first and last sample
        start, end = min(r.started for r in run.runs), max(r.end for r in run.runs)
    duration = _run_seconds(end - start) if run.only_runs else format_seconds(end - start)
    if run.only_runs and len(run.runs) > 1:
        duration += f" (from the first run's start to the last one's end; {len(run.runs)} runs)"
    facts = [
        ["Sources", "<br>".join(f"`{s}`" for s in run.sources)],
        *_run_facts(run, fmt),
        ["From", _when(start)],
        ["To", _when(end)],
        ["Duration", duration],
        ["Samples", str(len(run.times))],
        ["Memory measure", run.memtype],
    ]
    if hosts:
        facts.append(["Host", ", ".join(hosts)])
    lines += _table(["", ""], facts)
    if note:
        lines += [note, ""]
    return lines


def _runs(a: Analysis) -> list[str]:
    """`run`'s runs, one row each, and who was largest at the highest peak."""
    run = a.run
    fmt = a.fmt
    lines: list[str] = []
    if run.runs:
        lines += ["## Runs", ""]
        lines += _table(["#", "Command", "Started", "Duration", "Limit", "Peak", "Exit", "Killed"], _run_rows(run, fmt))
        peak_run = max(run.runs, key=lambda r: r.peak_bytes or 0)
        if peak_run.peak_members:
            who = ", ".join(
                f"{m.get('comm')}[{m.get('pid')}] {fmt(m.get('memory_bytes'))}" for m in peak_run.peak_members[:5]
            )
            lines += [f"Largest at the peak of {fmt(peak_run.peak_bytes)}: {who}.", ""]
    return lines


def _summary(a: Analysis, charts: dict[str, Path]) -> list[str]:
    """System RAM, swap and each GPU: peaks, means, time per zone."""
    fmt = a.fmt
    lines = ["## Summary", ""]
    rows = [_stats_row(st, fmt) for st in [a.system, a.swap, *a.gpus] if st]
    lines += _table(STATS_HEADER, rows)
    for key, title in (("system", "System memory"), ("gpus", "GPU memory")):
        if key in charts:
            lines += [f"![{title}]({charts[key].name})", ""]
    return lines


def _groups(a: Analysis, charts: dict[str, Path]) -> list[str]:
    """The largest groups, each measured against its tightest limit, else the host's RAM."""
    run = a.run
    fmt = format_bytes = a.fmt  # every size in the logs' own unit: MB for `run` logs, as `run` prints them
    lines = ["## Largest groups", ""]
    if a.groups:
        rows = []
        for st in a.groups:
            limits = run.groups[st.name].limits
            cells = _stats_row(st, fmt)
            r = a.run_of(st.name)
            cells[1] = (
                f"{limit_text(r)} (limit)"
                if r is not None
                else f"{format_bytes(min(limits.values()))} (limit)"
                if limits
                else f"{format_bytes(st.capacity)} (RAM)"
                if st.capacity
                else "-"
            )
            rows.append(cells)
        lines += _table(["Group", "Measured against", *STATS_HEADER[2:]], rows)
        if "groups" in charts:
            lines += [f"![Largest groups]({charts['groups'].name})", ""]
    else:
        lines += ["No groups were logged.", ""]
    return lines


def _phases(a: Analysis) -> list[str]:
    """Per phase: time, RAM and GPU peaks and means, the largest group; what each change of phase released."""
    run = a.run
    format_bytes = a.fmt  # every size in the logs' own unit: MB for `run` logs, as `run` prints them
    lines = ["## Phases", ""]
    if any(row["phase"] for row in a.phases):
        gpu_keys = sorted(run.gpus)
        header = ["Phase", "Time", "RAM peak", "RAM mean"]
        for k in gpu_keys:
            header += [f"GPU {k} peak", f"GPU {k} mean"]
        header.append("Largest group (peak)")
        rows = []
        for row in a.phases:
            cells = [row["phase"] or "(none)", format_seconds(row["seconds"])]
            st = row["system"]
            cells += [format_bytes(st.peak), format_bytes(st.mean)] if st else ["-", "-"]
            for k in gpu_keys:
                g = row["gpus"].get(k)
                cells += [format_bytes(g.peak), format_bytes(g.mean)] if g else ["-", "-"]
            top = row["top_group"]
            cells.append(f"{top.name} ({format_bytes(top.peak)})" if top else "-")
            rows.append(cells)
        lines += _table(header, rows)
    if any(row["phase"] for row in a.phases) and a.transitions:
        lines += [
            "### Memory released between phases",
            "",
            "At each change of phase: what the earlier phase gained (its last value minus its first), the value "
            "at its end, the lowest value in the next phase, and the difference (released; negative: grew).",
            "",
        ]
        rows = [
            [
                format_seconds(tr.at - run.start),
                f"{tr.before or '(none)'} → {tr.after or '(none)'}",
                tr.resource,
                format_bytes(tr.gained),
                format_bytes(tr.end_before),
                format_bytes(tr.low_after),
                format_bytes(tr.released),
            ]
            for tr in a.transitions
        ]
        lines += _table(["At", "Change", "Resource", "Gained before", "At the end", "Lowest after", "Released"], rows)
    if not any(row["phase"] for row in a.phases):
        lines += ["No phases were set (`mem-exporter phase NAME` marks them).", ""]
    return lines


def _leaks(a: Analysis) -> list[str]:
    """The leak check's rule, and its fit for the flagged and the largest groups."""
    fmt = format_bytes = a.fmt  # every size in the logs' own unit: MB for `run` logs, as `run` prints them
    lines = [
        "## Leak check",
        "",
        f"A group is flagged when a least-squares line over its samples (at least {LEAK_MIN_SAMPLES}) fits with "
        f"R² ≥ {LEAK_MIN_R2} and rises by at least {format_bytes(LEAK_MIN_GROWTH_BYTES)} and "
        f"{LEAK_MIN_GROWTH_RATIO:.0%} of its starting size, "
        f"over at least {LEAK_MIN_SHARE_OF_RUN:.0%} of the run and {format_seconds(LEAK_MIN_SECONDS)}.",
        "",
    ]
    top_groups = {st.name for st in a.groups}
    shown = [lk for lk in a.leaks if lk.flagged or lk.group in top_groups]  # leaks, and the top groups
    if shown:
        rows = [
            [
                lk.group,
                f"{fmt(lk.slope * 60)}/min",
                f"{lk.r2:.2f}",
                format_bytes(lk.growth),
                format_seconds(lk.seconds),
                "**leak**" if lk.flagged else "no",
            ]
            for lk in shown
        ]
        lines += _table(["Group", "Slope", "R²", "Growth", "Over", "Leak?"], rows)
    else:
        lines += ["No group had enough samples to check.", ""]
    return lines


def _kills(a: Analysis) -> list[str]:
    """Kills, dry-run kills and near misses."""
    format_bytes = a.fmt  # every size in the logs' own unit: MB for `run` logs, as `run` prints them
    lines = ["## Kills and near misses", ""]
    if a.kills:
        rows = [
            [
                _when(e["t"]),
                str(e.get("rule", "")),
                str(e.get("group") or "-"),
                format_bytes(e.get("memory_bytes")),
                _limit(e, a),
                str(e.get("outcome") or e.get("action")),
            ]
            for e in a.kills
        ]
        lines += _table(["Time", "Rule", "Group", "Memory", "Limit", "Outcome"], rows)
    else:
        lines += ["No kills.", ""]
    if a.dry_runs:
        lines += [
            f"The enforcer was in dry-run mode and would have killed {len(a.dry_runs)} time(s): "
            + ", ".join(sorted({str(e.get("group")) for e in a.dry_runs}))
            + ".",
            "",
        ]
    if a.near_misses:
        rows = [
            [
                nm.what,
                format_bytes(nm.peak),
                format_bytes(nm.limit),
                f"{nm.ratio:.0%}",
                f"`{nm.rule}`" if nm.rule else "its capacity",
            ]
            for nm in a.near_misses
        ]
        lines += [f"Near misses: peaks at {NEAR_MISS:.0%} or more of a limit, without a kill.", ""]
        lines += _table(["What", "Peak", "Limit", "Share", "Limit from"], rows)
    else:
        lines += [f"No near misses (no peak reached {NEAR_MISS:.0%} of a limit or of a card).", ""]
    return lines


def _recommendations(a: Analysis) -> list[str]:
    """The advice, numbered, and the footnote on zones and measures."""
    lines = ["## Recommendations", ""]
    lines += [f"{i}. {text}" for i, text in enumerate(a.recommendations, 1)] + [""]
    lines += [
        "---",
        "",
        f"Zones are shares of the capacity (caution from, critical above): {_zone_text(a.zones)}; "
        "their columns are shares of the time. "
        "A group is measured against its tightest enforcer limit, else the host's RAM. "
        "Mean and p95 are over samples. Details: docs/report.md.",
        "",
    ]
    return lines


def _limit(e: dict, a: Analysis) -> str:
    r = a.run_of(str(e.get("group"))) if e.get("rule") == "run" else None
    if r is not None:
        return limit_text(r)
    format_bytes = a.fmt
    limit = e.get("limit")
    if limit is None:
        return "-"
    cond = conditions.named(str(e.get("condition", "")))  # None for `run`'s own and for unknown ones
    return cond.limit_text(limit, format_bytes) if cond is not None else format_bytes(limit)
