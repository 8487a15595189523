"""`run` against a command that tries to outlive it: a member that joins the wrapper's own process group,
descriptors inherited past select()'s reach, a SIGKILL of the wrapper.

Real wrappers on real commands, each test three ways as in test_run.py (procfs, psutil, polling
supervisor), and with the command's cgroup (cgroups.py) and without it (--no-cgroup: today's path,
what hosts without cgroups get). Cleanup signals only pids our own commands reported.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import sys
import termios
from pathlib import Path

import pytest
import test_run
from helpers.paths import HOG
from helpers.processes import is_hog, pid_alive
from helpers.waiting import wait_for
from test_run import POLLING, Wrapped, clean_env, hog, records, wait_ready
from test_run_cgroup import remove_leftover_cgroups

variant, wrap = test_run.variant, test_run.wrap  # each test three ways, as in test_run.py
CGROUP_MODES = {"cgroup": [], "no-cgroup": ["--no-cgroup"]}


@pytest.fixture(params=list(CGROUP_MODES))
def mode(request) -> list[str]:
    return CGROUP_MODES[request.param]


# --- 20.11: a member that joins the wrapper's process group is killed too ----------------------------

ESCAPE = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the hangup when the wrapper, the session leader, exits\n"
    "os.setpgid(0, os.getsid(0))  # the wrapper leads the session: its group is the session's\n"
    "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {os.getpgrp()}')\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(600)\n"
)


def test_a_member_in_the_wrappers_own_group_is_killed_with_the_tree(wrap, tmp_path, variant, mode):
    if variant == POLLING:
        pytest.skip("the polling supervisor gives the command a session of its own: it cannot join the wrapper's group")
    ready, log = tmp_path / "ready-escapee", tmp_path / "run.jsonl"
    # on a terminal the command shares the wrapper's session, so a member may join the wrapper's group;
    # the hog grows only once it has
    script = (
        f'{sys.executable} -c "$ESCAPE" {ready} {HOG} & '
        f"while [ ! -s {ready} ]; do sleep 0.05; done; exec {sys.executable} {HOG} --mb 10 --grow 200"
    )
    master, slave = pty.openpty()
    try:
        w = wrap(
            *mode,
            "-t",
            "100",
            "-i",
            "0.5",
            "--grace",
            "1",
            "-l",
            str(log),
            "--",
            "sh",
            "-c",
            script,
            env=clean_env(tmp_path, ESCAPE=ESCAPE),
            stdin=slave,
            stdout=slave,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        assert w.wait(60) == 137, w.stderr()
    finally:
        os.close(master)
    escapee, group = map(int, ready.read_text().split())
    assert group == w.proc.pid  # the group it joined is the wrapper's
    wait_for(lambda: not pid_alive(escapee), 10, what=f"the member {escapee} in the wrapper's group gone")
    event = next(r for r in records(log) if r.get("type") == "event")
    assert event["outcome"] == "dead" and event["survivors"] == []
    if mode == ["--no-cgroup"]:  # without a cgroup, only the tree's signals can have reached it
        assert escapee in {p["pid"] for p in event["signalled"]}


# --- 20.11: what survived is said -------------------------------------------------------------------

FREEZER = Path("/sys/fs/cgroup/freezer")
SURVIVOR = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not FREEZER.is_dir(), reason="needs root and the cgroup v1 freezer")
def test_a_member_no_signal_can_end_is_reported_as_a_survivor(wrap, tmp_path, variant):
    """A member frozen in a cgroup of the test's own holds SIGKILL pending and lives on (as a process in
    uninterruptible sleep on a dead disk would): `run` waits for its death, then says it survived, in the
    kill event and on stderr, instead of reporting the tree killed."""
    if variant != "procfs":
        pytest.skip("the kill engine that reports survivors is one for every source and supervisor")
    ready, go, log = tmp_path / "ready", tmp_path / "go", tmp_path / "run.jsonl"
    frozen = FREEZER / f"mem-exporter-test-{os.getpid()}-{tmp_path.name}"
    frozen.mkdir()
    script = (
        f'{sys.executable} -c "$SURVIVOR" {ready} & '
        f"while [ ! -e {go} ]; do sleep 0.05; done; exec {sys.executable} {HOG} --mb 10 --grow 200"
    )
    survivor = None
    try:
        w = wrap(
            "--no-cgroup", "-t", "100", "--grace", "1", "-l", str(log), "--", "sh", "-c", script,
            env=clean_env(tmp_path, SURVIVOR=SURVIVOR),
        )  # fmt: skip
        wait_for(lambda: ready.exists() and ready.read_text(), 20, what="the member to freeze")
        survivor = int(ready.read_text())
        (frozen / "cgroup.procs").write_text(str(survivor))
        (frozen / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (frozen / "freezer.state").read_text().strip() == "FROZEN", 10, what="frozen")
        go.touch()
        assert w.wait(60) == 1, w.stderr()  # 137 says the tree was killed: it was not, all of it
        event = next(r for r in records(log) if r.get("type") == "event")
        assert (event["outcome"], event["survivors"]) == ("survived", [survivor])
        assert "mem-exporter: could not kill `sh -c" in w.stderr()
        assert f"mem-exporter: warning: still alive after SIGKILL: {survivor}\n" in w.stderr()
        assert pid_alive(survivor)
    finally:
        (frozen / "freezer.state").write_text("THAWED")  # its pending SIGKILL ends it
        if survivor is not None:
            wait_for(lambda: not pid_alive(survivor), 10, what="the survivor gone once thawed")
        wait_for(lambda: not (frozen / "cgroup.procs").read_text().split(), 10, what="the test's cgroup empty")
        frozen.rmdir()


# --- 20.12: descriptors inherited past 1023 -----------------------------------------------------------

# the wrapper starts with 1100 descriptors open: its own are numbered above 1023, where select() fails
INHERIT = (
    "import os, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n"
    "for _ in range(1100):\n"
    "    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def test_a_wrapper_started_with_1100_descriptors_watches_and_kills(tmp_path, variant, mode):
    from test_run import POLLING_RUN, RUN

    run = POLLING_RUN if variant == POLLING else RUN
    ready, log = tmp_path / "ready", tmp_path / "run.jsonl"
    w = Wrapped(
        tmp_path,
        [sys.executable, "-c", INHERIT, *run[1:]],
        [
            *mode,
            "-t",
            "80",
            "-i",
            "0.2",
            "--grace",
            "1",
            "-l",
            str(log),
            "--",
            *hog("--ready", str(ready), "--grow", "50"),
        ],
        close_fds=False,
    )
    try:
        assert w.wait(60) == 137, w.stderr()
        assert "Traceback" not in w.stderr()
        exit_record = records(log)[-1]  # the wrapper's own end, not a crash (cause "error")
        # "memory": the wrapper's kill; "exited": on a host too busy for the wrapper, the cgroup's kernel limit
        assert exit_record["cause"] == "memory" or exit_record["kernel_oom_kills"] >= 1, exit_record
        assert not pid_alive(records(log)[0]["command_pid"])
    finally:
        w.cleanup()


# --- 20.13: a SIGKILL of the wrapper takes the command along ----------------------------------------


def test_kill_9_of_the_wrapper_kills_its_command(wrap, tmp_path, variant, mode):
    if variant == POLLING:
        pytest.skip("the polling supervisor is the portable one (Windows): no PR_SET_PDEATHSIG")
    ready, log = tmp_path / "ready", tmp_path / "run.jsonl"
    w = wrap(*mode, "-t", "2GB", "-l", str(log), "--", *hog("--children", "1", "--ready", str(ready)))
    child = wait_ready(ready, w)[0]
    header = records(log)[0]
    command = header["command_pid"]
    try:
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)
        wait_for(lambda: not pid_alive(command), 5, what=f"the command {command} gone with its wrapper")
        if header["cgroup"]:  # what the command started stays in the cgroup, under the kernel limit
            dirs = header["cgroup"]["dirs"]
            assert any(str(child) in Path(d, "cgroup.procs").read_text().split() for d in dirs)
            limit_file = Path(header["cgroup"]["limit_file"])
            assert limit_file.parent in map(Path, dirs) and int(limit_file.read_text()) >= 2.2e9 - 4096
        else:
            assert mode == ["--no-cgroup"]
    finally:
        for pid in (command, child):
            if is_hog(pid):
                os.kill(pid, signal.SIGKILL)
        remove_leftover_cgroups(w.proc.pid)
