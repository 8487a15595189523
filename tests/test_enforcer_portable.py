"""The psutil actuator for real on Linux, against process groups the test spawns: identity checks (PID reuse
simulated by a recorded start time that differs), TERM then KILL, the groups and users it never touches."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.processes import pid_alive
from helpers.waiting import wait_for

from mem_exporter.enforcer.actuator import Delivery
from mem_exporter.enforcer.actuator import ProcfsActuator as Actuator
from mem_exporter.enforcer.portable import PortableActuator
from mem_exporter.psutil_source import PsutilReader


def live_info(pid):
    (p,), _ = PsutilReader().read_processes([pid])
    return p


def test_same_interface_as_the_procfs_actuator():
    for name in ("alive", "signal_process", "signal_all", "wait_gone"):
        assert callable(getattr(PortableActuator, name)) and callable(getattr(Actuator, name))
    assert PortableActuator.use_pidfd is False and PortableActuator().foreign is False


def test_a_reused_pid_is_not_signalled(spawn_group):
    bystander = spawn_group("--tag", "bystander")
    bystander.wait_ready()
    recorded = live_info(bystander.pid)
    stale = recorded._replace(start_time=recorded.start_time - 1)  # the sample saw another process at this pid
    act = PortableActuator()
    assert act.signal_process(stale, signal.SIGKILL) == ("mismatch", None)
    d = act.signal_all([stale], signal.SIGKILL, pgid=stale.pgid)
    assert d == Delivery(sent=[], gone=[], mismatch=[stale.pid], denied=[], group=False)  # no killpg either
    assert not act.alive(stale) and act.alive(recorded)
    time.sleep(0.2)
    assert pid_alive(bystander.pid)


def test_identities_agree_with_the_procfs_actuator(spawn_group):
    """A sample from either source can be acted on by either actuator: the start times are one unit."""
    hog = spawn_group("--tag", "both")
    hog.wait_ready()
    p = live_info(hog.pid)
    assert Actuator().alive(p) and PortableActuator().alive(p)


def test_term_then_kill_the_whole_group(spawn_group):
    hog = spawn_group("--children", "2", "--ignore", "SIGTERM", "--tag", "portable")
    kids = hog.wait_ready()
    members = [live_info(pid) for pid in (hog.pid, *kids)]
    act = PortableActuator()
    d = act.signal_all(members, signal.SIGTERM, pgid=hog.pgid)
    assert sorted(d.sent) == sorted(p.pid for p in members) and d.group is True
    left = act.wait_gone(members, 0.5)
    assert {p.pid for p in left} == {p.pid for p in members}  # they ignore SIGTERM: the grace runs out
    d = act.signal_all(left, signal.SIGKILL, pgid=hog.pgid)
    assert d.sent and d.group
    assert act.wait_gone(members, 10) == []
    wait_for(lambda: not any(pid_alive(p.pid) for p in members), 10, what="the group gone")
    assert act.signal_process(members[0], signal.SIGKILL)[0] == "gone"


def test_killpg_reaches_a_member_forked_after_the_sample(spawn_group):
    hog = spawn_group("--children", "1", "--tag", "late")
    (child,) = hog.wait_ready()
    d = PortableActuator().signal_all([live_info(hog.pid)], signal.SIGKILL, pgid=hog.pgid)  # the child is not listed
    assert d.sent == [hog.pid] and d.group is True
    wait_for(lambda: not pid_alive(child), 10, what="the unlisted member gone through its group")


def test_never_pid_1_nor_its_own_ancestry():
    act = PortableActuator()
    me, parent = live_info(os.getpid()), live_info(os.getppid())
    assert act.signal_process(me, signal.SIGCONT) == ("denied", None)
    assert act.signal_process(parent, signal.SIGCONT) == ("denied", None)
    init = live_info(1) if PsutilReader().read_processes([1])[0] else None
    if init is not None:
        assert act.signal_process(init, signal.SIGCONT) == ("denied", None)
    for pid in (0, 4):
        assert act.why_never(pid)


def test_no_killpg_on_a_group_that_holds_the_actuator(spawn_group):
    """Even a verified member does not bring killpg to a group the actuator itself is in."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # in the test's own group
    try:
        info = wait_for(lambda: next(iter(PsutilReader().read_processes([sibling.pid])[0]), None), what="sibling")
        d = PortableActuator().signal_all([info], signal.SIGCONT, pgid=os.getpgrp())
        assert d.sent == [sibling.pid] and d.group is False
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_another_users_process_only_when_asked(tmp_path):
    nobody = 65534
    proc = subprocess.Popen(["sleep", "60"], user=nobody, group=nobody, start_new_session=True)
    try:
        info = wait_for(lambda: next(iter(PsutilReader().read_processes([proc.pid])[0]), None), what="nobody's sleep")
        assert info.uid == nobody
        act = PortableActuator()
        assert act.signal_process(info, signal.SIGKILL) == ("denied", None)
        time.sleep(0.1)
        assert pid_alive(proc.pid)
        assert act.signal_process(info, signal.SIGKILL, other_users=True)[0] == "sent"
        assert proc.wait(10) == -signal.SIGKILL
        assert PortableActuator(other_users=True).other_users
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_desktop_notifications_per_operating_system():
    """The command each OS gets, at the narrowest seam (which programs exist); none where nothing can show one."""
    from mem_exporter.enforcer.events import desktop_command

    def having(*names):
        return lambda name: f"/bin/{name}" if name in names else None

    mac = desktop_command("darwin", having("osascript"), "killed x", 'rule "r"')
    assert mac[:2] == ["osascript", "-e"] and 'with title "killed x"' in mac[2] and '\\"r\\"' in mac[2]
    win = desktop_command("win32", having("powershell", "msg"), "killed x", "body")
    assert win[0] == "powershell" and "ShowBalloonTip" in win[-1] and "killed x" not in win[-1]  # texts via env
    assert desktop_command("win32", having("msg"), "killed x", "body") == ["msg", "*", "/TIME:30", "killed x: body"]
    assert desktop_command("win32", having(), "t", "b") is None
    assert desktop_command("linux", having("notify-send"), "t", "b")[0] == "notify-send"
    assert desktop_command("linux", having(), "t", "b") is None


