"""What every input (JSONL, CSV, a `run` log, Prometheus) is turned into before analysis."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any


@dataclass
class Series:
    """One resource over time: system RAM used, a card's VRAM, a group's memory."""

    name: str
    capacity: float | None = None  # what zones are measured against (total RAM, card memory, a limit)
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # rule -> limit bytes (groups)
    gpu_bytes: float = 0.0  # a group's largest VRAM use seen

    def add(self, t: float, value: float | None) -> None:
        if value is not None:
            self.times.append(t)
            self.values.append(float(value))

    def sort(self) -> None:
        if any(b < a for a, b in pairwise(self.times)):
            pairs = sorted(dict(zip(self.times, self.values, strict=True)).items())  # also drops duplicate times
            self.times, self.values = [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class RunRecord:
    """One `mem-exporter run`, from its own log: the session line, the peak line, the kill, the exit line."""

    command: list[str]
    group: str  # the tree's label in the samples
    started: float
    threshold_bytes: float
    threshold_text: str | None = None  # as the user typed it (`800`, `1.5GB`); None in logs older than that
    first: float | None = None  # the first and last sample
    last: float | None = None
    peak_bytes: float | None = None  # from the exit line (what `run` said on stderr)
    peak_t: float | None = None
    peak_members: list[dict[str, Any]] = field(default_factory=list)
    exit_status: int | None = None
    cause: str | None = None
    duration: float | None = None
    killed: dict[str, Any] | None = None  # the kill event, when the tree was killed for memory
    series: str = ""  # the name of its group's series in the report (the label, numbered when runs share it)

    @property
    def end(self) -> float:
        return self.started + self.duration if self.duration is not None else (self.last or self.started)


@dataclass
class Run:
    sources: list[str] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    memtype: str = "rss"
    times: list[float] = field(default_factory=list)  # every sample's time
    phases: list[str | None] = field(default_factory=list)  # the phase at each of `times`
    system: Series = field(default_factory=lambda: Series("System RAM"))
    swap: Series = field(default_factory=lambda: Series("Swap"))
    gpus: dict[str, Series] = field(default_factory=dict)  # gpu index -> used memory
    groups: dict[str, Series] = field(default_factory=dict)  # group label -> memory
    events: list[dict[str, Any]] = field(default_factory=list)  # enforcer events (kills, dry runs)
    skipped: dict[str, int] = field(default_factory=dict)  # file -> damaged records skipped
    runs: list[RunRecord] = field(default_factory=list)  # the `mem-exporter run`s among the logs
    _seen: set = field(default_factory=set, repr=False)

    def new_sample(self, t: float, phase: str | None) -> bool:
        """Register a sample time; False when it was already read (the same file given twice)."""
        if t in self._seen:
            return False
        self._seen.add(t)
        self.times.append(t)
        self.phases.append(phase or None)
        return True

    def gpu(self, index: str, name: str | None, total: float | None) -> Series:
        s = self.gpus.get(index)
        if s is None:
            s = self.gpus[index] = Series(f"GPU {index}" + (f" ({name})" if name else ""))
        if total:
            s.capacity = max(s.capacity or 0, float(total))
        return s

    def group(self, label: str) -> Series:
        s = self.groups.get(label)
        if s is None:
            s = self.groups[label] = Series(label)
        return s

    @property
    def only_runs(self) -> bool:
        """Every log read is a `run` log: sizes are then in MB, the unit `run` speaks."""
        return bool(self.runs) and len(self.runs) == len(self.sessions)

    def finish(self) -> Run:
        self.runs.sort(key=lambda r: r.started)
        self._split_runs()
        if any(b < a for a, b in pairwise(self.times)):
            order = sorted(range(len(self.times)), key=self.times.__getitem__)
            self.times = [self.times[i] for i in order]
            self.phases = [self.phases[i] for i in order]
        for s in [self.system, self.swap, *self.gpus.values(), *self.groups.values()]:
            s.sort()
        self.events.sort(key=lambda e: e.get("t", 0.0))
        return self

    def _split_runs(self) -> None:
        """Runs whose trees share a label (`bun`, run after run) get a series each, `bun (run 2)`, with that
        run's limit, its peak reading, and its events: a peak is never paired with another run's limit, and
        no line is drawn from one run into the next."""
        labels = [r.group for r in self.runs]
        for i, r in enumerate(self.runs, 1):
            r.series = f"{r.group} (run {i})" if labels.count(r.group) > 1 else r.group
        for label in set(labels):
            merged = self.groups.get(label)
            mine = [r for r in self.runs if r.group == label]
            if merged is None:
                continue
            if len(mine) > 1:
                del self.groups[label]
            for r in mine:
                s = merged if len(mine) == 1 else self.group(r.series)
                lo, hi = r.started - 0.001, r.end + 0.001
                if len(mine) > 1:
                    pairs = [(t, v) for t, v in zip(merged.times, merged.values, strict=True) if lo <= t <= hi]
                    s.times, s.values = [t for t, _ in pairs], [v for _, v in pairs]
                    s.gpu_bytes = merged.gpu_bytes
                s.limits = {"run": r.threshold_bytes}
                if r.peak_t is not None and r.peak_bytes is not None:
                    s.add(r.peak_t, r.peak_bytes)  # the peak's own reading, between samples or not
                for e in self.events:
                    if e.get("rule") == "run" and e.get("group") == label and lo <= e.get("t", 0.0) <= hi:
                        e["group"] = r.series

    @property
    def start(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def end(self) -> float:
        return self.times[-1] if self.times else 0.0

    def phase_at(self, t: float) -> str | None:
        import bisect

        i = bisect.bisect_right(self.times, t) - 1
        return self.phases[i] if 0 <= i < len(self.phases) else None
