"""Every log line this project writes, and the one writer that appends them.

Shapes: the session header (the first line of a session log, of each rotated file, and of a `run` log),
the sample of a session and of a `run`, the enforcer's event, the `run`'s exit. `LINE_SCHEMA` is the JSON
Schema of all of them; docs/report.md and docs/run.md describe them for people.

`LogFile` appends whole lines to one file, for the run log, the session log (JSONL and CSV) and the event
log. What it guarantees, and why:
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
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sample import GroupSample, ProcessInfo, Sample, SystemMemory
from .units import iso_utc as iso

if TYPE_CHECKING:
    from .enforcer.policy import Action

log = logging.getLogger(__name__)

SCHEMA = 1  # the version in every session header
MB = 1000**2  # the run command's MB: powers of 1000, like every size in this project
TOP_MEMBERS = 20  # processes listed per `run` sample line, largest first (the count covers all)
FILE_MODE = 0o640
DIR_MODE = 0o700
BACKLOG_BYTES = 1 << 20  # records held for retry while the disk refuses them; beyond, the oldest are lost
DEFAULT_SESSION_MAX_BYTES = 50 * 1000**2
DEFAULT_SESSION_KEEP = 4
DEFAULT_EVENT_MAX_BYTES = 16 * 2**20  # 16 MiB x (3 kept + 1) fits the 64 MiB emptyDir of the Kubernetes enforcer
DEFAULT_EVENT_KEEP = 3
QUIET_ACTIONS = ("skipped_protected", "skipped_other_user", "no_victim")  # events that are no kill


def mb(n: float) -> float:
    return round(n / MB, 1)


def dumps(record: dict[str, Any]) -> bytes:
    """One record as one JSON line: ASCII, so any text (a command line with stray bytes, say) encodes."""
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


# --- record shapes --------------------------------------------------------------------------------


def session_header(session: str, started: float, **info: Any) -> dict[str, Any]:
    """The `type: session` line: the session's name, start, host and writer; `info` adds what the writer
    knows (command, interval, memtype, format, threshold...)."""
    return {
        "type": "session",
        "schema": SCHEMA,
        "session": session,
        "started": iso(started),
        "t": round(started, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **info,
    }


def exit_record(now: float, started: float, cause: str, exit_status: int, **info: Any) -> dict[str, Any]:
    """The last line of a `run` log: why it ended, with what status, after how long."""
    return {
        "type": "exit",
        "timestamp": iso(now),
        "t": round(now, 3),
        "cause": cause,
        "exit_status": exit_status,
        **info,
        "duration_seconds": round(now - started, 3),
    }


def run_member(p: ProcessInfo, memtype: str = "rss") -> dict[str, Any]:
    used = p.memory_bytes(memtype)
    return {
        "pid": p.pid,
        "comm": p.comm,
        "command": p.cmdline[:300],
        "memory_bytes": used,
        "memory_mb": mb(used),
    }


def run_sample_record(
    tree: GroupSample,
    threshold: int,
    timestamp: float,
    system: SystemMemory | None,
    fast: bool = False,
    phase: str | None = None,
    memtype: str = "rss",
) -> dict[str, Any]:
    """One reading of a `run`'s tree; `memory_bytes` is the `memtype` the threshold limits. `groups` repeats the
    total in the session-log shape, so `report` reads it."""
    used = tree.memory_bytes(memtype)
    rec: dict[str, Any] = {
        "type": "sample",
        "timestamp": iso(timestamp),
        "t": round(timestamp, 3),
        "pgid": tree.pgid,
        "memory_bytes": used,
        "memory_mb": mb(used),
        "threshold_bytes": threshold,
        "threshold_mb": mb(threshold),
        "percent": round(100 * used / threshold, 1) if threshold else None,
        "processes": tree.processes,
        "members": [run_member(p, memtype) for p in tree.members[:TOP_MEMBERS]],
        "fast": fast,
        "phase": phase,
        "memtype": memtype,
        "groups": [
            {
                "group": tree.label,
                "key": tree.key,
                "kind": tree.kind,
                "pgid": tree.pgid,
                "processes": tree.processes,
                "rss_bytes": tree.rss_bytes,
                **({f"{memtype}_bytes": used} if memtype != "rss" else {}),
                "limits": {"run": threshold},
            }
        ],
    }
    if system is not None and system.total_bytes:
        rec["system"] = {
            "total_bytes": system.total_bytes,
            "available_bytes": system.available_bytes,
            "used_bytes": system.used_bytes,
        }
    return rec


def peak_record(
    tree: GroupSample,
    threshold: int,
    timestamp: float,
    system: SystemMemory | None,
    phase: str | None = None,
    memtype: str = "rss",
) -> dict[str, Any]:
    """The `type: peak` line of a `run` log, written at the end: the reading at which the peak was read, members
    and all, in the sample's shape (a reading between two logged samples is otherwise not in the log)."""
    rec = run_sample_record(tree, threshold, timestamp, system, phase=phase, memtype=memtype)
    rec["type"] = "peak"
    del rec["fast"], rec["groups"]  # not a sample of the timeline: report takes the peak's value from it
    return rec


