"""The one record writer and the shapes of every log line: the schema, a full disk, links and FIFOs where a
log goes, modes, rotation that fails, and `report` on damaged files."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from mem_exporter.config import Rule
from mem_exporter.enforcer.events import EventLog
from mem_exporter.enforcer.policy import Context, PolicyState, decide
from mem_exporter.grouping import make_group
from mem_exporter.logfile import LogFile, LogFileError
from mem_exporter.records import LINE_SCHEMA, line_kind, make_event
from mem_exporter.runlog import RunLog
from mem_exporter.sample import ProcessInfo, Sample, SystemMemory
from mem_exporter.sessionlog import SessionLog

ROOT = Path(__file__).parents[1]
MiB = 2**20
T0 = 1_700_000_000.0


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mem_exporter", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def sample_line(i: int) -> dict:
    """A session-log sample in the documented shape, big enough that a few fill a small file."""
    return {
        "type": "sample",
        "t": T0 + i,
        "phase": None,
        "memtype": "rss",
        "system": {"total_bytes": 16 * 2**30, "available_bytes": 8 * 2**30, "used_bytes": 8 * 2**30},
        "processes": 1,
        "groups": [{"group": "job-1", "key": "pgid:1", "kind": "pgid", "processes": 1, "rss_bytes": (100 + i) * MiB}],
        "gpus": [],
        "pad": "x" * 100,
    }


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r


# --- shapes ---------------------------------------------------------------------------------------


def a_sample() -> Sample:
    p = ProcessInfo(4101, 1, 4101, 4101, os.getuid(), "python3", "python3 serve.py", 100, "S", 900 * MiB)
    g = make_group("pgid:4101", "pgid", [p], "rss")
    return Sample(
        timestamp=T0,
        monotonic=1.0,
        duration_seconds=0.01,
        system=SystemMemory(16 * 2**30, 8 * 2**30, 8 * 2**30, 0, 0),
        cpu_usage_ratio=0.2,
        process_count=1,
        groups=(g,),
        processes=(p,),
        exported=(g,),
    )


def test_every_line_of_every_log_matches_the_schema(tmp_path):
    """The session log, a real `run` log and the enforcer's event log, line by line, against LINE_SCHEMA."""
    jsonschema.Draft202012Validator.check_schema(LINE_SCHEMA)
    s = a_sample()
    session = SessionLog(
        tmp_path / "s", "unit", started=T0, info={"command": "serve", "interval": 2.0, "memtype": "rss"}
    )
    session.on_sample(s)
    session.close()
    run_log = tmp_path / "run.jsonl"
    r = cli("run", "-t", "500MB", "--log", str(run_log), "--", sys.executable, "-c", "pass")
    assert r.returncode == 0, r.stderr
    (action,) = decide(
        s,
        [Rule(name="cap", max_rss="500MiB", match={"all": True})],
        PolicyState(),
        Context(uid=os.getuid(), pid=1, pgid=1),
        full=True,
    )
    events = tmp_path / "events.jsonl"
    EventLog(str(events)).write(make_event(action, T0, outcome="dead"))
    seen = set()
    for path in (session.paths["samples"], run_log, events):
        for rec in lines(path):
            jsonschema.validate(rec, LINE_SCHEMA)
            seen.add(line_kind(rec))
    assert seen == {"session", "sample", "peak", "event", "exit"}


def test_the_session_header_is_the_same_in_every_rotated_file(tmp_path):
    log = SessionLog(tmp_path, "unit", started=T0, max_bytes=2048, keep=3)
    for _ in range(40):
        log.on_sample(a_sample())
    log.close()
    heads = [lines(f)[0] for f in sorted(tmp_path.glob("memory-*"))]
    assert len(heads) == 4 and all(h == heads[0] for h in heads) and heads[0]["type"] == "session"


# --- a full disk ----------------------------------------------------------------------------------

FULL_DISK = """
    import json, resource, signal, sys
    from mem_exporter.logfile import LogFile
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC on a full disk
    path, n = sys.argv[1], int(sys.argv[2])
    f = LogFile(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, hard))  # the disk fills in the middle of a line
    ok = [f.write({"type": "event", "rule": "r", "action": "kill", "i": i, "pad": "x" * 100}) for i in range(n)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    f.write({"type": "event", "rule": "r", "action": "kill", "i": n, "pad": "x" * 100})
    f.close()
    print(json.dumps({"failed": ok.count(False), "lost": f.lost}))
"""


