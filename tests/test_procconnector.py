"""The netlink proc connector against real forks, execs and exits; its loss detection against a real
overflow; and its absence (not root, a procfs that is not the host's) leaving the caller to list /proc."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest
from helpers.paths import ROOT

from mem_exporter import procconnector
from mem_exporter.procconnector import ProcConnector, ProcEvent, parse

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs root")


@pytest.fixture
def conn():
    c = ProcConnector.open()
    if c is None:
        pytest.skip("no proc connector here (not root, or not the host's namespaces)")
    yield c
    c.close()


def _drain(c: ProcConnector, until, timeout: float = 5.0) -> tuple[list[ProcEvent], bool]:
    events: list[ProcEvent] = []
    lost = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, gap = c.read()
        events += got
        lost = lost or gap
        if until(events):
            break
        time.sleep(0.01)
    return events, lost


@needs_root
def test_fork_exec_and_exit_of_a_real_child_arrive(conn):
    # a shell forks a child that execs `true` and exits; the shell then execs `sleep` and exits
    p = subprocess.Popen(["/bin/sh", "-c", "/bin/true; exec /bin/sleep 0.05"])
    p.wait()
    events, lost = _drain(conn, lambda evs: ProcEvent("exit", p.pid) in evs)
    mine = [e for e in events if e.pid == p.pid or e.parent == p.pid]
    assert ProcEvent("fork", p.pid, os.getpid()) in mine
    assert ProcEvent("exec", p.pid) in mine  # /bin/sh, then /bin/sleep
    assert [e.kind for e in mine if e.pid == p.pid].count("exec") == 2
    child = next(e.pid for e in mine if e.kind == "fork" and e.parent == p.pid)
    assert ProcEvent("exec", child) in events and ProcEvent("exit", child) in events
    assert ProcEvent("exit", p.pid) in mine
    assert not lost


@needs_root
def test_threads_are_not_processes(conn):
    code = (
        "import threading; ids = []\n"
        "t = threading.Thread(target=lambda: ids.append(threading.get_native_id())); t.start(); t.join()\n"
        "print(ids[0])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    tid = int(p.stdout)
    events, _ = _drain(conn, lambda evs: False, timeout=0.3)
    assert any(e.kind == "exit" and e.pid != tid for e in events)  # the events did arrive
    assert all(tid not in (e.pid, e.parent) for e in events)


@needs_root
def test_an_overflow_is_reported_as_loss(tmp_path):
    """A tiny receive buffer and a burst of forks nobody reads: with NETLINK_NO_ENOBUFS the kernel drops
    silently, and the loss must still be told."""
    c = ProcConnector.open(rcvbuf=4096)
    if c is None:
        pytest.skip("no proc connector here")
    try:
        subprocess.run(["/bin/sh", "-c", "i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done"], check=True)
        events, lost = c.read()  # at once: the socket's drop count tells, no later event is needed
        assert lost
        assert c.lost_total >= 1
        # the stream goes on after the loss
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        events, _ = _drain(c, lambda evs: ProcEvent("exit", p.pid) in evs)
        assert ProcEvent("exit", p.pid) in events
    finally:
        c.close()


def test_not_root_means_no_connector_and_says_why():
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from mem_exporter.procconnector import ProcConnector\n"
        "print('conn', ProcConnector.open())\n"
    )
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "conn None" in out
    assert "not root; new processes are found by listing /proc" in out


def test_a_procfs_that_is_not_the_hosts_is_listed_instead(tmp_path):
    assert ProcConnector.open(str(tmp_path)) is None


def _msg(what: int, cpu: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("=IIQ", what, cpu, 0) + data.ljust(24, b"\0")  # the kernel sends the whole union
    cn = struct.pack("=IIIIHH", 1, 1, seq, 0, len(body), 0) + body
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, seq, 0) + cn


def test_parse_sequence_gaps_and_truncation():
    seqs: dict[int, int] = {}
    fork = _msg(procconnector.FORK, 0, 7, struct.pack("=IIII", 10, 10, 11, 11))
    thread = _msg(procconnector.FORK, 0, 8, struct.pack("=IIII", 10, 10, 12, 11))
    events, lost = parse(fork + thread, seqs)
    assert events == [ProcEvent("fork", 11, 10)] and not lost
    events, lost = parse(_msg(procconnector.EXIT, 1, 100, struct.pack("=IIII", 11, 11, 0, 17)), seqs)
    assert events == [ProcEvent("exit", 11)] and not lost  # another CPU's first message: no gap
    _, lost = parse(_msg(procconnector.EXEC, 0, 10, struct.pack("=II", 11, 11)), seqs)
    assert lost  # seq 9 on CPU 0 never came
    _, lost = parse(fork[:30], seqs)
    assert lost


@needs_root
def test_another_listeners_acknowledgement_is_not_taken_for_ours():
    """Outside the host's pid namespace the kernel ignores a subscription and acknowledges nothing, while
    each subscriber's acknowledgement reaches every listener: a process in a pid namespace of its own must
    not take another's for its own (it would then read the host's pids as its own)."""
    probe = ProcConnector.open()
    if probe is None:
        pytest.skip("no proc connector here")
    probe.close()
    code = "from mem_exporter.procconnector import ProcConnector; print(ProcConnector.open(ack_timeout=2) is None)"
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    others = 0
    while child.poll() is None:  # the host's listeners come and go, each acknowledged to all
        other = ProcConnector.open()
        assert other is not None
        other.close()
        others += 1
        time.sleep(0.02)
    assert child.communicate(timeout=10)[0].strip() == "True" and child.returncode == 0
    assert others >= 5
