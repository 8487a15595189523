"""`run` on Windows puts its command in a Job Object with KILL_ON_JOB_CLOSE, started suspended and resumed only
once inside. kernel32 and ntdll are stand-ins here that record what they are asked (with the structures as bytes);
the polling supervisor and the command are real."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from mem_exporter.platforms import windows
from mem_exporter.run.supervisor import PollingSupervisor

HANDLE = 0x2C4


class Kernel32:
    def __init__(self, calls: list, assign: bool = True):
        self.calls, self.assign = calls, assign

    def CreateJobObjectW(self, attributes, name):
        self.calls.append(("CreateJobObjectW", attributes, name))
        return 0x1A0

    def SetInformationJobObject(self, job, klass, info, size):
        raw = ctypes.string_at(ctypes.addressof(info._obj), size)
        self.calls.append(("SetInformationJobObject", job, klass, raw))
        return 1

    def AssignProcessToJobObject(self, job, process):
        self.calls.append(("AssignProcessToJobObject", job, process))
        return int(self.assign)

    def CloseHandle(self, handle):
        self.calls.append(("CloseHandle", handle))
        return 1


class Ntdll:
    def __init__(self, calls: list, status: int = 0):
        self.calls, self.status = calls, status

    def NtResumeProcess(self, process):
        self.calls.append(("NtResumeProcess", process))
        return self.status


def recording_popen(calls: list):
    """Popen as on Windows: creationflags recorded (Linux's Popen refuses them), a process handle to hand on."""

    def popen(argv, creationflags=0, **kwargs):
        calls.append(("CreateProcess", creationflags))
        proc = subprocess.Popen(argv, **kwargs)
        proc._handle = HANDLE  # type: ignore[attr-defined]
        return proc

    return popen


def test_the_command_starts_suspended_in_a_kill_on_close_job_and_then_runs():
    calls: list = []
    sup = PollingSupervisor(job=lambda: windows.JobObject(Kernel32(calls), Ntdll(calls)), popen=recording_popen(calls))
    pid = sup.start([sys.executable, "-c", "import sys; sys.exit(7)"], lambda signum: None)
    assert [c[0] for c in calls] == [
        "CreateJobObjectW",
        "SetInformationJobObject",
        "CreateProcess",
        "AssignProcessToJobObject",
        "NtResumeProcess",
    ]
    assert calls[0][1:] == (None, None)  # no security attributes: the handle is not inherited by the tree
    _, job, klass, raw = calls[1]
    assert (job, klass, len(raw)) == (0x1A0, 9, 144)  # JobObjectExtendedLimitInformation, the x64 structure
    info = windows.JOBOBJECT_EXTENDED_LIMIT_INFORMATION.from_buffer_copy(raw)
    assert info.BasicLimitInformation.LimitFlags == windows.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE == 0x2000
    assert calls[2] == ("CreateProcess", windows.CREATE_SUSPENDED)
    assert calls[3] == ("AssignProcessToJobObject", 0x1A0, HANDLE) and calls[4] == ("NtResumeProcess", HANDLE)
    assert sup.in_job and pid == sup.proc.pid
    sup.proc.wait(10)
    assert sup.reap() == 7


def test_a_job_that_cannot_take_the_command_still_runs_it():
    calls: list = []
    sup = PollingSupervisor(
        job=lambda: windows.JobObject(Kernel32(calls, assign=False), Ntdll(calls)), popen=recording_popen(calls)
    )
    sup.start([sys.executable, "-c", "pass"], lambda signum: None)
    assert not sup.in_job and calls[-1] == ("NtResumeProcess", HANDLE)
    sup.proc.wait(10)


def test_a_command_that_cannot_be_resumed_is_killed_not_left_suspended():
    calls: list = []
    sup = PollingSupervisor(
        job=lambda: windows.JobObject(Kernel32(calls), Ntdll(calls, status=0xC0000022)), popen=recording_popen(calls)
    )
    with pytest.raises(OSError, match="NtResumeProcess"):
        sup.start([sys.executable, "-c", "import time; time.sleep(60)"], lambda signum: None)
    assert sup.proc.poll() is not None


def test_without_a_job_object_the_command_runs_as_before(caplog):
    def no_job():
        raise OSError("CreateJobObjectW failed")

    calls: list = []
    sup = PollingSupervisor(job=no_job, popen=recording_popen(calls))
    sup.start([sys.executable, "-c", "pass"], lambda signum: None)
    assert calls == [("CreateProcess", 0)] and "no Job Object" in caplog.text
    sup.proc.wait(10)


def test_off_windows_no_job_is_made():
    assert PollingSupervisor()._make_job is None
