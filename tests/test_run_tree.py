"""`run` follows its tree through the kernel's child links, never by walking or listing the host.

A real `mem-exporter run` in a process of its own, with the Sampler's full tick and every listing of
the procfs root counted (the counters call through to the real ones); and TreeWalk on fixture trees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.daemons import run_to_the_kill
from helpers.net import free_port
from helpers.paths import HOG, ROOT
from helpers.processes import pid_alive
from helpers.procfs_builder import FakeProc
from helpers.waiting import wait_for

MB = 1000**2

# `mem-exporter run ARGS`, with counters; argv: counts file, links | listing, then run's arguments
COUNTED_RUN = textwrap.dedent("""
    import json, os, sys
    import mem_exporter.run.tree as run
    from mem_exporter.cli import main
    from mem_exporter.sampler import Sampler

    out, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    counts = {"full_walks": 0, "root_listings": 0}
    if mode == "listing":  # as on a kernel without CONFIG_PROC_CHILDREN
        run.links_available = lambda procfs, pid: False
    tick, listdir, scandir = Sampler.tick, os.listdir, os.scandir

    def counted_tick(self):
        counts["full_walks"] += 1
        return tick(self)

    def is_root(path):
        return not isinstance(path, int) and os.fsdecode(os.fspath(path)).rstrip("/") == "/proc"

    def counted_listdir(path="."):
        counts["root_listings"] += is_root(path)
        return listdir(path)

    def counted_scandir(path="."):
        counts["root_listings"] += is_root(path)
        return scandir(path)

    Sampler.tick, os.listdir, os.scandir = counted_tick, counted_listdir, counted_scandir
    try:
        status = main(["run", *args])
    finally:
        with open(out, "w") as f:
            json.dump(counts, f)
    sys.exit(status)
""")

# the command: forks a child in a session of its own that starts a growing grandchild and exits at
# once, so the grandchild is an orphan (reparented to the wrapper) before it grows past the limit
FORKING = textwrap.dedent("""
    import os, subprocess, sys, time
    hog, pid_file = sys.argv[1], sys.argv[2]
    child = os.fork()
    if child == 0:
        os.setsid()
        grandchild = subprocess.Popen([sys.executable, hog, "--mb", "10", "--grow", "60", "--max-mb", "1000"])
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(grandchild.pid))
        os.replace(pid_file + ".tmp", pid_file)
        os._exit(0)
    os.waitpid(child, 0)
    time.sleep(60)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["links", "listing"])
def test_a_grandchild_past_the_limit_is_killed_with_the_tree(tmp_path, mode):
    counts, log, pid_file = tmp_path / "counts.json", tmp_path / "run.jsonl", tmp_path / "grandchild"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEM_EXPORTER_")}
    env["PYTHONPATH"] = str(ROOT)
    counted_run = [sys.executable, "-c", COUNTED_RUN, str(counts), mode]
    forking = [sys.executable, "-c", FORKING, HOG, str(pid_file)]
    try:
        records = run_to_the_kill(log, ["-t", "150", "-i", "0.2", "--grace", "2"], forking, runner=counted_run, env=env)
    finally:
        if pid_file.exists():  # should the wrapper have failed, the grandchild is ours to stop
            grandchild = int(pid_file.read_text())
            if pid_alive(grandchild):
                os.kill(grandchild, signal.SIGKILL)
    grandchild = int(pid_file.read_text())
    leader = records[0]["command_pid"]
    (event,) = [r for r in records if r["type"] == "event"]
    assert event["cause"] == "memory" and event["outcome"] == "dead" and event["value"] > 150 * MB
    assert {leader, grandchild} <= {p["pid"] for p in event["signalled"]}  # the orphan stayed in the tree
    for pid in (leader, grandchild):
        wait_for(lambda pid=pid: not pid_alive(pid), 10, what=f"pid {pid} gone")
    full = [r for r in records if r["type"] == "sample" and not r["fast"]]
    assert len(full) >= 5 and any(r["processes"] == 2 for r in full)  # readings at the interval saw the tree
    assert all(r["system"]["total_bytes"] > 0 for r in full)  # system memory, from meminfo
    n = json.loads(counts.read_text())
    if mode == "links":
        assert n == {"full_walks": 0, "root_listings": 0}
    else:  # the fallback: a full walk per interval, a listing in between
        assert n["full_walks"] >= len(full) and n["root_listings"] > n["full_walks"]