Limits = Sequence[tuple]  # (rule, group label, ..., limit bytes): the enforcer's limit_series rows


def _limits_by_group(limits: Limits) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in limits:
        out.setdefault(row[1], {})[row[0]] = int(row[-1])
    return out


def session_sample_record(sample: Sample, groups: Iterable[GroupSample], limits: Limits = ()) -> dict[str, Any]:
    """One sample of a session log (`groups`: the capped groups to log)."""
    s = sample.system
    by_group = _limits_by_group(limits)
    out_groups = []
    for g in groups:
        rec: dict[str, Any] = {
            "group": g.label,
            "key": g.key,
            "kind": g.kind,
            "processes": g.processes,
            "rss_bytes": g.rss_bytes,
        }
        if g.pgid is not None:
            rec["pgid"] = g.pgid
        if g.members:
            leader = next((p for p in g.members if p.pid == g.pgid), g.members[0])
            rec["leader"] = leader.comm
        if g.pss_bytes is not None:
            rec["pss_bytes"] = g.pss_bytes
        if g.swap_bytes is not None:
            rec["swap_bytes"] = g.swap_bytes
        if g.gpu_memory_bytes:
            rec["gpu_memory_bytes"] = {str(k): v for k, v in sorted(g.gpu_memory_bytes.items())}
        if g.label in by_group:
            rec["limits"] = by_group[g.label]
        out_groups.append(rec)
    return {
        "type": "sample",
        "t": round(sample.timestamp, 3),
        "phase": sample.phase,
        "memtype": sample.memtype,
        "system": {
            "total_bytes": s.total_bytes,
            "available_bytes": s.available_bytes,
            "used_bytes": s.used_bytes,
            "free_bytes": s.free_bytes,
            "swap_total_bytes": s.swap_total_bytes,
            "swap_used_bytes": s.swap_used_bytes,
        },
        "cpu_ratio": None if sample.cpu_usage_ratio is None else round(sample.cpu_usage_ratio, 4),
        "processes": sample.process_count,
        "groups": out_groups,
        "gpus": [
            {
                "gpu": c.index,
                "uuid": c.uuid,
                "name": c.name,
                "memory_total_bytes": c.memory_total_bytes,
                "memory_used_bytes": c.memory_used_bytes,
                "utilization_ratio": c.utilization_ratio,
                "temperature_celsius": c.temperature_celsius,
                "power_watts": c.power_watts,
                "power_limit_watts": c.power_limit_watts,
            }
            for c in sample.gpus
        ],
    }


def event_member(p: ProcessInfo, memtype: str = "rss") -> dict[str, Any]:
    mem = p.memory_bytes(memtype)
    return {"pid": p.pid, "comm": p.comm, "command": p.cmdline[:300], "uid": p.uid, "memory_bytes": mem}


def event_record(action: Action, timestamp: float, top: int = 5, memtype: str = "rss", **extra: Any) -> dict[str, Any]:
    """The enforcer's event for a policy Action; `extra` (outcome, signals, time_to_death_seconds...) is merged in."""
    g = action.group
    ev: dict[str, Any] = {
        "timestamp": iso(timestamp),
        "rule": action.rule.name,
        "condition": action.condition,
        "action": action.kind,
        "group": g.label if g else None,
        "group_key": g.key if g else None,
        "pgid": g.pgid if g else None,
        "memory_bytes": g.memory_bytes(memtype) if g else None,
        "processes": g.processes if g else 0,
        "value": action.value,
        "limit": action.limit,
        "members": [event_member(p, memtype) for p in (g.top(top) if g else ())],
    }
    if action.gpu is not None:
        ev["gpu"] = action.gpu
        ev["gpu_memory_bytes"] = g.gpu_memory_bytes.get(action.gpu) if g else None
    if action.reason:
        ev["reason"] = action.reason
    if action.kind == "dry_run":
        ev["would_signal"] = [{"pid": p.pid, "comm": p.comm} for p in action.targets]
        ev["signals"] = list(action.rule.signals)
        ev["outcome"] = "not_killed"
    ev.update(extra)
    return ev


# --- the JSON Schema of every line ----------------------------------------------------------------

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_OPT_INT = {"type": ["integer", "null"]}
_OPT_NUM = {"type": ["number", "null"]}
_GROUP = {
    "type": "object",
    "required": ["group", "key", "kind", "processes", "rss_bytes"],
    "properties": {
        "group": _STR,
        "key": _STR,
        "kind": _STR,
        "processes": _INT,
        "rss_bytes": _INT,
        "pss_bytes": _INT,
        "swap_bytes": _INT,
        "footprint_bytes": _INT,
        "private_bytes": _INT,
        "pgid": _OPT_INT,
        "leader": _STR,
        "gpu_memory_bytes": {"type": "object", "additionalProperties": _INT},
        "limits": {"type": "object", "additionalProperties": _NUM},
    },
}
_MEMBER = {
    "type": "object",
    "required": ["pid", "comm", "memory_bytes"],
    "properties": {"pid": _INT, "comm": _STR, "command": _STR, "uid": _OPT_INT, "memory_bytes": _OPT_INT},
}

