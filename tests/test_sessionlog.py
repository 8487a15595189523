"""Session logs: record shapes, JSONL and CSV that read back the same, rotation, a writer that never
blocks the sampler, and the files a real `serve` / `enforce --log-dir` session leaves."""

from __future__ import annotations

import csv
import json
import re
import signal
import threading
import time
import uuid

import pytest
from helpers.daemons import serve_logging
from helpers.waiting import wait_for

from mem_exporter.logfile import RotatingFile
from mem_exporter.report import read_logs
from mem_exporter.sample import GpuCard, GroupSample, ProcessInfo, Sample, SystemMemory
from mem_exporter.sessionlog import GPU_CSV_COLUMNS, MEMORY_CSV_COLUMNS, SessionLog

MiB = 2**20
T0 = 1_700_000_000.0


def make_sample(i: int, phase: str | None = "Idle") -> Sample:
    """A sample with two groups (one growing) and one card."""

    def group(pgid: int, comm: str, rss: int, gpu: int = 0) -> GroupSample:
        p = ProcessInfo(pgid, 1, pgid, pgid, 1000, comm, f"{comm} --serve", 100 + pgid, "S", rss)
        return GroupSample(
            f"pgid:{pgid}", f"{comm}-{pgid}", "pgid", rss, 1, (p,), pgid=pgid, gpu_memory_bytes={0: gpu} if gpu else {}
        )

    groups = (group(200, "grower", (100 + 5 * i) * MiB, gpu=2048 * MiB), group(300, "flat", 80 * MiB))
    card = GpuCard(
        0,
        "GPU-x",
        "Test Card",
        "550",
        memory_total_bytes=12 * 1024 * MiB,
        memory_used_bytes=(2048 + i) * MiB,
        utilization_ratio=0.5,
    )
    return Sample(
        timestamp=T0 + i,
        monotonic=float(i),
        duration_seconds=0.01,
        system=SystemMemory(16 * 1024 * MiB, (12 * 1024 - i) * MiB, 8 * 1024 * MiB, 0, 0),
        cpu_usage_ratio=0.1,
        process_count=2,
        groups=groups,
        gpus=(card,),
        phase=phase,
        exported=groups,
    )


