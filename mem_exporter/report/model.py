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

    def finish(self) -> Run:
        if any(b < a for a, b in pairwise(self.times)):
            order = sorted(range(len(self.times)), key=self.times.__getitem__)
            self.times = [self.times[i] for i in order]
            self.phases = [self.phases[i] for i in order]
        for s in [self.system, self.swap, *self.gpus.values(), *self.groups.values()]:
            s.sort()
        self.events.sort(key=lambda e: e.get("t", 0.0))
        return self

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
