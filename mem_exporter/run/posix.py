"""`run`'s supervisor on Linux and macOS: subreaper, self-pipe wakeups, the terminal, Ctrl-Z, and on
Linux a cgroup of the command's own and its death with the wrapper.

POSIX only (process groups, terminals, waitpid(-1)); supervisors.py picks it where os.name is "posix".

On Linux the command is started with PR_SET_PDEATHSIG (SIGKILL): when the wrapper dies, even by
SIGKILL, the kernel kills the command. The signal follows the death of the *thread* that forked
the child, so the command is forked from the main thread, which lives as long as the wrapper.
What the command started stays in its cgroup (cgroups.py), under the kernel limit, until it ends.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Sequence

from .. import cgroups
from ..facilities import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl
from .supervisor import OnSignal, handle_signals, returncode_status

SWEEP_TIMEOUT = 5.0  # after the cgroup's kill, how long its members get to be gone


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for a death by signal N."""
    return returncode_status(os.waitstatus_to_exitcode(status), posix=True)


def become_subreaper() -> bool:
    call = prctl()
    return call is not None and call(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


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


class ChildSetup:
    """What the child does between fork and exec: the terminal, death with the wrapper, the cgroup.
    Everything it needs is looked up in the parent: the child only calls and writes."""

    def __init__(self, tty: int | None, made: cgroups.Made | None):
        self.tty = tty
        self.made = made
        self.parent = os.getpid()
        self.prctl = prctl()

    def __call__(self) -> None:
        if self.tty is not None:
            _take_terminal(self.tty)
        if self.prctl is not None:
            self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.parent:  # the wrapper died before the line above: follow it now
                os.kill(os.getpid(), signal.SIGKILL)
        if self.made:
            try:
                self.made.join()
            except OSError:  # the parent sees it (Made.holds) and says so
                pass


class PosixSupervisor:
    """waitpid(-1) for the command and every orphan; poll() on a pipe that every signal writes to
    (poll, not select: the pipe's descriptors may be numbered above 1023 when many were inherited)."""

    def __init__(self) -> None:
        self.tty: int | None = None
        self.subreaper = False
        self.proc: subprocess.Popen | None = None
        self.status: int | None = None
        self.cgroup: cgroups.Made | None = None
        self.cgroup_note = ""
        self._wake_r = -1
        self._poll = select.poll()

    def start(self, argv: Sequence[str], on_signal: OnSignal, cgroup: cgroups.Request | None = None) -> int:
        self.subreaper = become_subreaper()
        self._install_signals(on_signal)
        if cgroup is not None:
            self._make_cgroup(cgroup)
        try:
            pid = self._spawn(argv)
        except OSError:
            self.restore()  # the child may have taken the terminal before its exec failed
            raise
        if self.cgroup and not self.cgroup.holds(pid):
            self.cgroup_note = f"no cgroup: the command could not join {', '.join(self.cgroup.dirs.values())}"
            self.cgroup.remove()
            self.cgroup = None
        return pid

    def _make_cgroup(self, request: cgroups.Request) -> None:
        made = cgroups.make(request)
        if not made:
            self.cgroup_note = f"no cgroup: {made.why}"
            return
        self.cgroup = made
        limit = f"kernel limit {request.limit} bytes in {made.limit_file}" if made.limit_file else "no kernel limit"
        kill = "cgroup.kill" if cgroups.V2 in made.dirs else "freezer" if cgroups.FREEZER in made.dirs else "signals"
        self.cgroup_note = f"cgroup ({made.who}): {', '.join(made.dirs.values())}; {limit}; kill by {kill}"
        if made.why:
            self.cgroup_note += f" ({made.why})"

    def _install_signals(self, on_signal: OnSignal) -> None:
        r, w = os.pipe()  # the loop sleeps in poll() on r; any signal writes to w and wakes it
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r = r
        self._poll.register(r, select.POLLIN)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        handle_signals(lambda signum, _frame: on_signal(signum))
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so a child's exit wakes the loop too

    def _spawn(self, argv: Sequence[str]) -> int:
        self.tty = foreground_tty()
        if self.tty is not None:  # keep the terminal: own group in our session, in the foreground
            # from now on the wrapper may be in the background: it must not be stopped for taking
            # the terminal or writing to it (whichever of parent and child runs first)
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            proc = subprocess.Popen(list(argv), preexec_fn=ChildSetup(self.tty, self.cgroup))
            try:
                os.setpgid(proc.pid, proc.pid)  # as the child does: whichever runs first wins the race
            except OSError:
                pass
            _set_foreground(self.tty, proc.pid)
        else:  # no terminal to share: a session of its own
            proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=ChildSetup(None, self.cgroup))
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
            self._poll.poll(seconds * 1000)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def sweep(self) -> list[int]:
        """SIGKILL whatever is left in the command's cgroup (what the tree's signals did not reach: a fork
        storm's newest, a process that left the tree); the pids still there after SWEEP_TIMEOUT."""
        if not self.cgroup or not self.cgroup.pids():
            return []
        self.cgroup.kill()
        return self.cgroup.wait_empty(SWEEP_TIMEOUT)

    def restore(self) -> None:
        if self.tty is not None:
            _set_foreground(self.tty, os.getpgrp())
        if self.cgroup:
            self.cgroup.remove()  # empty by now, or kept (with the kernel limit) for what survived
