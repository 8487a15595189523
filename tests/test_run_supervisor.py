"""run's supervisors: the pure pieces, and the polling supervisor against Windows' set of signals.

The polling supervisor also runs every wrapper test of test_run.py for real (the `psutil-polling` variant).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import SimpleNamespace

import pytest

from mem_exporter.run import supervisor
from mem_exporter.run.posix import PosixSupervisor, exit_code
from mem_exporter.run.supervisor import (
    PollingSupervisor,
    command_line,
    forwarded_signals,
    returncode_status,
)
from mem_exporter.run.supervisors import make_supervisor

SIGBREAK = 21  # Windows' number; this OS has no such signal


def test_a_wait_status_reads_as_a_shell_reports_it():
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3  # exited with 3
    assert exit_code(signal.SIGKILL) == 137  # killed by SIGKILL: 128 + 9


def test_a_popen_returncode_reads_as_a_shell_reports_it():
    assert returncode_status(3, posix=True) == 3
    assert returncode_status(-signal.SIGTERM, posix=True) == 128 + signal.SIGTERM  # Popen's -N: killed by N
    assert returncode_status(1, posix=False) == 1
    assert returncode_status(0xC000013A, posix=False) == -1073741510  # Windows' Ctrl-C, signed as PowerShell shows it
    assert returncode_status(-1073741510, posix=False) == -1073741510


def test_only_the_signals_this_os_has_are_forwarded():
    windows = SimpleNamespace(SIGINT=2, SIGTERM=15, SIGBREAK=SIGBREAK, SIGABRT=22)  # no SIGHUP, SIGCHLD, SIGSTOP
    assert forwarded_signals(windows) == [2, 15, SIGBREAK]
    posix = SimpleNamespace(SIGINT=2, SIGTERM=15, SIGHUP=1, SIGCHLD=17, SIGSTOP=19)
    assert forwarded_signals(posix) == [2, 15, 1]


@pytest.mark.parametrize("os_name,kind", [("posix", PosixSupervisor), ("nt", PollingSupervisor)])
def test_the_supervisor_follows_the_os(monkeypatch, os_name, kind):
    monkeypatch.setattr(os, "name", os_name)
    assert type(make_supervisor()) is kind


@pytest.fixture
def windows_signals(monkeypatch) -> dict:
    """The supervisor module sees a signal module with Windows' names only (no SIGHUP, SIGCHLD, SIGSTOP, SIGTTOU,
    set_wakeup_fd); handlers are recorded here, never installed in the test process."""
    handlers: dict = {}
    fake = SimpleNamespace(
        SIGINT=signal.SIGINT,
        SIGTERM=signal.SIGTERM,
        SIGBREAK=SIGBREAK,
        SIGABRT=signal.SIGABRT,
        SIG_DFL=signal.SIG_DFL,
        SIG_IGN=signal.SIG_IGN,
        getsignal=lambda sig: handlers.get(sig, signal.SIG_DFL),
        signal=lambda sig, handler: handlers.__setitem__(sig, handler),
    )
    monkeypatch.setattr(supervisor, "signal", fake)
    return handlers


def test_the_polling_supervisor_needs_only_windows_signals_and_wakes_on_one(windows_signals):
    windows_signals[signal.SIGTERM] = signal.SIG_IGN  # ignored when started (nohup): stays ignored
    got: list[int] = []
    sup = PollingSupervisor()
    sup.start([sys.executable, "-c", "import time; time.sleep(30)"], got.append)
    assert sup.proc is not None
    try:
        assert windows_signals[signal.SIGTERM] == signal.SIG_IGN
        assert set(windows_signals) == {signal.SIGINT, signal.SIGTERM, SIGBREAK}
        assert (sup.tty, sup.subreaper, sup.reap()) == (None, False, None)
        windows_signals[signal.SIGINT](signal.SIGINT, None)  # as the interpreter runs a handler
        began = time.monotonic()
        sup.sleep(10)
        assert time.monotonic() - began < 1 and got == [signal.SIGINT]  # woken at once, the runner told
        sup.proc.kill()
        sup.sleep(10)  # poll() sees the exit within a slice
        assert time.monotonic() - began < 5
        assert sup.reap() == 128 + signal.SIGKILL
    finally:
        sup.proc.kill()
        sup.proc.wait()


def test_the_polling_supervisor_reports_the_exit_and_a_missing_command(windows_signals):
    sup = PollingSupervisor()
    sup.start([sys.executable, "-c", "raise SystemExit(3)"], lambda signum: None)
    began = time.monotonic()
    while sup.reap() is None and time.monotonic() - began < 20:
        sup.sleep(10)
    assert sup.reap() == 3 and sup.reap() == 3  # kept once known
    with pytest.raises(FileNotFoundError):
        PollingSupervisor().start(["/nonexistent/command"], lambda signum: None)
    sup.restore()  # nothing to give back


def test_on_windows_a_bare_name_is_found_with_pathext():
    """`run -- npm test` on Windows: npm is npm.cmd, which CreateProcess does not find by its bare name."""
    found = {"npm": r"C:\Program Files\nodejs\npm.CMD"}
    assert command_line(["npm", "test"], windows=True, which=found.get) == [found["npm"], "test"]
    assert command_line(["bun", "test"], windows=True, which=found.get) == ["bun", "test"]  # not found: as it is
    for path in (r".\tools\x.cmd", "tools/x.cmd", r"C:\x.cmd"):  # a path is never looked up
        assert command_line([path], windows=True, which=lambda name: "elsewhere") == [path]
    assert command_line(["npm", "test"], windows=False, which=found.get) == ["npm", "test"]  # POSIX: execvp finds it
