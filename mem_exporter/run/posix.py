"""`run`'s supervisor on Linux and macOS: subreaper, self-pipe wakeups, the terminal, Ctrl-Z.

POSIX only (process groups, terminals, waitpid(-1)); supervisor.py picks it where os.name is "posix".
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence

from .supervisor import OnSignal, handle_signals, returncode_status

PR_SET_CHILD_SUBREAPER = 36


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for a death by signal N."""
    return returncode_status(os.waitstatus_to_exitcode(status), posix=True)


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
