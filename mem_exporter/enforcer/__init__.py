"""The enforcer: rules evaluated on every sample, kills as events.

conditions.py one class per rule condition: its config key, how it is judged, its lane, its report text
policy.py    pure decisions: Sample + rules + state -> [Action]
daemon.py    the Enforcer thread: full samples, the fast lane, dispatching actions to kills
lane.py      which groups are re-read between full samples, how fast they grow, when to read again (Pace)
kill.py      the one kill engine (also used by `mem-exporter run`)
actuator.py  identity-checked signals at the edge
events.py    event records and notifications
metrics.py   the enforcer's metric families (also exported by `run --listen`)

`Enforcer` is imported on first use: config.py imports conditions.py, and the daemon imports the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daemon import Enforcer

__all__ = ["Enforcer"]


def __getattr__(name: str) -> Any:
    if name == "Enforcer":
        from .daemon import Enforcer

        return Enforcer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
