"""`run` in a cgroup of its own (mem_exporter/cgroups.py), on this host's real cgroups: made below the test's own
cgroup, joined before exec, limited, killed (cgroup v2 `cgroup.kill`, or the v1 freezer), removed. Every path
also runs with the feature absent: a missing or fake cgroup root, --no-cgroup, the polling supervisor.

Cleanup kills only the members of cgroups our own wrappers made (named after the wrapper's pid), then removes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_run
from helpers.processes import pid_alive
from helpers.waiting import wait_for
from test_run import POLLING, clean_env, hog, records, wait_ready

from mem_exporter import cgroups

OWN = cgroups.own_paths()
MOUNTS = cgroups.mounts()
pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.geteuid() == 0 and cgroups.V2 in MOUNTS and cgroups.MEMORY in MOUNTS),
    reason="needs root, a cgroup2 mount and the v1 memory controller (this project's test host has them)",
)
MB = 1000**2
variant, wrap = test_run.variant, test_run.wrap  # each test three ways, as in test_run.py


def cgroup_dir(kind: str, name: str) -> Path:
    return Path(MOUNTS[kind], OWN[kind].strip("/"), name)


def remove_leftover_cgroups(wrapper_pid: int) -> None:
    """What a wrapper we started left (after a SIGKILL): its cgroups, whose members are all our command's."""
    name = f"mem-exporter-run-{wrapper_pid}"
    for kind in cgroups.mounts():
        d = cgroup_dir(kind, name)
        if not d.is_dir():
            continue
        if (d / "freezer.state").exists():
            (d / "freezer.state").write_text("THAWED")
        for _ in range(200):
            pids = (d / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for _ in range(100):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.02)


@pytest.fixture
def cleanup_cgroups():
    pids: list[int] = []
    yield pids.append
    for pid in pids:
        remove_leftover_cgroups(pid)


@pytest.fixture(params=["v2", "v1"])
def cgroupfs(request, tmp_path) -> str:
    """The host's cgroup root (v2's cgroup.kill kills), or one with only the v1 hierarchies (the freezer kills)."""
    if request.param == "v2":
        return cgroups.DEFAULT_ROOT
    if cgroups.FREEZER not in MOUNTS:
        pytest.skip("no v1 freezer here")
    root = tmp_path / "v1-only"
    root.mkdir()
    for kind in (cgroups.MEMORY, cgroups.FREEZER):
        (root / kind).symlink_to(MOUNTS[kind])
    return str(root)


# the command reports where the kernel put it, and the kernel limit of its memory cgroup
PROBE = (
    "import json, sys\n"
    "where = {}\n"
    "for line in open('/proc/self/cgroup'):\n"
    "    n, ctl, path = line.rstrip().split(':', 2)\n"
    "    where['v2' if n == '0' else ctl] = path\n"
    "limit = open('/sys/fs/cgroup/memory' + where['memory'] + '/memory.limit_in_bytes').read().strip()\n"
    "json.dump({'where': where, 'limit': int(limit)}, open(sys.argv[1], 'w'))\n"
    "sys.exit(3)\n"
)


def test_the_command_runs_in_a_cgroup_of_its_own_with_the_kernel_limit_then_it_is_removed(wrap, tmp_path, variant):
    out, log = tmp_path / "probe.json", tmp_path / "run.jsonl"
    w = wrap("-v", "-t", "500", "-l", str(log), "--", sys.executable, "-c", PROBE, str(out))
    assert w.wait() == 3, w.stderr()
    probe = json.loads(out.read_text())
    name = f"mem-exporter-run-{w.proc.pid}"
    header = records(log)[0]
    if variant == POLLING:  # the portable supervisor makes none: the command stays where the wrapper is
        assert header["cgroup"] is None and probe["where"]["memory"] == OWN["memory"]
        return
    for kind in (cgroups.V2, cgroups.MEMORY):
        assert probe["where"][kind] == f"{OWN[kind].rstrip('/')}/{name}"
        assert not cgroup_dir(kind, name).exists()  # removed once empty
    assert probe["limit"] == 550 * MB // 4096 * 4096  # limit + hard ceiling (10 %), in whole pages
    assert header["cgroup"]["who"] == "root" and str(cgroup_dir(cgroups.V2, name)) in header["cgroup"]["dirs"]
    said = [
        line for line in w.stderr().splitlines() if line.startswith(("mem-exporter: cgroup", "mem-exporter: no cgroup"))
    ]
    assert len(said) == 1 and said[0].startswith("mem-exporter: cgroup (root): ") and "cgroup.kill" in said[0]


