"""PNG charts for a report, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import Zones
from ..zones import Kind
from .analysis import Analysis
from .model import Series

GIB = 2**30


def _unit(a: Analysis) -> tuple[float, str]:
    """The y axis: GiB, or MB for a report of `run` logs (the unit `run` prints)."""
    return (1000**2, "MB") if a.run.only_runs else (GIB, "GiB")


def zone_colours(kind: Kind, zones: Zones) -> tuple[tuple[str, float, float], ...]:
    z = getattr(zones, kind)
    return ("#2ca02c", 0.0, z.caution), ("#ffbf00", z.caution, z.critical), ("#d62728", z.critical, 1.0)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axis(a: Analysis):
    """x values as elapsed minutes for long runs, seconds for short ones."""
    t0, span = a.run.start, a.run.end - a.run.start
    scale, label = (60.0, "elapsed (min)") if span > 600 else (1.0, "elapsed (s)")
    return (lambda times: [(t - t0) / scale for t in times]), label, scale


def _decorate(ax, a: Analysis, x, capacity: float | None, kind: Kind = "system_memory") -> None:
    unit, unit_label = _unit(a)
    if capacity:
        for colour, lo, hi in zone_colours(kind, a.zones):
            ax.axhspan(lo * capacity / unit, hi * capacity / unit, color=colour, alpha=0.08, linewidth=0)
        ax.axhline(capacity / unit, color="black", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, capacity / unit * 1.05)
    else:
        ax.set_ylim(bottom=0)
    for seg in a.segments:
        if seg.phase:
            start = x([seg.start])[0]
            ax.axvline(start, color="grey", linewidth=0.6, linestyle="--")
            ax.text(
                start,
                1.0,
                f" {seg.phase}",
                transform=ax.get_xaxis_transform(),
                fontsize=7,
                va="top",
                rotation=90,
                color="dimgrey",
            )
    for e in a.kills:  # each kill marked where it happened
        at = x([e.get("t", 0.0)])[0]
        ax.axvline(at, color="#d62728", linewidth=0.9)
        ax.text(at, 0.02, " killed", transform=ax.get_xaxis_transform(), fontsize=7, color="#d62728", rotation=90)
    ax.set_ylabel(unit_label)
    ax.grid(True, linewidth=0.3)


def _plot(ax, series: Series, x, unit: float, breaks: Sequence[float] = (), **kw) -> None:
    """The series as a line that breaks at each of `breaks` (the start of a run): nothing is drawn across
    the time between two runs."""
    times: list[float] = []
    values: list[float] = []
    cut = sorted(breaks)
    for t, v in zip(series.times, series.values, strict=True):
        if times and any(times[-1] < b <= t for b in cut):
            times.append((times[-1] + t) / 2)
            values.append(float("nan"))
        times.append(t)
        values.append(v / unit)
    ax.plot(x(times), values, linewidth=1.2, **kw)


def draw(a: Analysis, directory: Path, stem: str) -> dict[str, Path]:
    """Writes the charts next to the report; returns {"system"|"gpus"|"groups": path} for those drawn."""
    unit = _unit(a)[0]
    plt = _pyplot()
    x, xlabel, _ = _axis(a)
    out: dict[str, Path] = {}
    breaks = [r.started for r in a.run.runs[1:]]

    def save(fig, key: str) -> None:
        path = directory / f"{stem}-{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[key] = path

    run = a.run
    if run.system.values:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        _plot(ax, run.system, x, unit, breaks, label="RAM used", color="#1f77b4")
        if run.swap.values and max(run.swap.values) > 0:
            _plot(ax, run.swap, x, unit, breaks, label="swap used", color="#9467bd")
        _decorate(ax, a, x, run.system.capacity)
        ax.set_title("System memory")
        ax.set_xlabel(xlabel)
        ax.legend(loc="best", fontsize=8)
        save(fig, "system")
    gpus = [run.gpus[k] for k in sorted(run.gpus) if run.gpus[k].values]
    if gpus:
        fig, axes = plt.subplots(len(gpus), 1, figsize=(10, 2.8 * len(gpus)), sharex=True, squeeze=False)
        for ax, series in zip(axes[:, 0], gpus, strict=True):
            _plot(ax, series, x, unit, breaks, color="#76b900")
            _decorate(ax, a, x, series.capacity, "gpu_memory")
            ax.set_title(f"{series.name}: memory used", fontsize=10)
        axes[-1, 0].set_xlabel(xlabel)
        save(fig, "gpus")
    groups = [run.groups[st.name] for st in a.groups if run.groups[st.name].values]
    if groups:
        fig, ax = plt.subplots(figsize=(10, 4))
        for series in groups:
            _plot(ax, series, x, unit, breaks, label=series.name)
            if series.limits:
                limit = min(series.limits.values()) / unit
                colour = ax.lines[-1].get_color()
                if series.times and a.run.runs:  # a run's limit held only while it ran
                    ax.hlines(
                        limit, *x([series.times[0], series.times[-1]]), linewidth=0.8, linestyle="--", color=colour
                    )
                else:
                    ax.axhline(limit, linewidth=0.8, linestyle="--", color=colour)
        _decorate(ax, a, x, None)
        ax.set_title(f"Largest groups ({run.memtype}; dashed: limits)")
        ax.set_xlabel(xlabel)
        ax.legend(loc="upper left", fontsize=7, ncol=2)
        save(fig, "groups")
    return out
