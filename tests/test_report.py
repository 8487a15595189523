"""`mem-exporter report`: from a real session's log (and from a real Prometheus) to Markdown and PNGs.

The numbers in the report are checked against the log's own records, computed here independently."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from helpers.daemons import ROTATING_GPUS, serve_logging
from helpers.net import free_port, http_get
from helpers.tools import PROMETHEUS
from helpers.waiting import wait_for

from mem_exporter.config import Zone, Zones
from mem_exporter.report import Run, analyse, write_report
from mem_exporter.report.analysis import fit, percentile, zone
from mem_exporter.units import format_bytes
from mem_exporter.zones import zone_for

ROOT = Path(__file__).parents[1]
MiB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mem_exporter", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def set_phase(phase_file: Path, name: str) -> None:
    assert cli("phase", name, "--phase-file", str(phase_file)).returncode == 0


def records(log_dir: Path) -> list[dict]:
    out = []
    for f in sorted(log_dir.glob("memory-*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r for r in out if r["type"] == "sample"]


def row(md: str, first_cell: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.slow
@pytest.mark.integration
def test_report_of_a_real_session(daemon, spawn_group, tmp_path):
    flat = spawn_group("--mb", "150", "--comm", "flathog")
    grow = spawn_group("--mb", "20", "--grow", "12", "--max-mb", "900", "--comm", "growhog")
    flat.wait_ready()
    grow.wait_ready()
    logs, phase_file = tmp_path / "logs", tmp_path / "phase"
    set_phase(phase_file, "Idle")
    d = serve_logging(daemon, logs, phase_file)

    def samples_in(phase: str, n: int):
        return lambda: sum(r["phase"] == phase for r in records(logs)) >= n

    for phase in ("Idle", "Model-Loading", "Model-Active", "Idle"):
        set_phase(phase_file, phase)
        before = sum(r["phase"] == phase for r in records(logs))
        wait_for(samples_in(phase, before + 12), 30, what=f"samples in phase {phase}")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0

    out = tmp_path / "out" / "stress.md"
    done = cli("report", str(logs), "-o", str(out), "--top", "30")
    assert done.returncode == 0, done.stderr
    md = out.read_text()
    recs = records(logs)

    used = [r["system"]["used_bytes"] for r in recs]
    line = row(md, "System RAM")
    assert format_bytes(max(used)) in line and format_bytes(sum(used) / len(used)) in line
    vram = [r["gpus"][0]["memory_used_bytes"] for r in recs]
    line = row(md, "GPU 0 (NVIDIA GeForce RTX 3060)")
    assert format_bytes(max(vram)) in line and format_bytes(sum(vram) / len(vram)) in line
    flat_label, grow_label = f"flathog-{flat.pgid}", f"growhog-{grow.pgid}"
    for label in (flat_label, grow_label):
        values = [g["rss_bytes"] for r in recs for g in r["groups"] if g["group"] == label]
        line = row(section(md, "Largest groups"), label)
        assert format_bytes(max(values)) in line and format_bytes(sum(values) / len(values)) in line

    phases = section(md, "Phases")
    for phase in ("Idle", "Model-Loading", "Model-Active"):
        assert row(phases, phase)
    assert "Model-Loading → Model-Active" in phases and "Model-Active → Idle" in phases

    leaks = section(md, "Leak check")
    assert row(leaks, grow_label).endswith("| **leak** |")
    assert row(leaks, flat_label).endswith("| no |")
    assert grow_label in section(md, "Recommendations")

    charts = sorted(out.parent.glob("*.png"))
    assert [p.name for p in charts] == ["stress-gpus.png", "stress-groups.png", "stress-system.png"]
    for png in charts:
        assert f"]({png.name})" in md
        assert_png(png)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="needs Debian's prometheus")
def test_report_from_prometheus(daemon, tmp_path):
    phase_file = tmp_path / "phase"
    set_phase(phase_file, "Full-Processing")
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", ROTATING_GPUS, "--phase-file", str(phase_file))
    d.wait_healthy()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: mem
    static_configs: [{{targets: ['127.0.0.1:{d.port}']}}]
""")
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def points():
            q = urllib.parse.urlencode({"query": "count_over_time(mem_exporter_system_memory_total_bytes[1m])"})
            try:
                status, body = http_get(f"{url}/api/v1/query?{q}", timeout=2)
            except OSError:
                return False
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return result and float(result[0]["value"][1]) >= 5

        wait_for(points, 20, interval=0.3, what="five scrapes in Prometheus")
        out = tmp_path / "prom.md"
        done = cli("report", "--prometheus", url, "--since", "1m", "--step", "1s", "-o", str(out))
        assert done.returncode == 0, done.stderr
    finally:
        prom.terminate()
        prom.wait(10)
    md = out.read_text()
    assert "System RAM" in row(md, "System RAM") and "12.0 GiB" in row(md, "GPU 0 (NVIDIA GeForce RTX 3060)")
    assert row(section(md, "Phases"), "Full-Processing")
    assert "Samples" in md and f"{url}" in md
    for png in ("prom-system.png", "prom-gpus.png"):
        assert_png(tmp_path / png)


