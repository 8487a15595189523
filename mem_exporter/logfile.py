"""The one writer of every log file: the run log, the session log (JSONL and CSV) and the event log.

`LogFile` appends whole lines to one file. What it guarantees, and why:
- The file is opened with O_NOFOLLOW|O_CLOEXEC|O_APPEND|O_NONBLOCK and must be a regular file: a symlink
  or a FIFO planted where a log goes is refused with one line, never followed, never waited on. Files are
  created 0640 and missing directories 0700: logs hold command lines.
- One os.write() per record. A write cut short (a full disk, a file size limit) is cut back off the file
  (or, if another process appended meanwhile, the next record starts on a fresh line, so nothing is glued
  to the partial one); the record is kept in a bounded backlog and written whole once the disk takes it.
- Rotation (`max_bytes`, `keep`) prepares the new file first and renames with rollback: when any step
  fails, every kept file is still there and writing goes on in the current file.
- fsync on request: inline (`sync()`), or on a short-lived thread (`sync(background=True)`) so a caller
  holding a lock of its own never waits for the disk. The writer has its own lock.
What a line holds is `records`' business.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import weakref
from pathlib import Path
from typing import Any

from .records import dumps

log = logging.getLogger("mem_exporter.records")  # the name its lines have always carried in the daemon's log

FILE_MODE = 0o640
DIR_MODE = 0o700
BACKLOG_BYTES = 1 << 20  # records held for retry while the disk refuses them; beyond, the oldest are lost
DEFAULT_SESSION_MAX_BYTES = 50 * 1000**2
DEFAULT_SESSION_KEEP = 4
DEFAULT_EVENT_MAX_BYTES = 16 * 2**20  # 16 MiB x (3 kept + 1) fits the 64 MiB emptyDir of the Kubernetes enforcer
DEFAULT_EVENT_KEEP = 3


# --- files and directories ------------------------------------------------------------------------


class LogFileError(OSError):
    """A place where no log may be written (a symlink, a FIFO...): `strerror` says why in words."""


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parent, each 0700 (existing ones are left as they are)."""
    missing = []
    d = Path(directory)
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass


def safe_name(text: str, default: str) -> str:
    """`text` as part of a file name: each run of characters other than letters, digits, `_`, `.` and `-`
    becomes one `-`, and none leads or trails (so no hidden file, no `..`); `default` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or default


def _refuse(path: Path, st: os.stat_result) -> LogFileError:
    what = (
        "a symbolic link (logs never follow links)"
        if stat.S_ISLNK(st.st_mode)
        else "a FIFO, not a regular file"
        if stat.S_ISFIFO(st.st_mode)
        else "a directory"
        if stat.S_ISDIR(st.st_mode)
        else "not a regular file"
    )
    return LogFileError(errno.EINVAL, what, str(path))


def open_append(path: Path, exclusive: bool = False) -> int:
    """A descriptor appending to the regular file `path` (created 0640 when missing): never through a
    symlink, never blocking on a FIFO. LogFileError (an OSError) names what is in the way."""
    flags = (
        os.O_WRONLY
        | os.O_APPEND
        | os.O_CREAT
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_BINARY", 0)  # Windows: bytes as written, no \r added before \n
        | (os.O_EXCL if exclusive else 0)
    )
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EMLINK):  # EMLINK: O_NOFOLLOW on the BSDs
            try:  # say what is in the way rather than "Too many levels of symbolic links"
                raise _refuse(path, os.lstat(path)) from None
            except FileNotFoundError:
                pass
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st)
        set_blocking = getattr(os, "set_blocking", None)  # Windows (before 3.12): none, and no O_NONBLOCK to undo
        if set_blocking is not None:  # opened O_NONBLOCK so that a FIFO cannot stall the open; writes may block
            set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the writer -----------------------------------------------------------------------------------


class LogFile:
    """Appends whole lines to one file; rotates at `max_bytes` (0: never) keeping `keep` older files
    (NAME.1 newest ... NAME.keep oldest); every file starts with `header` (the session record, CSV columns)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 0, keep: int = 0, header: bytes = b""):
        self.path = Path(path)
        self.max_bytes = max(1024, int(max_bytes)) if max_bytes else 0
        self.keep = max(0, int(keep))
        self._header = header
        self.rotations = 0
        self.lost = 0  # records given up (backlog overflow): say so, never silently
        self._lock = threading.Lock()
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._torn = False  # the file ends in a partial line: the next write starts with a newline
        self._failing: str | None = None  # the error being reported, so it is logged once, not per record
        self._rotate_at = 0  # after a failed rotation, the size at which to try again
        self._dirty = False
        self._syncer: threading.Thread | None = None
        self._fd: int | None = None
        self.size = 0
        make_private_dirs(self.path.parent)  # errors go to the caller: an unusable place shows at once
        self._fd = open_append(self.path)
        self.size = os.fstat(self._fd).st_size
        self._header_len = 0
        if self.size == 0:
            self._append(self._header, is_header=True)

    # --- writing ---
    def write(self, record: dict[str, Any]) -> bool:
        return self.write_bytes(dumps(record))

    def write_bytes(self, data: bytes) -> bool:
        """Append one record (whole lines); False when it could not be written now (kept for a retry)."""
        with self._lock:
            if self._fd is None:
                return False
            if (
                self.max_bytes
                and self.size + len(data) > self.max_bytes
                and self.size > self._header_len
                and self.size >= self._rotate_at
            ):
                self._rotate()
            return self._append(data)

    def _append(self, data: bytes, is_header: bool = False) -> bool:
        """Under the lock: the backlog first, then `data`; each record in one os.write()."""
        if data:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
        while self._backlog:
            item = self._backlog[0]
            buf = b"\n" + item if self._torn else item
            why = "only part of a record was written (disk full?)"
            try:
                n = os.write(self._fd, buf)  # type: ignore[arg-type]
            except OSError as e:
                n, why = 0, str(e.strerror or e)
            self.size += n
            if n == len(buf):
                self._torn = False
                self._backlog.pop(0)
                self._backlog_bytes -= len(item)
                if is_header:
                    self._header_len = self.size
                continue
            if n and not self._cut_back(n):
                self._torn = not buf[:n].endswith(b"\n")
            self._trim_backlog()
            self._report(why)
            return False
        if self._failing:
            log.warning("log %s: writing again%s", self.path, f"; {self.lost} records lost" if self.lost else "")
            self._failing = None
        return True

    def _cut_back(self, n: int) -> bool:
        """Remove the `n` bytes of a write cut short, when nothing was appended after them (by another
        process): the file then ends on a whole record, as if the write had never happened."""
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)  # type: ignore[arg-type]
            if os.fstat(self._fd).st_size != end:  # type: ignore[arg-type]
                return False
            os.ftruncate(self._fd, end - n)  # type: ignore[arg-type]
        except OSError:
            return False
        self.size -= n
        return True

    def _trim_backlog(self) -> None:
        while self._backlog_bytes > BACKLOG_BYTES and len(self._backlog) > 1:
            self._backlog_bytes -= len(self._backlog.pop(0))
            self.lost += 1

    def _report(self, why: str) -> None:
        if self._failing != why:
            self._failing = why
            log.error("cannot write log %s: %s; %d record(s) kept to retry", self.path, why, len(self._backlog))

    # --- rotation ---
    def _rotate(self) -> None:
        """NAME -> NAME.1 -> ... -> NAME.keep (the oldest goes) and a fresh NAME, or nothing at all."""
        name = str(self.path)
        tmp = f"{self.path.parent}/.{self.path.name}.{os.getpid()}.{threading.get_ident()}.new"
        moved: list[tuple[str, str]] = []  # (where a file is now, where it was): what an undo puts back
        parked = f"{self.path.parent}/.{self.path.name}.{os.getpid()}.old"
        new_fd = None
        try:
            self._check_kept(name)
            new_fd = open_append(Path(tmp), exclusive=True)
            header = self._header
            if header and os.write(new_fd, header) != len(header):
                raise OSError(errno.ENOSPC, "short write of the header")
            self._shift(name, parked, moved)
            os.rename(tmp, name)
        except OSError as e:
            self._undo(moved, new_fd, tmp)
            self._rotate_at = self.size + max(64 * 1024, self.max_bytes // 16)
            log.error(
                "log %s: cannot rotate (%s); kept files untouched, writing on in the current file",
                self.path,
                e.strerror or e,
            )
            return
        if os.path.lexists(parked):
            try:
                os.unlink(parked)
            except OSError as e:
                log.warning("log %s: cannot delete the oldest file: %s", self.path, e)
        old, self._fd = self._fd, new_fd
        self._in_background(old)  # the finished file's fsync: never on the writing thread
        self.size = self._header_len = os.fstat(new_fd).st_size
        self._torn = False
        self._rotate_at = 0
        self.rotations += 1

    def _check_kept(self, name: str) -> None:
        """Nothing to rotate onto but our own regular files."""
        for i in range(1, self.keep + 1):
            try:
                st = os.lstat(f"{name}.{i}")
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(Path(f"{name}.{i}"), st)

    def _shift(self, name: str, parked: str, moved: list[tuple[str, str]]) -> None:
        """Each file one place older; the oldest (or, keeping none, the current one) parked, not deleted,
        until every rename has worked. Each rename done is recorded in `moved`."""
        if not self.keep:
            os.rename(name, parked)
            moved.append((parked, name))
            return
        doomed = f"{name}.{self.keep}"
        if os.path.lexists(doomed):
            os.rename(doomed, parked)
            moved.append((parked, doomed))
        for i in range(self.keep, 0, -1):
            src = name if i == 1 else f"{name}.{i - 1}"
            if os.path.lexists(src):
                os.rename(src, f"{name}.{i}")
                moved.append((f"{name}.{i}", src))

    def _undo(self, moved: list[tuple[str, str]], new_fd: int | None, tmp: str) -> None:
        """A rotation that failed: every kept file back where it was, the prepared file gone."""
        for dst, src in reversed(moved):
            try:
                os.rename(dst, src)
            except OSError as undo:
                log.error("log %s: could not undo a rename (%s -> %s): %s", self.path, dst, src, undo)
        if new_fd is not None:
            os.close(new_fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    # --- durability ---
    @staticmethod
    def _sync_and_close(fd: int | None) -> None:
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as e:
            log.debug("fsync failed: %s", e)
        os.close(fd)

    @classmethod
    def _in_background(cls, fd: int | None) -> None:
        try:
            threading.Thread(target=cls._sync_and_close, args=(fd,), name="log-sync", daemon=True).start()
        except RuntimeError:  # no thread to be had: close it here; the data is in the page cache all the same
            os.close(fd)  # type: ignore[arg-type]

    def _retry_and_dup(self) -> int | None:
        """Under the lock: write the backlog if the disk takes it now; a descriptor of the file for an fsync
        outside the lock (a rotation may close ours meanwhile)."""
        if self._backlog:
            self._append(b"")
        if self._fd is None:
            return None
        try:
            return os.dup(self._fd)
        except OSError:
            return None

    def sync(self, background: bool = False) -> None:
        """fsync now; or, with `background`, on a short-lived thread, so the caller never waits for the disk."""
        if not background:
            with self._lock:
                fd = self._retry_and_dup()
            self._sync_and_close(fd)
            return
        with self._lock:
            self._dirty = True
            if self._syncer is not None:
                return  # the running one syncs again before it stops
            try:
                self._syncer = threading.Thread(target=self._sync_loop, name="log-sync", daemon=True)
                self._syncer.start()
            except RuntimeError:  # no thread to be had: the data is in the page cache all the same
                self._syncer = None

    def _sync_loop(self) -> None:
        while True:
            with self._lock:
                if not self._dirty:
                    self._syncer = None
                    return
                self._dirty = False
                fd = self._retry_and_dup()
            self._sync_and_close(fd)

    def close(self) -> None:
        """Write what the backlog holds if the disk takes it, fsync, close."""
        with self._lock:
            if self._fd is None:
                return
            if self._backlog:
                self._append(b"")
                if self._backlog:
                    self.lost += len(self._backlog)
                    log.error(
                        "log %s: closed with %d record(s) that could not be written", self.path, len(self._backlog)
                    )
            fd, self._fd = self._fd, None
        self._sync_and_close(fd)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class RotatingFile(LogFile):
    """A capped, rotated text file whose every piece starts with `header` (a LogFile taking str)."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = DEFAULT_SESSION_MAX_BYTES,
        keep: int = DEFAULT_SESSION_KEEP,
        header: str = "",
    ):
        super().__init__(path, max_bytes, keep, header.encode())

    def write(self, text: str) -> bool:  # type: ignore[override]
        return self.write_bytes(text.encode("utf-8", "replace"))


_shared: weakref.WeakValueDictionary[str, LogFile] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def shared_log(path: str | os.PathLike, max_bytes: int | None = None, keep: int | None = None) -> LogFile:
    """The one LogFile of `path` in this process: every writer of one file (the enforcer's events and a
    session's own, say) shares its lock, its size and its rotation. Limits given win (a reload); None
    keeps the file's own, or the event log's defaults for a new one."""
    key = os.path.abspath(path)
    with _shared_lock:
        f = _shared.get(key)
        if f is None or f._fd is None:
            f = _shared[key] = LogFile(
                key,
                DEFAULT_EVENT_MAX_BYTES if max_bytes is None else max_bytes,
                DEFAULT_EVENT_KEEP if keep is None else keep,
            )
        else:
            with f._lock:
                if max_bytes is not None:
                    f.max_bytes = max(1024, int(max_bytes)) if max_bytes else 0
                if keep is not None:
                    f.keep = max(0, int(keep))
        return f