def test_a_full_disk_loses_no_record_and_glues_none(tmp_path):
    path = tmp_path / "events.jsonl"
    r = run_child(FULL_DISK, str(path), "30")
    result = json.loads(r.stdout)
    assert result["failed"] > 10 and result["lost"] == 0  # the limit was hit, and nothing given up
    text = path.read_text()
    assert text.endswith("\n")
    assert [rec["i"] for rec in map(json.loads, text.splitlines())] == list(range(31))  # all, once, in order
    assert r.stderr.count("cannot write log") == 1 and "writing again" in r.stderr  # said once, not per record


# --- what sits where a log goes -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_link_or_fifo_where_the_run_log_goes_is_refused(tmp_path, kind):
    target = tmp_path / "precious"
    target.write_text("keep\n")
    place = tmp_path / "run.jsonl"
    if kind == "symlink":
        place.symlink_to(target)
    else:
        os.mkfifo(place)
    r = cli("run", "--log", str(place), "--", sys.executable, "-c", "pass", timeout=30)  # a FIFO: no hang
    assert r.returncode == 2
    what = "a symbolic link (logs never follow links)" if kind == "symlink" else "a FIFO, not a regular file"
    assert r.stderr.strip() == f"mem-exporter run: cannot write the log {place}: {what}"
    assert target.read_text() == "keep\n"


def test_event_log_on_a_fifo_or_link_is_refused_and_the_daemon_goes_on(tmp_path, caplog):
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "elsewhere")
    for place in (fifo, link):
        log = EventLog(str(place))
        log.write({"rule": "r", "action": "kill"})  # logged as a summary, written nowhere, no hang
    assert not (tmp_path / "elsewhere").exists()
    assert "cannot write event log" in caplog.text and "FIFO" in caplog.text and "symbolic link" in caplog.text
    with pytest.raises(LogFileError):
        RunLog(link)


def test_modes_of_created_files_and_directories(tmp_path):
    old = os.umask(0)  # whatever the umask, logs are not world-readable
    try:
        path = tmp_path / "a" / "b" / "run.jsonl"
        RunLog(path).close()
        session = SessionLog(tmp_path / "s" / "t", "unit", fmt="csv")
        session.write_event({"type": "event", "rule": "r", "action": "exit", "t": T0})
        session.close()
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "s", tmp_path / "s" / "t"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [path, *session.paths.values()]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


# --- rotation -------------------------------------------------------------------------------------

NO_DESCRIPTORS = """
    import json, os, resource, sys, threading, time
    from pathlib import Path
    from mem_exporter.logfile import LogFile
    path = Path(sys.argv[1])
    f = LogFile(path, max_bytes=1024, keep=2, header=b"# head\\n")
    i = 0
    def write():
        global i
        f.write_bytes(f"record {i:04d} {'x' * 90}\\n".encode())
        i += 1
    while f.rotations < 3:
        write()
    while threading.active_count() > 1:  # the rotated files' fsync-and-close threads: their descriptors back
        time.sleep(0.01)
    kept = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(60):  # six files' worth: every rotation fails for want of a descriptor
        write()
    for fd in fillers[:8]:  # enough to look, not enough to rotate (a rotation needs one)
        os.close(fd)
    after = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    for fd in fillers[8:]:
        os.close(fd)
    before_recover = i
    while f.rotations < 4:
        write()
    f.close()
    print(json.dumps({"kept_same": all(after[n] == kept[n] for n in kept if n != path.name),
                      "names": sorted(after), "rotations": f.rotations, "i": i, "before_recover": before_recover}))
"""


def test_a_rotation_that_fails_deletes_nothing(tmp_path):
    path = tmp_path / "x.log"
    r = run_child(NO_DESCRIPTORS, str(path))
    result = json.loads(r.stdout)
    assert result["kept_same"] and result["names"] == ["x.log", "x.log.1", "x.log.2"]
    assert "cannot rotate" in r.stderr
    # the current file kept every record written while rotation failed, and rotated once it could
    text = (tmp_path / "x.log.1").read_text()
    assert text.startswith("# head\n")
    numbers = [int(line.split()[1]) for line in text.splitlines()[1:]]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and len(numbers) > 60
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_link_among_the_kept_files_stops_rotation_not_writing(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    path = tmp_path / "x.log"
    (tmp_path / "x.log.2").symlink_to(outside)
    f = LogFile(path, max_bytes=1024, keep=2)
    for i in range(40):
        assert f.write_bytes(f"{i} {'x' * 60}\n".encode())
    f.close()
    assert f.rotations == 0 and len(path.read_text().splitlines()) == 40
    assert outside.read_text() == "keep\n" and (tmp_path / "x.log.2").is_symlink()


def test_a_rename_that_fails_halfway_puts_every_kept_file_back(tmp_path, caplog):
    """x.log.1 immutable (chattr +i; root cannot rename it either): the oldest is parked and x.log.2 moved
    before the rename of x.log.1 fails; both go back, and writing goes on in x.log."""
    path = tmp_path / "x.log"
    kept = {f"x.log.{i}": f"kept {i}\n" for i in (1, 2, 3)}
    for name, text in kept.items():
        (tmp_path / name).write_text(text)
    stuck = tmp_path / "x.log.1"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that has it)")
    try:
        f = LogFile(path, max_bytes=1024, keep=3)
        for i in range(40):
            assert f.write_bytes(f"{i} {'x' * 60}\n".encode())
        f.close()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert f.rotations == 0 and "cannot rotate" in caplog.text and "could not undo" not in caplog.text
    assert {n: (tmp_path / n).read_text() for n in kept} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log", *kept]  # nothing parked or half-made left
    assert len(path.read_text().splitlines()) == 40