def fake_cgroupfs(root: Path) -> str:
    """Files where a cgroup filesystem's would be, on a plain filesystem: nothing the kernel would honour."""
    for rel in ("unified/cgroup.controllers", "memory/memory.limit_in_bytes", "freezer/cgroup.procs"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return str(root)


@pytest.mark.parametrize("absent", ["missing", "fake", "switched-off"])
def test_without_a_cgroup_it_says_so_once_and_runs_as_before(wrap, tmp_path, variant, absent):
    out, log = tmp_path / "probe.json", tmp_path / "run.jsonl"
    root = {"missing": str(tmp_path / "none"), "fake": fake_cgroupfs(tmp_path / "fake"), "switched-off": ""}[absent]
    env = clean_env(tmp_path, MEM_EXPORTER_CGROUPFS=root)
    off = ["--no-cgroup"] if absent == "switched-off" else []
    w = wrap(*off, "-v", "-t", "500", "-l", str(log), "--", sys.executable, "-c", PROBE, str(out), env=env)
    assert w.wait() == 3, w.stderr()
    assert json.loads(out.read_text())["where"]["memory"] == OWN["memory"]
    assert records(log)[0]["cgroup"] is None
    said = [
        line for line in w.stderr().splitlines() if line.startswith(("mem-exporter: cgroup", "mem-exporter: no cgroup"))
    ]
    if absent == "switched-off" or variant == POLLING:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith("mem-exporter: no cgroup: "), said
    if absent == "fake":  # what it made there it removed
        assert sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")) == [
            "freezer",
            "freezer/cgroup.procs",
            "memory",
            "memory/memory.limit_in_bytes",
            "unified",
            "unified/cgroup.controllers",
        ]


def test_a_stopped_wrapper_still_bounds_its_command_by_the_kernel_limit(wrap, tmp_path, variant, cleanup_cgroups):
    if variant == POLLING:
        pytest.skip(
            "the polling supervisor makes no cgroup: a stopped wrapper bounds nothing (bench/bench_run_cgroup.py)"
        )
    ready, log = tmp_path / "ready", tmp_path / "run.jsonl"
    # the hog grows 1 GB/s up to 600 MB once told to; the wrapper is stopped by then
    w = wrap(
        "-t",
        "200",
        "-l",
        str(log),
        "--",
        *hog("--grow-on-signal", "--grow", "1000", "--max-mb", "600", "--ready", str(ready)),
    )
    cleanup_cgroups(w.proc.pid)
    wait_ready(ready, w)
    header = records(log)[0]
    memory_dir = next(Path(d) for d in header["cgroup"]["dirs"] if d.startswith(MOUNTS["memory"]))
    os.kill(w.proc.pid, signal.SIGSTOP)
    try:
        os.kill(header["command_pid"], signal.SIGUSR1)
        wait_for(lambda: not pid_alive(header["command_pid"]), 15, what="the hog killed by the kernel")
        peak = int((memory_dir / "memory.max_usage_in_bytes").read_text())
        assert peak <= 220 * MB  # the kernel's limit: limit + hard ceiling
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
    assert w.wait() == 137, w.stderr()
    assert records(log)[-1]["kernel_oom_kills"] >= 1
    assert records(log)[-1]["cause"] == "memory"  # the kernel's kill at the limit is a kill for memory
    assert 150 * MB < records(log)[-1]["cgroup_peak_bytes"] <= 220 * MB  # the kernel's own high-water mark
    assert "the kernel killed 1 process at the cgroup's limit of 220 MB" in w.stderr()
    assert not memory_dir.exists()


# a double-forked daemon in a session of its own, members that join other process groups, and a fork
# storm that goes on through the grace period (SIGTERM ignored), while the leader passes the limit
STORM = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "ready = sys.argv[1]\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        open(ready + '.tmp', 'w').write(str(os.getpid())); os.replace(ready + '.tmp', ready)\n"
    "        time.sleep(600)\n"
    "    os._exit(0)\n"
    "while not os.path.exists(ready): time.sleep(0.01)\n"
    "held, forks = [], 0\n"
    "while True:\n"
    "    if forks < 400:\n"
    "        forks += 1\n"
    "        if os.fork() == 0:\n"
    "            os.setpgid(0, 0)\n"
    "            if os.fork() == 0: time.sleep(600)\n"
    "            os._exit(0)\n"
    "    held.append(bytearray(1 << 20)); held[-1][::4096] = b'x' * 256\n"
    "    time.sleep(0.005)\n"
)


def test_a_fork_storm_a_double_fork_and_new_groups_cannot_escape_the_kill(
    wrap, tmp_path, variant, cgroupfs, cleanup_cgroups
):
    if variant == POLLING:
        pytest.skip("the polling supervisor makes no cgroup")
    ready, log = tmp_path / "ready-daemon", tmp_path / "run.jsonl"
    env = clean_env(tmp_path, MEM_EXPORTER_CGROUPFS=cgroupfs)
    w = wrap(
        "-t", "150", "-i", "0.5", "--grace", "1", "-l", str(log), "--", sys.executable, "-c", STORM, str(ready), env=env
    )
    cleanup_cgroups(w.proc.pid)
    assert w.wait(90) == 137, w.stderr()
    header = records(log)[0]
    killer = os.path.join(cgroupfs, "freezer") if cgroupfs != cgroups.DEFAULT_ROOT else MOUNTS[cgroups.V2]
    assert any(d.startswith(killer + "/") for d in header["cgroup"]["dirs"])  # the freezer, or cgroup.kill
    assert all(not Path(d).exists() for d in header["cgroup"]["dirs"])  # removed: nothing was left in them
    daemon = int(ready.read_text())
    assert not pid_alive(daemon)
    event = next(r for r in records(log) if r.get("type") == "event")
    assert event["outcome"] == "dead" and event["survivors"] == []
    # the cgroup counts each page once: the storm's copy-on-write pages are far below their summed RSS
    assert 0 < event["cgroup_charge_bytes"] < event["value"]


