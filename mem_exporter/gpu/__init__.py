"""GPU sources: where the sampler's `GpuCard`s come from.

A source is read once per sampler tick and never raises. The kinds:
- `nvml`: NVIDIA cards through NVML (`nvml.py`, the only module that imports `pynvml`);
- `drm`: AMD, Intel and other DRM cards from sysfs, per-process memory from DRM fdinfo (`drm.py`);
- `auto`: NVML for NVIDIA cards and DRM for amdgpu, i915 and xe cards, never both for one card;
- `fake`: a YAML scenario replayed over time (`fake.py`), for tests, demos and dashboards;
- `none`: no GPU metrics at all.

On Windows the NVML source is wrapped by `wddm.WddmProcessMemory`: per-process memory from Windows'
own counters, which NVML does not give under WDDM.

`open_gpu_source(config.gpu.backend, config.gpu.retry_max, paths=config.paths)` picks one; the interface
they share (`GpuSource`, `GpuReading`) is source.py's.
"""

from __future__ import annotations

import logging
import time

from ..sample import GpuCard, GpuProcess
from .source import GpuReading, GpuSource

__all__ = ["GpuCard", "GpuProcess", "GpuReading", "GpuSource", "NoGpuSource", "open_gpu_source"]

LOG = logging.getLogger("mem_exporter.gpu")


class NoGpuSource:
    """`backend: none`: no cards and no `source_up{source="gpu"}` series."""

    name = "none"

    def read(self, now: float) -> GpuReading:
        return GpuReading((), False, None)

    def close(self) -> None:
        pass


class CombinedSource:
    """`auto` on a host with NVIDIA and other cards: NVML's cards, then DRM's (indices after NVML's)."""

    name = "auto"

    def __init__(self, *parts: GpuSource):
        self.parts = parts

    def read(self, now: float) -> GpuReading:
        readings = [p.read(now) for p in self.parts]
        cards = tuple(c for r in readings for c in r.cards)
        errors = [r.error for r in readings if r.error]
        return GpuReading(cards, all(r.up for r in readings), "; ".join(errors) or None)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def _per_process_on_windows(source: GpuSource) -> GpuSource:
    from .. import platforms

    if platforms.PLATFORM != "win32":
        return source
    from .wddm import WddmProcessMemory

    return WddmProcessMemory(source)


def open_gpu_source(
    backend: str, retry_max: float = 60.0, log: logging.Logger | None = None, paths: object = None
) -> GpuSource:
    """The source for a `gpu.backend` value: `auto | nvml | drm | none | fake:FILE`.

    `nvml` tries NVML at once so that a missing driver is logged at start (once) and then reports
    up=False. `auto` looks at sysfs first: with no amdgpu, i915 or xe card it is exactly `nvml`
    (logged at info); with such cards and no NVIDIA card on the PCI bus it is `drm`; with both, NVML
    reads the NVIDIA cards and DRM the others, numbered after them. `paths` is the config's `paths`
    (procfs, sysfs roots). `fake:FILE` raises ValueError (one line naming the file and the key).
    """
    log = log or LOG
    procfs = getattr(paths, "procfs", "/proc")
    sysfs = getattr(paths, "sysfs", "/sys")
    if backend == "none":
        return NoGpuSource()
    if backend == "drm":
        from .drm import DrmSource

        return DrmSource(procfs, sysfs, log=log)
    if backend in ("auto", "nvml"):
        from .nvml import NvmlSource

        drm, nvidia = None, None
        if backend == "auto":
            from .drm import AUTO_DRIVERS, NVIDIA, DrmSource, nvidia_display_devices

            nvidia = nvidia_display_devices(sysfs)
            drm = DrmSource(procfs, sysfs, drivers=AUTO_DRIVERS, skip_vendors=frozenset({NVIDIA}), log=log)
            if not drm.card_count():
                drm = None
            elif nvidia == 0:
                return drm
        nvml = NvmlSource(
            retry_max=retry_max, log=log, absent_level=logging.INFO if backend == "auto" else logging.WARNING
        )
        nvml.start(time.monotonic())
        if drm is None:
            return _per_process_on_windows(nvml)
        drm.number_from(max(nvidia or 0, nvml.card_count or 0))  # `gpu` stays unique on the host
        return CombinedSource(nvml, drm)
    if backend.startswith("fake:") and backend[5:]:
        from .fake import FakeGpuSource

        return FakeGpuSource.from_file(backend[5:])
    raise ValueError(f"unknown gpu backend {backend!r} (use auto, nvml, drm, none or fake:FILE)")