LINE_SCHEMAS: dict[str, dict[str, Any]] = {
    "session": {
        "type": "object",
        "required": ["type", "schema", "session", "started", "t", "host", "pid"],
        "properties": {
            "type": {"const": "session"},
            "schema": {"const": SCHEMA},
            "session": _STR,
            "started": _STR,
            "t": _NUM,
            "host": _STR,
            "pid": _INT,
            "format": _STR,
            "memtype": {"enum": ["rss", "pss", "footprint", "private"]},
            "interval": _NUM,
        },
    },
    "sample": {
        "type": "object",
        "required": ["type", "t", "memtype", "groups"],
        "properties": {
            "type": {"const": "sample"},
            "t": _NUM,
            "timestamp": _STR,
            "phase": _OPT_STR,
            "memtype": {"enum": ["rss", "pss", "footprint", "private"]},
            "processes": _INT,
            "cpu_ratio": _OPT_NUM,
            "groups": {"type": "array", "items": _GROUP},
            "members": {"type": "array", "items": _MEMBER},
            "system": {
                "type": "object",
                "required": ["total_bytes", "available_bytes"],
                "additionalProperties": _OPT_INT,
            },
            "gpus": {"type": "array", "items": {"type": "object", "required": ["gpu"]}},
        },
    },
    "event": {
        "type": "object",
        "required": ["rule", "action"],
        "properties": {
            "type": {"const": "event"},
            "timestamp": _STR,
            "t": _NUM,
            "rule": _STR,
            "action": _STR,
            "condition": _STR,
            "group": _OPT_STR,
            "group_key": _OPT_STR,
            "pgid": _OPT_INT,
            "memory_bytes": _OPT_INT,
            "processes": _INT,
            "outcome": _STR,
            "members": {"type": "array", "items": _MEMBER},
        },
    },
    "peak": {
        "type": "object",
        "required": ["type", "t", "memory_bytes", "members"],
        "properties": {
            "type": {"const": "peak"},
            "t": _NUM,
            "timestamp": _STR,
            "memory_bytes": _INT,
            "processes": _INT,
            "phase": _OPT_STR,
            "members": {"type": "array", "items": _MEMBER},
        },
    },
    "exit": {
        "type": "object",
        "required": ["type", "t", "cause", "exit_status", "duration_seconds"],
        "properties": {
            "type": {"const": "exit"},
            "timestamp": _STR,
            "t": _NUM,
            "cause": _STR,
            "exit_status": {"type": "integer"},
            "command_status": {"type": ["integer", "null"]},
            "peak_bytes": _INT,
            "duration_seconds": _NUM,
        },
    },
}
# Every line of every log: the enforcer's events carry no `type`, so they are told apart by `action` and `rule`.
LINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "a line of a mem-exporter log (session log, run log, event log)",
    "type": "object",
    "oneOf": [{"$ref": f"#/$defs/{name}"} for name in LINE_SCHEMAS],
    "$defs": LINE_SCHEMAS,
}


def line_kind(record: dict[str, Any]) -> str | None:
    """Which schema of LINE_SCHEMAS a record follows (None: a line of no known kind, which readers skip)."""
    kind = record.get("type")
    if kind in LINE_SCHEMAS:
        return kind
    if kind is None and "action" in record and "rule" in record:
        return "event"
    return None


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
        moved: list[tuple[str, str]] = []
        doomed = f"{name}.{self.keep}" if self.keep else name
        parked = f"{self.path.parent}/.{self.path.name}.{os.getpid()}.old"
        new_fd = None
        try:
            for i in range(1, self.keep + 1):  # nothing to rotate onto but our own regular files
                try:
                    st = os.lstat(f"{name}.{i}")
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise _refuse(Path(f"{name}.{i}"), st)
            new_fd = open_append(Path(tmp), exclusive=True)
            header = self._header
            if header and os.write(new_fd, header) != len(header):
                raise OSError(errno.ENOSPC, "short write of the header")
            if self.keep:
                if os.path.lexists(doomed):
                    os.rename(doomed, parked)  # parked, not deleted, until every rename has worked
                    moved.append((parked, doomed))
                for i in range(self.keep, 0, -1):
                    src = name if i == 1 else f"{name}.{i - 1}"
                    if os.path.lexists(src):
                        os.rename(src, f"{name}.{i}")
                        moved.append((f"{name}.{i}", src))
            else:
                os.rename(name, parked)
                moved.append((parked, name))
            os.rename(tmp, name)
        except OSError as e:
            for dst, src in reversed(moved):  # undo: every kept file back where it was
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
