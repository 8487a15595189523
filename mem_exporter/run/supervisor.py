"""Process supervision for `run` at the edge: the subreaper, the terminal, exit statuses."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for a death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


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
