"""Process supervision for `run`: starting the command, learning when it ends, signals, the terminal.

Runner (run/__init__.py) watches the tree, enforces the limit and reports; a Supervisor does the rest:

- PosixSupervisor (Linux, macOS): the wrapper is a child subreaper (Linux), so orphans of the tree
  stay its children and it reaps them; signals and children's exits wake the loop through a
  self-pipe; on a terminal the command gets the foreground, and Ctrl-Z stops and resumes both.
- PollingSupervisor (Windows; portable, so it runs on Linux too): subprocess.Popen, poll() for the
  command's exit, sleeps in short slices. No subreaper and no terminal sharing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol

PR_SET_CHILD_SUBREAPER = 36
# the signals `run` stops the tree on, those the OS has: SIGHUP is POSIX only, SIGBREAK (Ctrl-Break) Windows only
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
SLICE = 0.05  # the polling supervisor's longest sleep: how late it may notice a signal or the command's exit

OnSignal = Callable[[int], None]  # called on the main thread with the number of a forwarded signal


class Supervisor(Protocol):
    """Starts the command and learns when it ends; the Runner only watches, limits and reports."""

    tty: int | None  # the terminal whose foreground the command was given; None when it is not shared
    subreaper: bool  # whether the tree's orphans are reparented to the wrapper

    def start(self, argv: Sequence[str], on_signal: OnSignal) -> int:
        """Send forwarded signals to on_signal, start the command; its pid. OSError when it cannot be
        executed (FileNotFoundError: not found), with the terminal the wrapper's again."""
        ...

    def reap(self) -> int | None:
        """Collect exited children; the command's status as a shell reports it once it has exited, else None."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, less when a signal arrives or the command exits."""
        ...

    def restore(self) -> None:
        """The terminal back to the wrapper, once the command is gone."""
        ...


def make_supervisor() -> Supervisor:
    """The POSIX supervisor on Linux and macOS; the polling one elsewhere (Windows)."""
    return PosixSupervisor() if os.name == "posix" else PollingSupervisor()


def forwarded_signals(module: ModuleType) -> list[int]:
    """The signals of FORWARDED that a `signal` module (this OS's) has."""
    return [getattr(module, name) for name in FORWARDED if hasattr(module, name)]


def handle_signals(handler: Callable[[int, object], None]) -> None:
    for sig in forwarded_signals(signal):
        if signal.getsignal(sig) != signal.SIG_IGN:  # started with it ignored (nohup): the command inherits that
            signal.signal(sig, handler)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for a death by signal N."""
    return returncode_status(os.waitstatus_to_exitcode(status), posix=True)


def returncode_status(returncode: int, posix: bool = os.name == "posix") -> int:
    """Popen.returncode as a shell reports it: on POSIX -N (killed by signal N) is 128 + N. On Windows the
    exit code as a signed 32-bit number, as PowerShell's $LASTEXITCODE shows it (0xC000013A, Ctrl-C, is
    -1073741510); sys.exit passes that on unchanged on every Python, where an unsigned one above 2**31 may not."""
    if posix:
        return 128 - returncode if returncode < 0 else returncode
    return returncode - 2**32 if returncode >= 2**31 else returncode


# --- POSIX: subreaper, self-pipe, terminal --------------------------------------------------------


def become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def foreground_tty() -> int | None:
    """Our controlling terminal, when we hold its foreground: the command is then given the terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _set_foreground(tty: int, pgid: int) -> None:
    try:
        os.tcsetpgrp(tty, pgid)
    except OSError:
        pass


def _take_terminal(tty: int) -> None:
    """In the child, before exec: its own process group, in the foreground of our terminal."""
    os.setpgid(0, 0)
    _set_foreground(tty, os.getpgrp())  # SIGTTOU is ignored here, as in the parent
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)  # an ignored signal would stay ignored across exec


