"""Windows: per-process GPU memory from WDDM's `GPU Process Memory` counters, where NVML gives none.

Under WDDM (every consumer NVIDIA card on Windows) NVML lists a card's processes without their memory
(usedGpuMemory is "not available"), so every group's VRAM would be empty and a `max_gpu_memory` rule
blind. Windows itself counts each process's GPU memory per adapter: `Dedicated Usage` (the card's own
memory) and `Shared Usage` (system memory the card maps, like a DRM card's GTT). This source wraps
NVML's and fills each card's processes from those counters (platforms/windows.py reads them through
PDH): `gpu_memory_bytes` is the dedicated usage, `gtt_memory_bytes` the shared usage. A process NVML
measured keeps NVML's number.

Adapters are known by LUID, which NVML does not report. Each LUID's PCI address (D3DKMT) is matched
to a card's `pci_bus_id`; adapters whose address cannot be learnt go by order (`windows.luid_cards`):
the adapters holding the most dedicated memory, one per card, in LUID order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..platforms import windows
from ..sample import GpuCard, GpuProcess
from .source import GpuReading, GpuSource

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

    def __init__(
        self,
        inner: GpuSource,
        counters: Any = None,
        log: logging.Logger | None = None,
        locate: Callable[[Iterable[int], Sequence[str]], dict[int, int]] = windows.known_luids,
    ):
        self.inner = inner
        self.name = inner.name
        self.counters = counters
        self.log = log or LOG
        self.locate = locate  # (luids, the cards' pci_bus_ids) -> luid -> card position
        self._located: dict[tuple[int, tuple[str, ...]], int | None] = {}  # adapters keep their LUID until restarted
        self._failing = False

    def _known(self, luids: Iterable[int], cards: Sequence[GpuCard]) -> dict[int, int]:
        bus_ids = tuple(c.pci_bus_id for c in cards)
        new = [luid for luid in luids if (luid, bus_ids) not in self._located]
        if new:
            found = self.locate(new, bus_ids)
            self._located.update(((luid, bus_ids), found.get(luid)) for luid in new)
        return {luid: pos for (luid, ids), pos in self._located.items() if ids == bus_ids and pos is not None}

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
        known = self._known(usage, reading.cards)
        return GpuReading(attach(reading.cards, usage, known), reading.up, reading.error)

    def close(self) -> None:
        if self.counters is not None:
            self.counters.close()
        self.inner.close()
