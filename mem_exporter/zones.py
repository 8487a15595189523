"""Zones: safe, caution and critical, as shares of a capacity, per kind of resource.

One definition for everything that colours or judges a share: the report, `top`, `run -v`, the Grafana
thresholds and the alert rules (the last two are static files; tests hold them to `DEFAULT_ZONES`).
Defaults follow the monitors this project grew from: GPU memory 67 % / 83 % (8 and 10 GB of a 12 GB card),
system RAM 85 % / 90 %; a group's share of its enforcer limit uses the GPU figures.
"""

from __future__ import annotations

from typing import Literal

from .config import Zone, Zones

__all__ = ["DEFAULT_ZONES", "ZONE_NAMES", "Kind", "Zones", "zone_for"]

Kind = Literal["system_memory", "gpu_memory", "limit"]
ZONE_NAMES = ("safe", "caution", "critical")
DEFAULT_ZONES = Zones()


def zone_for(kind: Kind, ratio: float, zones: Zones | None = None) -> str:
    """'safe', 'caution' (from `caution` on) or 'critical' (above `critical`) for a share of `kind`'s capacity."""
    z: Zone = getattr(zones or DEFAULT_ZONES, kind)
    return "critical" if ratio > z.critical else "caution" if ratio >= z.caution else "safe"