# --- the analysis on made-up runs -----------------------------------------------------------------


def synthetic(
    values_by_group: dict[str, list[float]],
    limits: dict[str, float] | None = None,
    phases: list[str] | None = None,
    ram: list[float] | None = None,
    total: float = 1000.0,
) -> Run:
    run = Run()
    n = len(next(iter(values_by_group.values())))
    for i in range(n):
        t = 1000.0 + 2 * i
        run.new_sample(t, phases[i] if phases else None)
        run.system.add(t, ram[i] if ram else 100.0)
        for name, values in values_by_group.items():
            run.group(name).add(t, values[i])
    run.system.capacity = total
    for name, limit in (limits or {}).items():
        run.groups[name].limits["cap"] = limit
    return run.finish()


def test_leak_needs_a_steady_and_large_enough_rise():
    n = 60
    steady = [100 * MiB + i * 2 * MiB for i in range(n)]
    step = [100 * MiB if i < n // 2 else 300 * MiB for i in range(n)]  # a model load, then flat
    noisy = [100 * MiB + (50 * MiB if i % 2 else 0) for i in range(n)]
    tiny = [100 * MiB + i * 1024 for i in range(n)]
    a = analyse(synthetic({"steady": steady, "step": step, "noisy": noisy, "tiny": tiny}, total=64 * 2**30))
    flagged = {lk.group: lk.flagged for lk in a.leaks}
    assert flagged == {"steady": True, "step": False, "noisy": False, "tiny": False}
    steady_leak = next(lk for lk in a.leaks if lk.group == "steady")
    assert steady_leak.slope == pytest.approx(MiB)  # 2 MiB per 2 s sample
    assert steady_leak.r2 == pytest.approx(1.0)


def test_a_short_run_growing_until_it_ends_is_starting_up_not_leaking():
    """A 3 s `bun test`, sampled every 0.25 s while young, grows from start to end: twelve samples on a
    straight line. That is a suite starting up; the same line over 12 s is a leak."""
    from mem_exporter.report.analysis import leak
    from mem_exporter.report.model import Series

    def rising(step: float) -> Series:
        s = Series("bun")
        for i in range(12):
            s.add(i * step, 100 * MiB + i * 20 * MiB)
        return s

    short, longer = leak(rising(0.25), 3.0), leak(rising(1.0), 12.0)
    assert short is not None and short.r2 == pytest.approx(1.0) and not short.flagged
    assert longer is not None and longer.flagged


def test_fit_percentile_and_zones():
    slope, start, r2 = fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert (slope, start, r2) == (2, 1, 1)
    assert percentile([1, 2, 3, 4, 5], 0.95) == pytest.approx(4.8)
    assert [zone(x) for x in (0.5, 0.67, 0.83, 0.84)] == ["safe", "caution", "caution", "critical"]
    assert [zone(x, "system_memory") for x in (0.84, 0.85, 0.90, 0.91)] == ["safe", "caution", "caution", "critical"]
    assert [zone_for("gpu_memory", x) for x in (0.66, 0.67, 0.83, 0.84)] == ["safe", "caution", "caution", "critical"]


def test_zones_near_misses_and_advice():
    ram = [500.0] * 5 + [950.0] * 5  # critical (above 90 % of RAM) for half the run
    run = synthetic(
        {"model-42": [100.0] * 8 + [185.0, 186.0]},
        limits={"model-42": 200.0},
        ram=ram,
        phases=["Idle"] * 5 + ["Full-Processing"] * 5,
    )
    a = analyse(run)
    assert a.system.zones == {"safe": 10.0, "caution": 0.0, "critical": 10.0}
    assert a.system.peak == 950 and a.system.mean == 725
    assert [(nm.what, nm.rule) for nm in a.near_misses] == [("model-42", "cap"), ("System RAM", None)]
    advice = "\n".join(a.recommendations)
    assert "**model-42** peaked at 186 B, 93% of the 200 B limit of rule `cap`" in advice
    assert "**System RAM** was critical" in advice and "during phase 'Full-Processing'" in advice
    assert [row["phase"] for row in a.phases] == ["Idle", "Full-Processing"]


def test_kills_from_events_and_memory_kept_after_a_phase(tmp_path):
    GiB = 2**30
    vram = [1 * GiB] * 5 + [1 * GiB + i * GiB for i in range(5)] + [5 * GiB] * 5  # nothing freed after Model-Active
    run = synthetic({"llm-7": [10.0] * 15}, phases=["Idle"] * 5 + ["Model-Active"] * 5 + ["Idle"] * 5)
    gpu = run.gpu("0", "Card", 12 * GiB)
    for t, v in zip(run.times, vram, strict=True):
        gpu.add(t, v)
    run.events.append(
        {
            "t": run.times[3],
            "action": "kill",
            "rule": "vram",
            "group": "llm-7",
            "condition": "max_gpu_memory",
            "memory_bytes": 9 * GiB,
            "limit": 8 * GiB,
            "outcome": "dead",
        }
    )
    run.events.append({"t": run.times[3], "action": "skipped_protected", "rule": "vram", "group": "sshd-1"})
    md, pngs = write_report(run, tmp_path / "r.md", charts=False)
    text = md.read_text()
    assert pngs == []
    kills = section(text, "Kills and near misses")
    assert "| vram | llm-7 | 9.0 GiB | 8.0 GiB | dead |" in kills and "sshd-1" not in kills
    advice = section(text, "Recommendations")
    assert "**llm-7** was killed 1× by rule `vram` holding 9.0 GiB (limit 8.0 GiB)" in advice
    assert "**GPU 0 (Card)** kept 4.0 GiB of the 4.0 GiB it gained in phase 'Model-Active'" in advice


def test_zones_come_from_the_config(tmp_path):
    ram = [500.0] * 5 + [950.0] * 5
    calm = Zones(system_memory=Zone(caution=0.96, critical=0.99))
    a = analyse(synthetic({"model-42": [100.0] * 10}, ram=ram), zones=calm)
    assert a.system.zones == {"safe": 20.0, "caution": 0.0, "critical": 0.0}
    log = tmp_path / "run.jsonl"
    log.write_text(
        "".join(
            json.dumps(
                {
                    "type": "sample",
                    "t": 1000.0 + i,
                    "pgid": 7,
                    "memory_bytes": 10 * MiB,
                    "system": {"total_bytes": 1000 * MiB, "available_bytes": 80 * MiB},
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    config = tmp_path / "zones.yaml"
    config.write_text("zones: {system_memory: {caution: 95%, critical: 99%}}\n")
    out = tmp_path / "r.md"
    assert cli("report", str(log), "-o", str(out), "--no-charts", "-c", str(config)).returncode == 0
    assert "system RAM 95% / 99%" in out.read_text()
    config.write_text("zones: {system_memory: {caution: 99%, critical: 95%}}\n")
    done = cli("report", str(log), "-o", str(out), "-c", str(config))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"mem-exporter: {config}: line 1: zones.system_memory: caution (0.99) must be below critical (0.95)"
    )


def test_report_needs_some_input(tmp_path):
    done = cli("report", "-o", str(tmp_path / "x.md"))
    assert done.returncode == 2 and "--prometheus" in done.stderr
    done = cli("report", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 1 and "missing.jsonl" in done.stderr


def test_progress_bar_only_when_asked(tmp_path):
    from io import StringIO

    from mem_exporter.report.progress import Progress

    quiet, loud = StringIO(), StringIO()
    for stream, enabled in ((quiet, None), (loud, True)):
        bar = Progress(10, "reading logs", enabled, stream)
        for _ in range(10):
            bar.update(1)
        bar.close()
    assert quiet.getvalue() == ""  # a StringIO is not a terminal
    assert "reading logs [" in loud.getvalue() and "100%" in loud.getvalue()
    assert math.isclose(bar.done, 10)


def test_reads_a_run_log(tmp_path):
    """`mem-exporter run` writes its own lines; their `groups` use the session-log shape (docs/report.md)."""
    lines = []
    for i in range(12):
        rss = (50 + 4 * i) * MiB
        lines.append(
            {
                "type": "sample",
                "timestamp": "ignored",
                "t": 1000.0 + i,
                "pgid": 77,
                "memory_bytes": rss,
                "threshold_bytes": 100 * MiB,
                "processes": 2,
                "members": [],
                "fast": False,
                "memtype": "rss",
                "groups": [
                    {
                        "group": "bun-77",
                        "key": "pgid:77",
                        "kind": "pgid",
                        "pgid": 77,
                        "processes": 2,
                        "rss_bytes": rss,
                        "limits": {"run": 100 * MiB},
                    }
                ],
                "system": {"total_bytes": 8 * 2**30, "available_bytes": 6 * 2**30, "used_bytes": 2 * 2**30},
            }
        )
    lines.append({"type": "exit", "t": 1012.0, "exit_code": 0})
    log = tmp_path / "bun-20250101-000000-9.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run.md"
    assert cli("report", str(log), "-o", str(out), "--no-charts").returncode == 0
    md = out.read_text()
    assert row(section(md, "Largest groups"), "bun-77").startswith("| bun-77 | 100.0 MiB (limit) | 94.0 MiB | 94% |")
    assert "| bun-77 | 94.0 MiB | 100.0 MiB | 94% | `run` |" in section(md, "Kills and near misses")
    assert row(section(md, "Leak check"), "bun-77").endswith("| **leak** |")
