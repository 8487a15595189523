"""The enforcer: rules evaluated on every sample, kills as events.

policy.py    pure decisions: Sample + rules + state -> [Action]
daemon.py    the Enforcer thread: full samples, the fast lane, dispatching actions to kills
lane.py      which groups are re-read between full samples, and how fast they grow
kill.py      the one kill engine (also used by `mem-exporter run`)
actuator.py  identity-checked signals at the edge
events.py    event records and notifications
metrics.py   the enforcer's metric families (also exported by `run --listen`)
"""

from .daemon import Enforcer

__all__ = ["Enforcer"]
