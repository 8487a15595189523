"""cgroup v2 on a mount the test makes and removes: `cgroup.kill` ends a forking tree at once, and
`cgroup.events` says when the cgroup is empty (mem_exporter/cgroups.py). Without v2 (a v1-only Made)
`populated()` has no answer and waiting falls back to `cgroup.procs`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter import cgroups

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.geteuid() == 0), reason="mounting cgroup2 needs root on Linux"
)


@pytest.fixture
def cgroup2(tmp_path):
    """A cgroup2 mount of our own under tmp_path (the host's one hierarchy, seen at a second place)."""
    root = tmp_path / "cgroupfs"
    (root / "unified").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(root / "unified")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount cgroup2 here: {r.stderr.strip()}")
    try:
        yield str(root)
    finally:
        subprocess.run(["umount", str(root / "unified")], check=True)


def test_cgroup_kill_and_cgroup_events_on_our_own_mount(cgroup2):
    made = cgroups.make(cgroups.Request(f"mem-exporter-test-{uuid.uuid4().hex[:8]}", root=cgroup2), uses=[cgroups.V2])
    assert made, made.why
    try:
        assert made.populated() is False
        # a tree that forks: the shell, a sleep in the background and one in the foreground
        proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], preexec_fn=made.join, start_new_session=True)
        wait_for(lambda: len(made.pids()) >= 3, 10, what="the shell and both sleeps in the cgroup")
        assert made.holds(proc.pid) and made.populated() is True
        members = made.pids()
        assert made.kill()  # cgroup.kill: every member at once, the background child included
        proc.wait(10)
        assert made.wait_empty(10) == [] and made.populated() is False
        wait_for(lambda: not any(pid_alive(p) for p in members), 10, what="every member dead")
    finally:
        for pid in made.pids():
            os.kill(pid, 9)
        assert made.remove() == []
    assert not any(os.path.exists(d) for d in made.dirs.values())


def test_without_v2_there_is_no_populated_answer():
    assert cgroups.Made().populated() is None
