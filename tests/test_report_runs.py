"""`report` over `mem-exporter run` logs: the report says what the run said (units as typed, peak, duration,
command, exit status), one row per run, charts that break between runs, advice with a `-t` value.

The logs under fixtures/runlogs are real: written by `mem-exporter run` around tests/hog.py (one: a 3 s
run with two phases; three: a 300 MB run, a kill at `-t 800` of a tree growing in 100 MB steps with a
child, a kill at `-t 0.1GB`). The reports are golden files: UPDATE_GOLDEN=1 rewrites them for review.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LOGS = Path("tests/fixtures/runlogs")  # relative: the report names its sources as given
GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def report(logs: str, out: Path, *extra: str) -> str:
    env = dict(os.environ, TZ="UTC", PYTHONPATH=str(ROOT))  # local times in the report: pinned
    r = subprocess.run(
        [sys.executable, "-m", "mem_exporter", "report", str(LOGS / logs), "-o", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return out.read_text()


def assert_golden(text: str, name: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"the report changed; if intended, UPDATE_GOLDEN=1 and review {golden}"


def lines_of(logs: str) -> list[dict]:
    return [json.loads(x) for f in sorted((ROOT / LOGS / logs).iterdir()) for x in f.read_text().splitlines()]


def fact(md: str, name: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {name} |")).split(" | ")[1].rstrip(" |")


def test_the_report_of_one_run_says_what_the_run_said(tmp_path):
    md = report("one", tmp_path / "one.md", "--no-charts")
    assert_golden(md, "report-run-one.md")
    recs = lines_of("one")
    session, end = recs[0], recs[-1]
    assert fact(md, "Limit") == "800 MB"  # as typed (a bare 800 is MB), not 762.9 MiB
    assert fact(md, "Peak") == f"{end['peak_bytes'] / 1e6:.1f} MB"  # the exit line's peak, as run printed it
    assert fact(md, "Exit status") == "0"
    assert fact(md, "Command").startswith("`bash -c ")
    assert fact(md, "Duration") == f"{end['duration_seconds']:.1f} s"  # the run's, not its samples' span
    assert session["command"][0] == "bash"
    tables = [block for block in md.split("\n\n") if block.startswith("| ")]
    assert all(len(block.splitlines()) > 2 for block in tables)  # a header always has rows under it


def test_a_report_over_several_runs_has_a_row_per_run_and_never_pairs_one_run_s_peak_with_another_s_limit(tmp_path):
    md = report("three", tmp_path / "three.md", "--no-charts")
    assert_golden(md, "report-run-three.md")
    runs = md.split("## Runs")[1].split("##")[0]
    rows = [line for line in runs.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[4] for r in rows] == ["300 MB", "800 MB", "0.1GB"]
    assert [r.split(" | ")[6] for r in rows] == ["0", "137 (killed for memory)", "137 (killed for memory)"]
    kills = md.split("## Kills and near misses")[1].split("##")[0]
    killed_800 = next(line for line in kills.splitlines() if "(run 2)" in line)
    killed_100 = next(line for line in kills.splitlines() if "(run 3)" in line)
    assert "| 800 MB |" in killed_800 and "| 0.1GB |" in killed_100
    for line in (killed_800, killed_100):
        held = float(line.split(" | ")[3].split()[0])
        limit = 800 if "800 MB" in line else 100
        assert limit <= held < limit * 1.5  # each kill beside its own run's limit (the other is 8x off)
    advice = md.split("## Recommendations")[1]
    assert "rerun with `-t 1100`" in advice or "rerun with `-t 1200`" in advice  # a concrete -t
    assert "killed 2×" not in advice and "killed 5×" not in advice


def test_the_charts_of_several_runs_break_between_runs_and_mark_each_kill(tmp_path):
    pytest.importorskip("matplotlib")
    from mem_exporter.report import analyse, read_logs
    from mem_exporter.report import charts as charting

    run = read_logs([ROOT / LOGS / "three"])
    a = analyse(run)
    drawn: list = []
    import matplotlib.axes

    plot, axvline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvline
    try:  # what the charts draw, recorded on the way to matplotlib
        matplotlib.axes.Axes.plot = lambda ax, x, y, **kw: drawn.append(("line", list(y))) or plot(ax, x, y, **kw)
        matplotlib.axes.Axes.axvline = lambda ax, at, **kw: (
            drawn.append(("vline", kw.get("color"))) or axvline(ax, at, **kw)
        )
        charting.draw(a, tmp_path, "r")
    finally:
        matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvline = plot, axvline
    system = drawn[0][1]  # RAM used across the three runs: two gaps
    assert sum(1 for v in system if v != v) == 2
    assert sum(1 for kind, colour in drawn if kind == "vline" and colour == "#d62728") >= 2 * 2  # both charts
    assert (tmp_path / "r-groups.png").stat().st_size > 0


@pytest.mark.slow
def test_a_section_with_nothing_to_say_prints_no_empty_table(tmp_path):
    """One phase all along (set before the run, kept): no change of phase, so no table of releases."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEM_EXPORTER_PHASE_FILE=str(tmp_path / "phase"))
    cli = [sys.executable, "-m", "mem_exporter"]
    subprocess.run([*cli, "phase", "Testing"], cwd=ROOT, env=env, check=True, timeout=30)
    log = tmp_path / "run.jsonl"
    run = [*cli, "run", "--keep-phase", "-l", str(log), "--", sys.executable, "-c", "import time; time.sleep(1.5)"]
    subprocess.run(run, cwd=ROOT, env=env, check=True, timeout=60, start_new_session=True)
    out = tmp_path / "r.md"
    subprocess.run([*cli, "report", str(log), "-o", str(out), "--no-charts"], cwd=ROOT, env=env, check=True, timeout=60)
    md = out.read_text()
    assert "| Testing |" in md.split("## Phases")[1]
    assert "Memory released between phases" not in md
    tables = [block for block in md.split("\n\n") if block.startswith("| ")]
    assert all(len(block.splitlines()) > 2 for block in tables)  # a header always has rows under it
