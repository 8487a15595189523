"""Which actuator signals: the procfs one (actuator.py) wherever there is a procfs, the psutil one
(portable.py) elsewhere. Apart from the interface (actuator.Actuator) and both implementations."""

from __future__ import annotations

from ..config import Config
from ..facilities import procfs_at
from .actuator import Actuator, ProcfsActuator


def make_actuator(config: Config) -> Actuator:
    """The procfs actuator wherever there is a procfs (Linux, whichever source reads); the psutil one elsewhere."""
    actuator: Actuator
    if procfs_at(config.paths.procfs):
        actuator = ProcfsActuator(config.paths.procfs, config.paths.cgroupfs)
    else:
        from .portable import PortableActuator  # psutil is imported only where it signals

        actuator = PortableActuator(other_users=any(r.other_users for r in config.enforcer.rules))
    return actuator