# --- report on damaged files ----------------------------------------------------------------------


def test_report_skips_exactly_the_damaged_jsonl_line(tmp_path):
    good = [json.dumps(sample_line(i)) for i in range(10)]
    good[4] = good[4][:57]  # cut by a crash: the next record starts on its own line all the same
    (tmp_path / "memory-x.jsonl").write_text("\n".join(good) + "\n")
    r = cli("report", str(tmp_path / "memory-x.jsonl"), "-o", str(tmp_path / "r.md"), "--no-charts")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'memory-x.jsonl'}: skipped 1 damaged record" in r.stderr
    from mem_exporter.report import read_logs

    assert len(read_logs([tmp_path / "memory-x.jsonl"]).times) == 9


def test_report_skips_a_sample_without_its_time(tmp_path):
    records = [sample_line(i) for i in range(3)]
    records[1]["t"] = None
    (tmp_path / "memory-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = cli("report", str(tmp_path / "memory-x.jsonl"), "-o", str(tmp_path / "r.md"), "--no-charts")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'memory-x.jsonl'}: skipped 1 damaged record" in r.stderr
    from mem_exporter.report import read_logs

    assert read_logs([tmp_path / "memory-x.jsonl"]).times == [T0, T0 + 2]


def test_report_skips_exactly_the_damaged_csv_row(tmp_path):
    session = SessionLog(tmp_path / "logs", "unit", fmt="csv", started=T0)
    for i in range(10):
        session.on_sample(dataclasses.replace(a_sample(), timestamp=T0 + i))
    session.close()
    memory = session.paths["memory"]
    rows = memory.read_text().splitlines()
    assert len(rows) == 21  # header, then a system and a group row per sample
    rows[7] = rows[7][:15] + ',"unterminated'  # a system row cut inside a quoted cell: nothing else may go with it
    memory.write_text("\n".join(rows) + "\n")
    r = cli("report", str(tmp_path / "logs"), "-o", str(tmp_path / "r.md"), "--no-charts")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipped 1 damaged record") == 1 and str(memory) in r.stderr
    from mem_exporter.report import read_logs

    run = read_logs([tmp_path / "logs"])
    assert len(run.times) == 9  # that sample's system row is gone; its group row, intact, still counts
    assert len(run.groups["python3-4101"].values) == 10


# --- the event log --------------------------------------------------------------------------------


def test_event_log_is_capped_and_rotated(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), max_bytes=4096, keep=2)
    for i in range(200):
        log.write({"timestamp": "2026-12-02T00:00:00.000Z", "rule": "r", "action": "kill", "i": i, "pad": "x" * 60})
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = [rec["i"] for f in reversed(files) for rec in lines(f)]
    assert kept == list(range(kept[0], 200))  # the newest, in order, none twice


def test_event_log_fsync_never_runs_on_the_callers_thread(tmp_path, monkeypatch):
    """The enforcer writes events holding its lock: a slow disk must not hold up its decisions."""
    import threading

    synced_on: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced_on.append(threading.current_thread().name) or real_fsync(fd))
    log = EventLog(str(tmp_path / "events.jsonl"), max_bytes=2048, keep=1)
    caller_lock = threading.Lock()
    with caller_lock:
        for i in range(40):  # rotations included
            log.write({"rule": "r", "action": "kill", "i": i, "pad": "x" * 60})
    assert threading.current_thread().name not in synced_on
    from helpers.waiting import wait_for

    wait_for(lambda: "log-sync" in synced_on, 10, what="an fsync on the log's own thread")
    log.close()  # the caller asked: fsync here
    assert threading.current_thread().name in synced_on
