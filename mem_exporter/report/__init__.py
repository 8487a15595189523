"""`mem-exporter report`: session logs or Prometheus in, a Markdown report with PNG charts out.

load / prometheus -> Run (model) -> analysis -> markdown + charts.
"""

from __future__ import annotations

from pathlib import Path

from ..zones import DEFAULT_ZONES, Zones
from .analysis import Analysis, analyse
from .load import read_logs
from .model import Run, Series
from .prometheus import read_prometheus

__all__ = ["Analysis", "Run", "Series", "analyse", "read_logs", "read_prometheus", "write_report"]


def write_report(
    run: Run, output: str | Path, top: int = 8, charts: bool = True, zones: Zones = DEFAULT_ZONES
) -> tuple[Path, list[Path]]:
    """Writes the Markdown at `output` and its PNGs next to it (named after it); returns their paths."""
    from . import charts as charting
    from .markdown import render

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    a = analyse(run, top, zones)
    pngs: dict[str, Path] = {}
    note = ""
    if charts and run.times:
        if charting.available():
            pngs = charting.draw(a, output.parent, output.stem)
        else:
            note = "Charts left out: matplotlib is not installed (`pip install matplotlib`)."
    output.write_text(render(a, pngs, note))
    return output, list(pngs.values())
