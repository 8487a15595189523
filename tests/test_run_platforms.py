"""`run -t` on macOS limits the tree's footprint and on Windows its private commit, shown here with the platform
forced (tests/forced_platform_run.py): a real `run` of a real child that holds memory RSS does not see (untouched
commit) or that RSS sees and the OS's own number does not (clean file pages); the limit acts on the OS's number
and the real tree is killed; `--memory rss` keeps RSS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.daemons import run_to_the_kill
from helpers.paths import ROOT

from mem_exporter.cli import build_parser
from mem_exporter.report.load import read_logs
from mem_exporter.run.options import SetupError, options_from

FORCED = [sys.executable, str(Path(__file__).with_name("forced_platform_run.py"))]
MB = 1024 * 1024

# A child that holds MB megabytes one way, writes READY, then sleeps SECONDS and exits 0:
#   anon     touched anonymous memory (RSS, footprint, commit)
#   file     a read-only map of FILE, every page read (RSS only: clean file pages)
#   reserve  private writable memory never touched (commit only: no page is resident)
CHILD = r"""
import mmap, sys, time
how, mb, ready, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
if how == "anon":
    held = bytearray(mb << 20); held[::4096] = b"\x01" * len(range(0, len(held), 4096))
elif how == "file":
    f = open(sys.argv[5], "rb"); held = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    sum(held[i] for i in range(0, len(held), 4096))
else:
    held = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
open(ready, "w").write("ready")
time.sleep(seconds)
"""


def child(tmp_path: Path, how: str, mb: int, seconds: float = 60) -> list[str]:
    extra = []
    if how == "file":
        data = tmp_path / "data.bin"
        with open(data, "wb") as f:
            f.write(os.urandom(mb * MB))
        extra = [str(data)]
    return [sys.executable, "-c", CHILD, how, str(mb), str(tmp_path / "ready"), str(seconds), *extra]


OPTIONS = ["--source", "psutil", "-i", "0.2s"]


def forced(platform: str) -> list[str]:
    return [*FORCED, platform, *OPTIONS]


def run_to_its_end(tmp_path: Path, runner: list[str], command: list[str]) -> tuple[int, list[dict]]:
    log = tmp_path / "run.jsonl"
    proc = subprocess.Popen([*runner, "-l", str(log), "--", *command], cwd=ROOT, start_new_session=True)
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, [json.loads(line) for line in log.read_text().splitlines()]


def killed_event(records: list[dict]) -> dict:
    (event,) = [r for r in records if r.get("type") == "event"]
    assert event["outcome"] == "dead" and not event["survivors"]
    for pid in event["signalled"]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    return event


@pytest.mark.parametrize("platform,memtype,how", [("darwin", "footprint", "anon"), ("win32", "private", "reserve")])
def test_run_on_the_os_kills_at_its_own_number(tmp_path, platform, memtype, how):
    """macOS: 300 MB of dirty memory is 300 MB of footprint; Windows: 300 MB committed and never touched is 300 MB
    of private commit though its working set stays small. Over -t 200: killed, 137, the log names the number."""
    records = run_to_the_kill(
        tmp_path / "run.jsonl", OPTIONS + ["-t", "200"], child(tmp_path, how, 300), [*FORCED, platform]
    )
    header = records[0]
    assert header["memtype"] == memtype
    event = killed_event(records)
    assert event["memory_bytes"] > 200e6  # the tree's footprint / commit
    assert event["condition"] == f"max_{memtype}"  # the rule condition that limits this number in `enforce`
    samples = [r for r in records if r.get("type") == "sample"]
    assert all(s["memtype"] == memtype for s in samples)
    if how == "reserve":  # the working set never came near the limit: only the commit charge did
        last = samples[-1]["groups"][0]
        assert last["rss_bytes"] < 100 * MB < 200e6 < last["private_bytes"]
    # `report` charts the number the limit was on, not RSS
    run = read_logs([tmp_path / "run.jsonl"], progress=False)
    (series,) = run.groups.values()
    assert run.memtype == memtype and max(series.values) == max(s["memory_bytes"] for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("platform,how", [("darwin", "file"), ("win32", "file")])
def test_memory_the_os_does_not_count_as_its_own_is_not_limited(tmp_path, platform, how):
    """250 MB of clean file pages: RSS, but neither footprint nor commit. Under -t 150 the run ends by itself."""
    status, records = run_to_its_end(tmp_path, [*forced(platform), "-t", "150"], child(tmp_path, how, 250, seconds=2))
    assert status == 0, records[-1]
    assert not [r for r in records if r.get("type") == "event"]
    peak = max(s["groups"][0]["rss_bytes"] for s in records if s.get("type") == "sample")
    assert peak > 200 * MB, records  # RSS did pass the threshold


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_memory_rss_keeps_todays_meaning(tmp_path, platform):
    records = run_to_the_kill(
        tmp_path / "run.jsonl",
        [*OPTIONS, "--memory", "rss", "-t", "150"],
        child(tmp_path, "file", 250),
        [*FORCED, platform],
    )
    assert records[0]["memtype"] == "rss" and killed_event(records)["memory_bytes"] > 150e6


def test_memory_options(monkeypatch):
    from mem_exporter import platforms

    def opts(*argv, environ=None):
        return options_from(build_parser().parse_args(["run", *argv, "--", "true"]), environ or {})

    assert opts().memory == "rss"  # Linux
    monkeypatch.setattr(platforms, "PLATFORM", "darwin")
    assert opts().memory == "footprint" and opts("--memory", "rss").memory == "rss"
    assert opts(environ={"MEM_EXPORTER_MEMORY": "rss"}).memory == "rss"
    with pytest.raises(SetupError, match="--memory: private is read on Windows only"):
        opts("--memory", "private")
    monkeypatch.setattr(platforms, "PLATFORM", "win32")
    assert opts().memory == "private"
    with pytest.raises(SetupError, match="MEM_EXPORTER_MEMORY: 'vms' is not one of"):
        opts(environ={"MEM_EXPORTER_MEMORY": "vms"})