class PosixSupervisor:
    """waitpid(-1) for the command and every orphan; select() on a pipe that every signal writes to."""

    def __init__(self) -> None:
        self.tty: int | None = None
        self.subreaper = False
        self.proc: subprocess.Popen | None = None
        self.status: int | None = None
        self._wake_r = -1

    def start(self, argv: Sequence[str], on_signal: OnSignal) -> int:
        self.subreaper = become_subreaper()
        self._install_signals(on_signal)
        try:
            return self._spawn(argv)
        except OSError:
            self.restore()  # the child may have taken the terminal before its exec failed
            raise

    def _install_signals(self, on_signal: OnSignal) -> None:
        r, w = os.pipe()  # the loop sleeps in select() on r; any signal writes to w and wakes it
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        handle_signals(lambda signum, _frame: on_signal(signum))
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so a child's exit wakes the loop too

    def _spawn(self, argv: Sequence[str]) -> int:
        self.tty = foreground_tty()
        if self.tty is not None:  # keep the terminal: own group in our session, in the foreground
            # from now on the wrapper may be in the background: it must not be stopped for taking
            # the terminal or writing to it (whichever of parent and child runs first)
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            proc = subprocess.Popen(list(argv), preexec_fn=functools.partial(_take_terminal, self.tty))
            try:
                os.setpgid(proc.pid, proc.pid)  # as the child does: whichever runs first wins the race
            except OSError:
                pass
            _set_foreground(self.tty, proc.pid)
        else:  # no terminal to share: a session of its own
            proc = subprocess.Popen(list(argv), start_new_session=True)
        self.proc = proc
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # only now: the command's SIGTTOU stays default
        return proc.pid

    def reap(self) -> int | None:
        """Collect every exited child: the command (its status kept) and the tree's reparented orphans."""
        while self.proc is not None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid != self.proc.pid:
                continue
            if os.WIFSTOPPED(status):
                self._suspend()
                continue
            self.status = exit_code(status)
            self.proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        return self.status

    def _suspend(self) -> None:
        """The command stopped (Ctrl-Z): stop the wrapper too, so the shell sees its job stopped; resume both."""
        if self.tty is None or self.proc is None:
            return
        _set_foreground(self.tty, os.getpgrp())
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell continues us (fg or bg)
        try:
            if os.tcgetpgrp(self.tty) == os.getpgrp():  # `fg`: hand the terminal back; `bg`: leave it to the shell
                _set_foreground(self.tty, self.proc.pid)
        except OSError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
        except OSError:
            pass

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            select.select([self._wake_r], [], [], seconds)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def restore(self) -> None:
        if self.tty is not None:
            _set_foreground(self.tty, os.getpgrp())


# --- anywhere: Popen.poll() and short sleeps --------------------------------------------------------


class PollingSupervisor:
    """Popen and poll(). Windows has no SIGCHLD or waitpid(-1), its select() takes sockets only (no
    self-pipe), and Ctrl-C does not interrupt a wait on a lock or select() there; it does interrupt
    time.sleep, hence sleeps in short slices that also check poll() and whether a signal came."""

    def __init__(self) -> None:
        self.tty: int | None = None  # the command keeps our console (Windows) or gets a session of its own (POSIX)
        self.subreaper = False  # an orphan stays in the tree only because members are remembered once seen
        self.proc: subprocess.Popen | None = None
        self._woken = False

    def start(self, argv: Sequence[str], on_signal: OnSignal) -> int:
        def handler(signum: int, _frame: object) -> None:
            self._woken = True
            on_signal(signum)

        handle_signals(handler)
        # POSIX: a session of its own, away from our terminal, as PosixSupervisor does off a terminal.
        # Windows: no creation flags: the command shares our console and its process group, so Ctrl-C
        # (and Ctrl-Break) reach it as they would without the wrapper; the wrapper gets them too and
        # stops whatever is left of the tree.
        self.proc = subprocess.Popen(list(argv), start_new_session=os.name == "posix")
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

    def restore(self) -> None:
        pass  # the terminal was never handed over
