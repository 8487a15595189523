"""The interface of a GPU source and what one read gives: the backends (nvml.py, drm.py, fake.py,
wddm.py) import this, the package (`open_gpu_source`) picks among them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..sample import GpuCard


@dataclass(frozen=True, slots=True)
class GpuReading:
    cards: tuple[GpuCard, ...]
    up: bool  # the source is working this tick (every card it knows of was read)
    error: str | None = None  # set when this read counted an error (one per failed read)


class GpuSource(Protocol):
    name: str  # "nvml" | "drm" | "auto" (both) | "fake" | "none"

    def read(self, now: float) -> GpuReading:  # now = time.monotonic(); never raises
        ...

    def close(self) -> None: ...
