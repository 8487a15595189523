"""The interface of a process source: what the sampler, the enforcer's fast lane and `run` read through.

Two implement it: `procfs.ProcfsReader` (Linux's /proc, or a fixture tree laid out like it) and
`psutil_source.PsutilReader` (macOS, Windows, or forced). sources.py picks one; mypy checks that each
has every member below (the factory's annotated assignments), and tests/test_platform_seams.py that a
missing one fails.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from .sample import ProcessInfo, SystemMemory


class Reader(Protocol):
    # --- the host ---------------------------------------------------------------------------
    def read_system(self) -> SystemMemory:
        """RAM and swap."""
        ...

    def read_cpu_times(self) -> tuple[float, float]:
        """(busy, total) CPU time since boot, in any one unit: their ratio between two reads is the use."""
        ...

    def uptime(self) -> float | None:
        """Seconds since boot on the clock that `ProcessInfo.start_time` counts (in clock ticks); None
        where it cannot be read (then no process is taken for one just started)."""
        ...

    def newest_pid(self) -> bytes | None:
        """A token that changes whenever the kernel allocates a pid (it is the newest pid); None where
        there is none to be had (then every look for newcomers lists all processes)."""
        ...

    def ancestors(self, pid: int) -> frozenset[int]:
        """The pids above `pid` up to init (never signalled by the enforcer)."""
        ...

    # --- processes --------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every pid, listed."""
        ...

    def read_processes(self, pids: Iterable[int] | None = None) -> tuple[list[ProcessInfo], Counter]:
        """These processes (every one when None: a full walk), and the count of those skipped by reason
        (vanished, zombie, kernel_thread, permission)."""
        ...

    # --- what a reader keeps between reads ---------------------------------------------------
    def forget_except(self, live: Iterable[int]) -> None:
        """Drop what is kept about processes not in `live`: for callers that never walk fully, so
        nothing kept grows without bound."""
        ...

    def close(self) -> None:
        """Release the descriptors kept between reads; the reader stays usable."""
        ...