def write_session(directory, fmt: str, n: int = 30, **kw) -> SessionLog:
    log = SessionLog(directory, "unit", fmt, started=T0, limits=lambda: [("cap", "flat-300", 100 * MiB)], **kw)
    for i in range(n):
        log.on_sample(make_sample(i, "Idle" if i < n // 2 else "Model-Active"))
    log.write_event({"type": "event", "action": "exit", "rule": "-", "t": T0 + n})
    log.close()
    return log


def test_jsonl_records_have_the_documented_shape(tmp_path):
    log = write_session(tmp_path, "jsonl", n=3)
    assert re.fullmatch(r"memory-unit-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.jsonl", log.paths["samples"].name)
    lines = [json.loads(x) for x in log.paths["samples"].read_text().splitlines()]
    head, first = lines[0], lines[1]
    assert head["type"] == "session" and head["schema"] == 1 and head["session"] == "unit" and head["t"] == T0
    assert [x["type"] for x in lines[1:]] == ["sample"] * 3
    assert first["t"] == T0 and first["phase"] == "Idle" and first["memtype"] == "rss"
    assert first["system"]["used_bytes"] == 4 * 1024 * MiB and first["system"]["total_bytes"] == 16 * 1024 * MiB
    grower, flat = first["groups"]
    assert grower == {
        "group": "grower-200",
        "key": "pgid:200",
        "kind": "pgid",
        "processes": 1,
        "rss_bytes": 100 * MiB,
        "pgid": 200,
        "leader": "grower",
        "gpu_memory_bytes": {"0": 2048 * MiB},
    }
    assert flat["limits"] == {"cap": 100 * MiB}
    assert first["gpus"][0]["memory_used_bytes"] == 2048 * MiB and first["gpus"][0]["name"] == "Test Card"
    event = json.loads(log.event_log_path.read_text())
    assert event["action"] == "exit"


def test_csv_reads_back_like_jsonl(tmp_path):
    write_session(tmp_path / "j", "jsonl")
    c = write_session(tmp_path / "c", "csv")
    assert c.paths["gpu"].name == c.paths["memory"].name.replace("memory-", "gpu-memory-", 1)
    assert c.paths["memory"].read_text().splitlines()[0] == "\ufeff" + ",".join(MEMORY_CSV_COLUMNS)
    assert c.paths["gpu"].read_text().splitlines()[0] == "\ufeff" + ",".join(GPU_CSV_COLUMNS)
    a, b = read_logs([tmp_path / "j"]), read_logs([tmp_path / "c"])
    assert a.times == b.times and a.phases == b.phases and len(a.times) == 30
    assert a.system.values == b.system.values and a.system.capacity == b.system.capacity
    assert a.gpus["0"].values == b.gpus["0"].values and a.gpus["0"].capacity == b.gpus["0"].capacity
    assert set(a.groups) == set(b.groups) == {"grower-200", "flat-300"}
    for name in a.groups:
        assert a.groups[name].values == b.groups[name].values
        assert a.groups[name].limits == b.groups[name].limits
    assert a.groups["grower-200"].gpu_bytes == b.groups["grower-200"].gpu_bytes == 2048 * MiB
    assert len(a.events) == len(b.events) == 1


def test_reading_the_same_log_twice_adds_nothing(tmp_path):
    log = write_session(tmp_path, "jsonl", n=5)
    run = read_logs([tmp_path, log.paths["samples"]])
    assert len(run.times) == 5 and len(run.groups["flat-300"].values) == 5


def test_rotation_caps_the_size(tmp_path):
    log = write_session(tmp_path, "jsonl", n=300, max_bytes=4096, keep=2)
    files = sorted(tmp_path.glob("memory-*"))
    name = log.paths["samples"].name
    assert [f.name for f in files] == [name, name + ".1", name + ".2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    for f in files:  # each file stands alone: it starts with the session record
        assert json.loads(f.read_text().splitlines()[0])["type"] == "session"
    run = read_logs([tmp_path])
    assert run.end == T0 + 299  # the newest samples are the ones kept
    assert 0 < len(run.times) < 300


def test_rotating_file_with_keep_zero_starts_over(tmp_path):
    f = RotatingFile(tmp_path / "x.csv", max_bytes=1024, keep=0, header="a,b\n")
    for _ in range(100):
        f.write("1,2\n")
    f.close()
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]
    text = (tmp_path / "x.csv").read_text()
    assert text.startswith("a,b\n") and len(text) <= 1024


def test_a_slow_disk_drops_records_instead_of_blocking(tmp_path, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(SessionLog, "_write", lambda self, *a: gate.wait(30))
    log = SessionLog(tmp_path, "slow", queue_size=10)
    for i in range(100):
        log.on_sample(make_sample(i))  # returns at once even though nothing gets written
    assert log.dropped >= 80
    gate.set()
    log.close()


def test_csv_opens_in_a_spreadsheet_and_old_csv_still_reads(tmp_path):
    """A byte order mark (Excel then reads UTF-8) and a local date-time column a spreadsheet parses; files
    written before both (no mark, no `local_time`) read back the same."""
    c = write_session(tmp_path / "c", "csv", n=4)
    raw = c.paths["memory"].read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and c.paths["gpu"].read_bytes().startswith(b"\xef\xbb\xbf")
    with open(c.paths["memory"], newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    assert first["kind"] == "system"
    assert first["local_time"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(first["timestamp"])))
    old = tmp_path / "old"
    old.mkdir()
    for path in (c.paths["memory"], c.paths["gpu"]):
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = [row[:1] + row[2:] for row in csv.reader(f)]  # without local_time
        with open(old / path.name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(table)
    assert not (old / c.paths["memory"].name).read_bytes().startswith(b"\xef")
    a, b = read_logs([tmp_path / "c"]), read_logs([old])
    assert a.times == b.times and len(a.times) == 4 and a.system.values == b.system.values
    assert {n: g.values for n, g in a.groups.items()} == {n: g.values for n, g in b.groups.items()}
    assert a.gpus["0"].values == b.gpus["0"].values


@pytest.mark.slow
@pytest.mark.integration
def test_serve_writes_csv_session_logs(daemon, tmp_path):
    logs = tmp_path / "logs"
    d = serve_logging(daemon, logs, tmp_path / "phase", "--log-format", "csv", "--session", "stress test")
    wait_for(
        lambda: (
            len(list(logs.glob("memory-*.csv"))) == 1
            and next(logs.glob("memory-*.csv")).read_text().count(",system,system,") > 10
        ),
        20,
        what="ten samples",
    )
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    (memory,) = logs.glob("memory-*.csv")
    (gpu,) = logs.glob("gpu-memory-*.csv")
    assert re.fullmatch(r"memory-stress-test-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.csv", memory.name)
    assert gpu.name == "gpu-" + memory.name
    run = read_logs([logs])
    assert len(run.times) > 5 and run.system.capacity > 0 and run.groups
    assert run.gpus["0"].capacity == 12 * 2**30


@pytest.mark.integration
def test_enforce_session_keeps_kills_and_limits_with_the_samples(daemon, spawn_group, tmp_path):
    tag = "s" + uuid.uuid4().hex[:12]
    cfg = tmp_path / "enforce.yaml"
    cfg.write_text(f"""
enforcer:
  rules:
    - name: runaway
      match: {{cmdline: 'hog\\.py.*--tag {tag}kill'}}
      max_rss: 150MiB
      grace: 1s
""")
    logs = tmp_path / "logs"
    d = daemon(
        "enforce", "--config", str(cfg), "--interval", "0.2s", "--gpu-backend", "none", "--log-dir", str(logs)
    ).wait_healthy()
    hog = spawn_group("--mb", "20", "--grow", "100", "--max-mb", "1000", "--tag", tag + "kill")
    hog.wait_ready()

    def kill_logged():
        events = list(logs.glob("events-enforce-*.jsonl"))
        lines = [json.loads(x) for x in events[0].read_text().splitlines()] if events else []
        return next((e for e in lines if e.get("pgid") == hog.pgid and e["action"] in ("term", "kill")), None)

    wait_for(kill_logged, 40, what="the kill in the session's event log")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    run = read_logs([logs])
    label = next(name for name in run.groups if name.endswith(f"-{hog.pgid}"))
    assert run.groups[label].limits == {"runaway": 150 * 2**20}
    assert any(e.get("pgid") == hog.pgid for e in run.events)