# --- TreeWalk on fixture trees -------------------------------------------------------------------


def children(fake: FakeProc, pid: int, threads: dict[int, list[int]]) -> None:
    """/proc/PID/task/TID/children for each thread of the process."""
    for tid, kids in threads.items():
        task = fake.root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (task / "children").write_text("".join(f"{k} " for k in kids))


def walk(fake: FakeProc, root: int = 100):
    from mem_exporter.procfs import ProcfsReader
    from mem_exporter.run.tree import TreeWalk

    return TreeWalk(ProcfsReader(str(fake.root)), str(fake.root), root)


def test_every_threads_children_are_followed_down_the_tree(tmp_path):
    fake = FakeProc(tmp_path)
    fake.add(100, "run", ppid=1)
    children(fake, 100, {100: [101], 105: [102]})  # an orphan inherited by another thread of the wrapper
    fake.add(101, "sh", ppid=100)
    children(fake, 101, {101: [103]})
    fake.add(102, "orphan", ppid=100, sid=102)
    children(fake, 102, {102: []})
    fake.add(103, "worker", ppid=101)
    children(fake, 103, {103: [], 104: [106]})  # forked by the worker's second thread
    fake.add(106, "grandchild", ppid=103, rss_kb=4096)
    children(fake, 106, {106: []})
    fake.add(200, "stranger", ppid=1)
    members = walk(fake).read({})
    assert sorted(members) == [101, 102, 103, 106] and members[106].rss_bytes == 4096 * 1024


def test_a_reused_pid_never_joins_and_a_known_member_stays(tmp_path):
    from mem_exporter.sample import ProcessInfo

    fake = FakeProc(tmp_path)
    fake.add(100, "run", ppid=1)
    children(fake, 100, {100: [101, 107]})
    fake.add(101, "sh", ppid=100)
    children(fake, 101, {101: []})
    fake.add(107, "stranger", ppid=1)  # listed, exited, its pid taken by someone else before the stat read
    fake.add(108, "known", ppid=1, start=500)  # a member whose parent link broke (no subreaper): kept
    fake.add(109, "reused", ppid=1, start=900)  # a member's pid, now someone else's (another start time)

    def known(pid: int, start: int) -> ProcessInfo:
        return ProcessInfo(pid, 1, pid, pid, 0, "x", "x", start, "S", 1)

    members = walk(fake).read({108: known(108, 500), 109: known(109, 700)})
    assert sorted(members) == [101, 108]


def test_child_links_are_detected(tmp_path):
    from mem_exporter.run.tree import links_available

    fake = FakeProc(tmp_path)
    fake.add(100, "run")
    assert not links_available(str(fake.root), 100)
    children(fake, 100, {100: []})
    assert links_available(str(fake.root), 100) and links_available(f"{fake.root}/", 100)
    assert links_available("/proc", os.getpid()) == Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


# --- the Sampler over a reader scoped to the tree ------------------------------------------------


def tree_sampler(fake: FakeProc, root: int = 100):
    """A Sampler as `run` makes one: over the fixture tree's reader, narrowed to the tree under `root`."""
    from mem_exporter.config import load_config
    from mem_exporter.run.tree import TreeReader
    from mem_exporter.sampler import Sampler

    config = load_config(None, {"paths.procfs": str(fake.root), "interval": 0.5})
    sampler = Sampler(config, scope=lambda reader: TreeReader(reader, config.paths.procfs, root))
    return sampler, sampler.reader