def test_on_windows_every_signal_is_terminate_process(spawn_group, monkeypatch):
    """Windows' branch: no signals and no process groups, so the first signal is terminate() and SIGKILL is
    kill() (both TerminateProcess there), and nothing is sent to a group. The calls are recorded at psutil's
    seam, then made for real: the test's own process really dies."""
    import psutil

    from mem_exporter.enforcer import portable

    hog = spawn_group("--tag", "windows", "--ignore", "SIGTERM")  # alive after terminate(), here on Linux
    hog.wait_ready()
    info = live_info(hog.pid)
    calls = []
    for method in ("terminate", "kill", "send_signal"):
        real = getattr(psutil.Process, method)

        def record(self, *args, _name=method, _real=real):
            calls.append((_name, self.pid, *args))
            return _real(self, *args)

        monkeypatch.setattr(psutil.Process, method, record)
    monkeypatch.setattr(portable, "IS_WINDOWS", True)
    monkeypatch.delattr(os, "getpgid")  # Windows has none: no killpg either
    act = PortableActuator()
    assert act.signal_all([info], signal.SIGTERM, pgid=info.pgid) == Delivery([info.pid], [], [], [], group=False)
    assert act.signal_all([info], portable.signal.SIGKILL, pgid=info.pgid).group is False
    assert calls == [("terminate", info.pid), ("kill", info.pid)]  # never send_signal
    wait_for(lambda: not act.alive(info), 5, what="the process gone")


def test_without_procfs_the_enforcers_ancestry_comes_from_psutil(tmp_path):
    """macOS and Windows have no /proc: the enforcer still knows its own ancestors (never victims), as on Linux."""
    from mem_exporter.enforcer.actuator import ancestors, own_context

    from_procfs = ancestors(os.getpid())
    assert os.getppid() in from_procfs
    assert ancestors(os.getpid(), str(tmp_path)) == from_procfs  # tmp_path: a root with no processes in it
    assert own_context(str(tmp_path)).ancestors == from_procfs
