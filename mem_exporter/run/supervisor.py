"""Process supervision for `run`: starting the command, learning when it ends, signals, the terminal.

Runner (run/__init__.py) watches the tree, enforces the limit and reports; a Supervisor does the rest
(supervisors.py picks the one for this OS):

- PosixSupervisor (Linux, macOS; posix.py): the wrapper is a child subreaper (Linux), so orphans of the tree
  stay its children and it reaps them; signals and children's exits wake the loop through a
  self-pipe; on a terminal the command gets the foreground, and Ctrl-Z stops and resumes both.
- PollingSupervisor (Windows; portable, so it runs on Linux too): subprocess.Popen, poll() for the
  command's exit, sleeps in short slices. No subreaper and no terminal sharing. On Windows the command
  starts suspended inside a Job Object with KILL_ON_JOB_CLOSE (platforms/windows.py), so the whole tree
  dies with `run`, even when `run` itself is killed.
"""

from __future__ import annotations

import logging
import ntpath
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..cgroups import Made, Request

log = logging.getLogger(__name__)

# the signals `run` stops the tree on, those the OS has: SIGHUP is POSIX only, SIGBREAK (Ctrl-Break) Windows only
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
SLICE = 0.05  # the polling supervisor's longest sleep: how late it may notice a signal or the command's exit

OnSignal = Callable[[int], None]  # called on the main thread with the number of a forwarded signal


class Supervisor(Protocol):
    """Starts the command and learns when it ends; the Runner only watches, limits and reports."""

    tty: int | None  # the terminal whose foreground the command was given; None when it is not shared
    subreaper: bool  # whether the tree's orphans are reparented to the wrapper
    cgroup: Made | None  # the command's own cgroup (Linux), made and removed by the supervisor
    cgroup_note: str  # the command's cgroup, or why it has none ("" when none was asked for)

    def start(self, argv: Sequence[str], on_signal: OnSignal, cgroup: Request | None = None) -> int:
        """Send forwarded signals to on_signal, start the command (in a cgroup of its own where one is
        asked for and can be made); its pid. OSError when it cannot be executed (FileNotFoundError:
        not found), with the terminal the wrapper's again."""
        ...

    def sweep(self) -> list[int]:
        """Once the tree has been stopped: kill what is left of the command where the tree walk cannot
        see (its cgroup); the pids that survived."""
        ...

    def reap(self) -> int | None:
        """Collect exited children; the command's status as a shell reports it once it has exited, else None."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, less when a signal arrives or the command exits."""
        ...

    def restore(self) -> None:
        """The terminal back to the wrapper, and the command's cgroup removed, once the command is gone."""
        ...


def forwarded_signals(module: ModuleType) -> list[int]:
    """The signals of FORWARDED that a `signal` module (this OS's) has."""
    return [getattr(module, name) for name in FORWARDED if hasattr(module, name)]


def handle_signals(handler: Callable[[int, object], None]) -> None:
    for sig in forwarded_signals(signal):
        if signal.getsignal(sig) != signal.SIG_IGN:  # started with it ignored (nohup): the command inherits that
            signal.signal(sig, handler)


def command_line(
    argv: Sequence[str], windows: bool = os.name == "nt", which: Callable[[str], str | None] = shutil.which
) -> list[str]:
    """argv with its program found as a shell would. Windows runs only .exe files by bare name, so `npm`,
    `yarn` or `pnpm` (npm.cmd ...) would be "not found": there the name is looked up along PATH with
    PATHEXT (.COM, .EXE, .BAT, .CMD, ...). A name with a directory in it, or one not found, is left as it is
    (then the start fails as it would have)."""
    program, *rest = argv
    if windows and not ntpath.dirname(program):  # ntpath: both \\ and / separate there
        program = which(program) or program
    return [program, *rest]


def returncode_status(returncode: int, posix: bool = os.name == "posix") -> int:
    """Popen.returncode as a shell reports it: on POSIX -N (killed by signal N) is 128 + N. On Windows the
    exit code as a signed 32-bit number, as PowerShell's $LASTEXITCODE shows it (0xC000013A, Ctrl-C, is
    -1073741510); sys.exit passes that on unchanged on every Python, where an unsigned one above 2**31 may not."""
    if posix:
        return 128 - returncode if returncode < 0 else returncode
    return returncode - 2**32 if returncode >= 2**31 else returncode


# --- anywhere: Popen.poll() and short sleeps --------------------------------------------------------


class PollingSupervisor:
    """Popen and poll(). Windows has no SIGCHLD or waitpid(-1), its select() takes sockets only (no
    self-pipe), and Ctrl-C does not interrupt a wait on a lock or select() there; it does interrupt
    time.sleep, hence sleeps in short slices that also check poll() and whether a signal came."""

    def __init__(self, job: Callable[[], Any] | None = None, popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        self.tty: int | None = None  # the command keeps our console (Windows) or gets a session of its own (POSIX)
        self.subreaper = False  # an orphan stays in the tree only because members are remembered once seen
        self.cgroup: Made | None = None  # no cgroups: the portable path, as on hosts without them
        self.cgroup_note = ""
        self.proc: subprocess.Popen | None = None
        self._woken = False
        # Windows: a Job Object the tree lives in (windows.JobObject); `job` makes one (tests give a stand-in)
        self._make_job = job if job is not None else (_windows_job if os.name == "nt" else None)
        self._popen = popen
        self.job: Any = None
        self.in_job = False  # whether the command was put in the job (then the tree dies with `run`)

    def _new_job(self) -> Any:
        if self._make_job is None:
            return None
        try:
            return self._make_job()
        except OSError as e:  # the tree is still watched and killed by `run`, only not when `run` is killed
            log.warning("no Job Object for the command (%s): if `run` is killed, its tree may outlive it", e)
            return None

    def start(self, argv: Sequence[str], on_signal: OnSignal, cgroup: Request | None = None) -> int:
        def handler(signum: int, _frame: object) -> None:
            self._woken = True
            on_signal(signum)

        handle_signals(handler)
        # POSIX: a session of its own, away from our terminal, as PosixSupervisor does off a terminal.
        # Windows: no creation flags: the command shares our console and its process group, so Ctrl-C
        # (and Ctrl-Break) reach it as they would without the wrapper; the wrapper gets them too and
        # stops whatever is left of the tree.
        self.job = self._new_job()
        flags = {"creationflags": self.job.creationflags} if self.job is not None else {}
        self.proc = self._popen(command_line(argv), start_new_session=os.name == "posix", **flags)
        if self.job is not None:
            try:  # started suspended: in the job before it runs, so nothing it starts is outside
                self.in_job = self.job.adopt(int(self.proc._handle))  # type: ignore[attr-defined]  # Windows only
            except OSError:
                self.proc.kill()  # it would stay suspended for ever
                self.proc.wait()
                raise
            if not self.in_job:
                log.warning("the command could not be put in a Job Object: if `run` is killed, its tree may outlive it")
        return self.proc.pid

    def reap(self) -> int | None:
        code = self.proc.poll() if self.proc is not None else None
        return None if code is None else returncode_status(code)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._woken and self.reap() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(SLICE, left))
        self._woken = False

    def sweep(self) -> list[int]:
        return []  # nothing beyond the tree to reach

    def restore(self) -> None:
        pass  # the terminal was never handed over


def _windows_job() -> Any:
    from ..platforms.windows import JobObject

    return JobObject()
