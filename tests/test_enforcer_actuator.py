"""The actuator at its narrowest seams: PID reuse (identity check before every signal), cgroup v2 cgroup.kill."""

import os
import signal
import time

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.enforcer.actuator import HAVE_PIDFD
from mem_exporter.enforcer.actuator import ProcfsActuator as Actuator
from mem_exporter.procfs import ProcfsReader


def live_info(pid):
    (p,), _ = ProcfsReader("/proc").read_processes([pid])
    return p


MODES = [
    pytest.param(True, id="pidfd", marks=pytest.mark.skipif(not HAVE_PIDFD, reason="no pidfd")),
    pytest.param(False, id="kill"),
]


@pytest.mark.parametrize("use_pidfd", MODES)
def test_a_reused_pid_is_not_signalled(spawn_group, use_pidfd):
    """The sample recorded (pid, start time); the live process at that pid started at another time:
    it is someone else (PID reuse), so neither it nor its process group gets the signal."""
    bystander = spawn_group("--tag", "bystander")
    bystander.wait_ready()
    recorded = live_info(bystander.pid)
    stale = recorded._replace(start_time=recorded.start_time - 1)
    act = Actuator(use_pidfd=use_pidfd)
    assert act.signal_process(stale, signal.SIGKILL) == ("mismatch", None)
    d = act.signal_all([stale], signal.SIGKILL, pgid=stale.pgid)
    assert d.mismatch == [stale.pid] and d.sent == [] and d.group is False  # no killpg without a verified member
    assert not act.alive(stale)
    time.sleep(0.2)
    assert pid_alive(bystander.pid) and act.alive(recorded)


@pytest.mark.parametrize("use_pidfd", MODES)
def test_the_recorded_process_is_signalled_with_its_group(spawn_group, use_pidfd):
    hog = spawn_group("--children", "1", "--tag", "actuator")
    (child,) = hog.wait_ready()
    leader = live_info(hog.pid)
    act = Actuator(use_pidfd=use_pidfd)
    d = act.signal_all([leader], signal.SIGKILL, pgid=hog.pgid)
    assert d.sent == [hog.pid] and d.group is True  # the verified leader anchored a killpg: the child goes too
    wait_for(lambda: not pid_alive(hog.pid) and not pid_alive(child), 10, what="the group gone")
    assert act.signal_process(leader, signal.SIGKILL)[0] == "gone"
    assert act.wait_gone([leader], 1) == []


def test_cgroup_v2_kill_writes_cgroup_kill(tmp_path):
    cgroupfs = tmp_path / "cgroup"
    (cgroupfs / "jobs" / "build.scope").mkdir(parents=True)
    kill_file = cgroupfs / "jobs" / "build.scope" / "cgroup.kill"
    kill_file.write_text("")
    (cgroupfs / "cgroup.kill").write_text("")  # the root: never
    procfs = tmp_path / "proc"
    (procfs / "self").mkdir(parents=True)
    (procfs / "self" / "cgroup").write_text("0::/system.slice/mem-exporter.service\n")
    act = Actuator(procfs=str(procfs), cgroupfs=str(cgroupfs))
    assert act.cgroup_kill_file("/jobs/build.scope") == str(kill_file)
    assert act.cgroup_kill_file("/") is None and act.cgroup_kill_file("/jobs/../") is None
    assert act.cgroup_kill_file("/jobs/v1-only") is None  # cgroup v1 (or kernel < 5.14): no cgroup.kill
    assert act.cgroup_kill("/jobs/build.scope") is True
    assert kill_file.read_text() == "1"
    assert act.cgroup_kill("/") is False and (cgroupfs / "cgroup.kill").read_text() == ""


def test_cgroup_kill_refuses_the_enforcers_own_cgroup(tmp_path):
    cgroupfs = tmp_path / "cgroup"
    (cgroupfs / "system.slice").mkdir(parents=True)
    (cgroupfs / "system.slice" / "cgroup.kill").write_text("")
    procfs = tmp_path / "proc"
    (procfs / "self").mkdir(parents=True)
    (procfs / "self" / "cgroup").write_text("0::/system.slice/mem-exporter.service\n")
    act = Actuator(procfs=str(procfs), cgroupfs=str(cgroupfs))
    assert act.cgroup_kill("/system.slice") is False
    assert (cgroupfs / "system.slice" / "cgroup.kill").read_text() == ""


def test_sigkill_to_a_cgroup_group_uses_cgroup_kill_after_a_verified_member(spawn_group, tmp_path):
    hog = spawn_group("--tag", "cgroupkill")
    hog.wait_ready()
    cgroupfs = tmp_path / "cgroup"
    (cgroupfs / "job.scope").mkdir(parents=True)
    kill_file = cgroupfs / "job.scope" / "cgroup.kill"
    kill_file.write_text("")
    act = Actuator(cgroupfs=str(cgroupfs))
    member = live_info(hog.pid)
    act.signal_all([member], signal.SIGCONT, cgroup="/job.scope")
    assert kill_file.read_text() == ""  # cgroup.kill only knows SIGKILL
    stale = member._replace(start_time=member.start_time + 1)
    assert act.signal_all([stale], signal.SIGKILL, cgroup="/job.scope").group is False
    assert kill_file.read_text() == ""  # no verified member: the cgroup is not touched
    d = act.signal_all([member], signal.SIGKILL, cgroup="/job.scope")
    assert d.sent == [hog.pid] and d.group is True
    assert kill_file.read_text() == "1"


def test_a_procfs_of_another_pid_namespace_is_never_signalled(tmp_path, spawn_group):
    hog = spawn_group("--tag", "foreignns")
    hog.wait_ready()
    procfs = tmp_path / "hostproc"
    procfs.mkdir()
    (procfs / "self").symlink_to(str(os.getpid() + 100000))  # what /host/proc/self reads from a child namespace
    act = Actuator(procfs=str(procfs))
    assert act.foreign
    assert act.signal_process(live_info(hog.pid), signal.SIGKILL) == ("denied", None)
    assert pid_alive(hog.pid)
    assert not Actuator().foreign


def test_ancestors_are_the_whole_chain_up_to_init_and_a_cycle_ends_the_walk(tmp_path):
    """Every ancestor is protected, not only the parent: the enforcer's shell, its terminal, its session."""
    from helpers.procfs_builder import FakeProc

    from mem_exporter.enforcer.actuator import ancestors

    proc = FakeProc(tmp_path / "proc")
    for pid, ppid in ((500, 400), (400, 300), (300, 1), (700, 600), (600, 700)):
        proc.add(pid, f"p{pid}", ppid=ppid)
    assert ancestors(500, str(proc.root)) == {400, 300, 1}
    assert ancestors(700, str(proc.root)) == {600, 700}  # a cycle (pids reused mid-walk) ends, never loops
