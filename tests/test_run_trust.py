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
