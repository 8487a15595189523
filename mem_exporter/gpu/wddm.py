"""Windows: per-process GPU memory from WDDM's `GPU Process Memory` counters, where NVML gives none.

Under WDDM (every consumer NVIDIA card on Windows) NVML lists a card's processes without their memory
(usedGpuMemory is "not available"), so every group's VRAM would be empty and a `max_gpu_memory` rule
blind. Windows itself counts each process's GPU memory per adapter: `Dedicated Usage` (the card's own
memory) and `Shared Usage` (system memory the card maps, like a DRM card's GTT). This source wraps
NVML's and fills each card's processes from those counters (platforms/windows.py reads them through
PDH): `gpu_memory_bytes` is the dedicated usage, `gtt_memory_bytes` the shared usage. A process NVML
measured keeps NVML's number.

Adapters are known by LUID, which NVML does not report: they are matched to cards by order
(`windows.luid_cards`): the adapters holding the most dedicated memory, one per card, in LUID order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..platforms import windows
from ..sample import GpuCard, GpuProcess
from . import GpuReading, GpuSource

LOG = logging.getLogger("mem_exporter.gpu")


def attach(
    cards: Sequence[GpuCard],
    usage: Mapping[int, Mapping[int, windows.GpuUsage]],
    known: Mapping[int, int] | None = None,
) -> tuple[GpuCard, ...]:
    """The cards with their processes' memory from the counters (usage: luid -> pid -> usage)."""
    index = windows.luid_cards(usage, len(cards), known)
    by_card = {position: usage[luid] for luid, position in index.items()}
    out = []
    for position, card in enumerate(cards):
        counted = by_card.get(position)
        if counted is None:
            out.append(card)
            continue
        listed = {p.pid: p for p in card.processes}
        procs = {pid: p for pid, p in listed.items() if pid not in counted}
        for pid, u in counted.items():
            p = listed.get(pid)
            if p is None and not (u.dedicated or u.shared):
                continue  # a process that once opened the adapter and holds nothing on it
            measured = p.gpu_memory_bytes if p is not None else None
            procs[pid] = GpuProcess(
                pid,
                measured if measured is not None else u.dedicated,
                p.kind if p is not None else "graphics",  # the counters do not say; WDDM calls every client graphics
                gtt_memory_bytes=u.shared,
            )
        out.append(dataclasses.replace(card, processes=tuple(sorted(procs.values(), key=lambda p: p.pid))))
    return tuple(out)


class WddmProcessMemory:
    """A GPU source (NVML's on Windows) whose cards get per-process memory from the WDDM counters.
    `counters`: an object with `read()` (luid -> pid -> GpuUsage) and `close()`; PDH's by default, opened
    on the first read. A failed read counts one error and leaves the cards as the inner source gave them."""

    def __init__(self, inner: GpuSource, counters: Any = None, log: logging.Logger | None = None):
        self.inner = inner
        self.name = inner.name
        self.counters = counters
        self.log = log or LOG
        self._failing = False

    def read(self, now: float) -> GpuReading:
        reading = self.inner.read(now)
        if not reading.cards:
            return reading
        try:
            if self.counters is None:
                self.counters = windows.GpuCounters()
            usage = self.counters.read()
        except OSError as e:
            if not self._failing:
                self.log.warning("per-process GPU memory (GPU Process Memory counters) unreadable: %s", e)
            self._failing = True
            error = f"wddm: {e}"
            return GpuReading(reading.cards, False, f"{reading.error}; {error}" if reading.error else error)
        self._failing = False
        return GpuReading(attach(reading.cards, usage), reading.up, reading.error)

    def close(self) -> None:
        if self.counters is not None:
            self.counters.close()
        self.inner.close()
