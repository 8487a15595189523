"""The log of one `mem-exporter run`: JSON lines, one per reading of the tree, then events and the exit.

The file is opened (and its directory made) before the command starts, so an unwritable path is
an error the user sees at once. Each line is one write to the page cache; `flush()`, called once per
full sample, asks for an fsync on a thread of its own, so a slow disk never costs the command's time;
`close()` fsyncs before it returns. Record shapes are in `records` and documented in docs/run.md; the
writer is `logfile.LogFile`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .logfile import LogFile, safe_name

APP = "mem-exporter"


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where this project keeps state: $XDG_STATE_HOME/mem-exporter, or ~/.local/state/mem-exporter (a relative
    XDG path is ignored, per the spec); on macOS and Windows the OS's convention, through platformdirs."""
    if sys.platform in ("darwin", "win32"):
        import platformdirs

        return platformdirs.user_state_path(APP, appauthor=False)
    state = environ.get("XDG_STATE_HOME", "")
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    base = Path(state) if os.path.isabs(state) else home / ".local" / "state"
    return base / APP


def runs_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return state_dir(environ) / "runs"


def log_name(command: str, started: float, pid: int) -> str:
    """`<cmd>-<YYYYmmdd-HHMMSS>-<pid>.jsonl`, local time; the wrapper's pid keeps runs in one second apart."""
    name = safe_name(os.path.basename(command), "run")
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{pid}.jsonl"


def resolve_path(
    requested: str | None, command: str, started: float, pid: int, environ: Mapping[str, str] = os.environ
) -> Path:
    """The log file: `requested`, or a fresh name inside it when it is a directory (existing, or written
    with a trailing slash), or the default."""
    if not requested:
        return runs_dir(environ) / log_name(command, started, pid)
    path = Path(requested).expanduser()
    if is_no_log(path):
        return path
    return path / log_name(command, started, pid) if requested.endswith("/") or path.is_dir() else path


def is_no_log(path: Path) -> bool:
    """`-l /dev/null` (os.devnull, as written): no log at all. Only that name: a symlink to it elsewhere is
    refused like any symlink."""
    return os.path.normpath(str(path)) == os.devnull


class RunLog:
    """The run's log file, or none for /dev/null. OSError (a symlink or FIFO in the way, no permission) is
    raised here, before the command starts; afterwards a full disk never stops the watching (records are
    kept to retry)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None if is_no_log(path) else LogFile(path)

    @property
    def kept(self) -> bool:
        return self._file is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.sync(background=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