# --- the module on its own --------------------------------------------------------------------------


def test_make_join_read_kill_and_remove(cgroupfs):
    name = f"mem-exporter-test-{os.getpid()}"
    made = cgroups.make(cgroups.Request(name, 200 * MB, cgroupfs))
    assert made, made.why
    kills_by = "freezer" if cgroups.FREEZER in made.dirs else "v2"
    assert kills_by == ("freezer" if cgroupfs != cgroups.DEFAULT_ROOT else "v2")
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], preexec_fn=made.join, start_new_session=True)
    try:
        wait_for(lambda: len(made.pids()) == 3, 5, what="three members")
        assert made.holds(proc.pid) and not made.holds(os.getpid())
        assert made.charge() is not None and made.charge() > 0
        assert int(Path(made.limit_file).read_text()) == 200 * MB // 4096 * 4096
        assert made.kill()
        assert made.wait_empty(5) == []
        assert proc.wait(5) == -signal.SIGKILL
        assert made.remove() == [] and not any(Path(d).exists() for d in made.describe()["dirs"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        made.kill()
        made.remove()


def test_nothing_is_made_where_no_cgroup_can_be(tmp_path):
    missing = cgroups.make(cgroups.Request("x", 1, str(tmp_path / "none")))
    assert not missing and "no usable cgroup hierarchy" in missing.why
    fake = cgroups.make(cgroups.Request("x", 1, fake_cgroupfs(tmp_path / "fake")))
    assert not fake.holds(os.getpid())  # the kernel never heard of it
    fake.remove()
    assert not (tmp_path / "fake" / "unified" / "x").exists()


# an ordinary user (uid 65534): nothing where root owns the cgroups; in a subtree delegated to it (as
# `systemd-run --user --scope -p Delegate=yes` gives), a cgroup of its own with cgroup.kill
AS_USER = (
    "import json, os, signal, subprocess, sys, time\n"
    "from mem_exporter import cgroups\n"
    "sys.stdin.readline()  # moved into the delegated cgroup, if any, by now\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "made = cgroups.make(cgroups.Request('mem-exporter-user-test', 100 * 10**6))\n"
    "out = {'made': bool(made), 'who': made.who, 'why': made.why, 'kinds': sorted(made.dirs)}\n"
    "if made:\n"
    "    p = subprocess.Popen(['sleep', '60'], preexec_fn=made.join)\n"
    "    time.sleep(0.2)\n"
    "    out.update(holds=made.holds(p.pid), killed=made.kill(), left=made.wait_empty(5), status=p.wait(5))\n"
    "    out['kept'] = made.remove()\n"
    "print(json.dumps(out))\n"
)


@pytest.mark.parametrize("delegated", [False, True])
def test_an_ordinary_user_gets_a_cgroup_only_in_a_delegated_subtree(delegated, tmp_path):
    d = cgroup_dir(cgroups.V2, f"mem-exporter-delegated-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_USER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        if delegated:
            d.mkdir()
            for path in (d, d / "cgroup.procs", d / "cgroup.subtree_control", d / "cgroup.threads"):
                os.chown(path, 65534, 65534)
            (d / "cgroup.procs").write_text(str(proc.pid))  # a process this test started
        out, _ = proc.communicate("go\n", timeout=30)
        result = json.loads(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if delegated:
            wait_for(lambda: not (d / "cgroup.procs").read_text().split(), 5, what="the delegated cgroup empty")
            d.rmdir()
    assert result["who"] == "delegated subtree"
    if not delegated:
        assert not result["made"] and "Permission denied" in result["why"]
        return
    # v2 only: the v1 memory hierarchy is root's, so no kernel limit, but an atomic kill
    assert result["made"] and result["kinds"] == ["v2"] and "Permission denied" in result["why"]
    assert result["holds"] and result["killed"] and result["left"] == [] and result["status"] == -signal.SIGKILL
    assert result["kept"] == []


def test_a_cgroup_left_under_the_same_name_is_replaced_only_when_empty(tmp_path):
    name = f"mem-exporter-test-stale-{os.getpid()}"
    stale = cgroup_dir(cgroups.V2, name)
    stale.mkdir()  # as a wrapper killed by SIGKILL leaves it, once its members are gone
    made = cgroups.make(cgroups.Request(name, None))
    sleeper = None
    try:
        assert made and cgroups.V2 in made.dirs and made.why == ""
        sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=made.join)  # now one with a member left in it
        again = cgroups.make(cgroups.Request(name, None))
        assert cgroups.V2 not in again.dirs and "busy" in again.why
        again.remove()
        assert made.holds(sleeper.pid)
    finally:
        made.kill()
        made.wait_empty(5)
        if sleeper is not None:
            sleeper.wait(5)
        made.remove()
