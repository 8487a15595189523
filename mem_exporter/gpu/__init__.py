"""GPU sources: where the sampler's `GpuCard`s come from.

A source is read once per sampler tick and never raises. Three kinds:
- `nvml`: NVIDIA cards through NVML (`nvml.py`, the only module that imports `pynvml`);
- `fake`: a YAML scenario replayed over time (`fake.py`), for tests, demos and dashboards;
- `none`: no GPU metrics at all.

`open_gpu_source(config.gpu.backend, config.gpu.retry_max)` picks one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from ..sample import GpuCard, GpuProcess

__all__ = ["GpuCard", "GpuProcess", "GpuReading", "GpuSource", "NoGpuSource", "open_gpu_source"]

LOG = logging.getLogger("mem_exporter.gpu")


@dataclass(frozen=True, slots=True)
class GpuReading:
    cards: tuple[GpuCard, ...]
    up: bool  # the source is working this tick (every card it knows of was read)
    error: str | None = None  # set when this read counted an error (one per failed read)


class GpuSource(Protocol):
    name: str  # "nvml" | "fake" | "none"

    def read(self, now: float) -> GpuReading:  # now = time.monotonic(); never raises
        ...

    def close(self) -> None:
        ...


class NoGpuSource:
    """`backend: none`: no cards and no `source_up{source="gpu"}` series."""

    name = "none"

    def read(self, now: float) -> GpuReading:
        return GpuReading((), False, None)

    def close(self) -> None:
        pass


def open_gpu_source(backend: str, retry_max: float = 60.0,
                    log: logging.Logger | None = None) -> GpuSource:
    """The source for a `gpu.backend` value: `auto | nvml | none | fake:FILE`.

    `auto` and `nvml` both give the NVML source; it tries NVML at once so that a missing driver is
    logged at start (once; info for `auto`, warning for `nvml`) and then reports up=False.
    `fake:FILE` raises ValueError (one line naming the file and the key) for a bad scenario.
    """
    log = log or LOG
    if backend == "none":
        return NoGpuSource()
    if backend in ("auto", "nvml"):
        from .nvml import NvmlSource

        source = NvmlSource(retry_max=retry_max, log=log,
                            absent_level=logging.INFO if backend == "auto" else logging.WARNING)
        source.start(time.monotonic())
        return source
    if backend.startswith("fake:") and backend[5:]:
        from .fake import FakeGpuSource

        return FakeGpuSource.from_file(backend[5:])
    raise ValueError(f"unknown gpu backend {backend!r} (use auto, nvml, none or fake:FILE)")