def test_a_sampler_over_the_tree_reader_samples_only_the_tree(tmp_path):
    fake = FakeProc(tmp_path, total_kb=8_000_000, available_kb=6_000_000)
    fake.add(100, "run", ppid=1)
    children(fake, 100, {100: [101]})
    fake.add(101, "sh", ppid=100, rss_kb=2048)
    children(fake, 101, {101: [102]})
    fake.add(102, "worker", ppid=101, sid=102, rss_kb=4096)
    children(fake, 102, {102: []})
    fake.add(200, "stranger", ppid=1, rss_kb=999_999)
    sampler, tree = tree_sampler(fake)
    assert not tree.lists_host  # the fixture has child links: the tree is read through them
    first = sampler.read()
    assert sorted(p.pid for p in first.processes) == [101, 102] and first.process_count == 2
    assert sum(g.rss_bytes for g in first.groups) == (2048 + 4096) * 1024  # the stranger is in no group
    assert first.system.total_bytes == 8_000_000 * 1024 and first.sources_up == {"procfs": True}
    assert first.cpu_usage_ratio is None  # a share needs two readings of the CPU times
    (fake.root / "stat").write_text("cpu  150 0 150 900 0 0 0 0 0 0\ncpu0 150 0 150 900 0 0 0 0 0 0\n")
    second = sampler.read()
    assert second.cpu_usage_ratio == 0.5  # (100 busy) / (200 total) since the last reading, as for any sample
    assert sampler.walks == 0  # a reading of the tree is no walk of the host
    assert sorted(tree.members) == [101, 102]


def test_without_child_links_the_tree_comes_from_parent_links(tmp_path):
    fake = FakeProc(tmp_path)
    fake.add(100, "run", ppid=1)
    fake.add(101, "sh", ppid=100)
    fake.add(102, "worker", ppid=101, sid=102)
    fake.add(200, "stranger", ppid=1)
    sampler, tree = tree_sampler(fake)
    assert tree.lists_host
    sample = sampler.tick()  # lists and reads the host: a walk
    assert sorted(p.pid for p in sample.processes) == [101, 102] and sampler.walks == 1
    fake.add(103, "newcomer", ppid=102)  # forked between two full readings
    fake.add(201, "outsider", ppid=1)
    tree.read_members()
    assert sorted(tree.members) == [101, 102, 103]
    fake.add(202, "late", ppid=201)  # the child of a process outside the tree stays out
    tree.read_members()
    assert sorted(tree.members) == [101, 102, 103]


# `run` with one more consumer of its readings; argv: output file, then run's arguments
OBSERVED_RUN = textwrap.dedent("""
    import json, os, sys
    from mem_exporter.cli import build_parser
    from mem_exporter.run import Runner, options_from

    out, args = sys.argv[1], sys.argv[2:]
    runner = Runner(options_from(build_parser().parse_args(["run", *args]), os.environ))
    seen = []

    def observe(reading):
        sample = reading.sample
        seen.append({
            "full": reading.full,
            "members": sorted(p.pid for p in reading.group.members),
            "sampled": None if sample is None else sorted(p.pid for p in sample.processes),
            "cpu": None if sample is None else sample.cpu_usage_ratio,
            "total": None if sample is None else sample.system.total_bytes,
        })

    runner.consumers.append(observe)
    status = runner.run()
    with open(out, "w") as f:
        json.dump({"status": status, "command_pid": runner.cmd_pid, "seen": seen}, f)
    sys.exit(status)
""")


def test_a_consumer_attached_to_run_gets_every_reading_of_the_tree(tmp_path):
    out, log = tmp_path / "seen.json", tmp_path / "run.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEM_EXPORTER_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, HOG, "--mb", "20", "--exit", "0", "--sleep", "2"]
    listen = f"127.0.0.1:{free_port()}"  # what it serves carries the host's CPU share: the sample reads it
    observed_run = [sys.executable, "-c", OBSERVED_RUN, str(out), "-i", "0.3", "-l", str(log), "--listen", listen]
    done = subprocess.run(
        [*observed_run, "--", *command], env=env, capture_output=True, text=True, timeout=60, start_new_session=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    full = [r for r in result["seen"] if r["full"]]
    assert result["status"] == 0 and len(full) >= 4
    # each full reading is a sample of the tree (the hog), from the one Sampler: system memory and CPU share too
    assert all(r["sampled"] == r["members"] for r in full)
    assert any(r["members"] == [result["command_pid"]] for r in full)
    assert all(r["total"] > 0 for r in full) and any(r["cpu"] is not None for r in full)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len([r for r in logged if r["type"] == "sample" and not r["fast"]]) == len(full)  # the log saw the same
