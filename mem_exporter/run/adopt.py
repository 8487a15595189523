"""Which phase a `run` adopts: one of the run's present, never a stale one left on the host.

The phase file is the host's: a phase set hours ago by something else must not stamp every sample of a
`bun test` run. The file says who set the phase and when (phase.Setter). A phase is adopted when its
setter's session has not ended (when that can be told) and it was set after the run started, or before
with `--keep-phase` (`mem-exporter phase Loading; mem-exporter run --keep-phase -- ...`). A phase that is
not adopted is named once in the exit record, so the log says what was left out and why.
"""

from __future__ import annotations

import time
from typing import Any

from ..phase import Setter

SLACK = 1.0  # a phase set in the second before the run started counts as the run's (`phase X && run ...`)
ALIVE_EVERY = 1.0  # the setter's session is looked up at most this often


class PhaseAdopter:
    def __init__(self, started: float, keep: bool, procfs: str = "/proc"):
        self.started, self.keep, self.procfs = started, keep, procfs
        self.ignored: dict[str, Any] | None = None
        self._alive: tuple[Setter, float, bool | None] | None = None

    def adopt(self, phase: str | None, setter: Setter | None) -> str | None:
        if phase is None:
            return None
        why = self._why_not(setter)
        if why is None:
            return phase
        if self.ignored is None or self.ignored["phase"] != phase:
            self.ignored = {"phase": phase, "why": why, **({"set_t": round(setter.t, 3)} if setter else {})}
        return None

    def _why_not(self, setter: Setter | None) -> str | None:
        if setter is None:
            return "no time of setting"
        if self._session_alive(setter) is False:
            return "the session that set it has ended"
        if setter.t < self.started - SLACK and not self.keep:
            return "set before the run started (--keep-phase adopts it)"
        return None

    def _session_alive(self, setter: Setter) -> bool | None:
        now = time.monotonic()
        if self._alive is None or self._alive[0] != setter or now - self._alive[1] >= ALIVE_EVERY:
            self._alive = (setter, now, setter.session_alive(self.procfs))
        return self._alive[2]

    @staticmethod
    def describe(setter: Setter | None) -> str:
        if setter is None:
            return "setter unknown"
        when = time.strftime("%H:%M:%S", time.localtime(setter.t))
        return f"set at {when}" + (f" by pid {setter.pid}" if setter.pid else "")

    def log_fields(self) -> dict[str, Any]:
        return {"phase_ignored": self.ignored} if self.ignored else {}
