"""Session logs: every Sample of a session, written to a directory as JSON lines or CSV.

`SessionLog.on_sample` is a SamplingLoop consumer that only queues the (immutable)
Sample; a writer thread turns it into records and appends them, one write per sample,
so logging never slows sampling. Each file is capped and rotated (`NAME` -> `NAME.1`
-> ... -> `NAME.<keep>`, the oldest deleted), so a long session never fills the disk;
the writer thread fsyncs when it has caught up (at most once a second) and at the end.
Record shapes live in `records`, documented in docs/report.md; each file is a `logfile.LogFile`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .logfile import (
    DEFAULT_SESSION_KEEP,
    DEFAULT_SESSION_MAX_BYTES,
    LogFile,
    RotatingFile,
    make_private_dirs,
    safe_name,
    shared_log,
)
from .records import Limits, dumps, session_header, session_sample_record
from .sample import Sample

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "GPU_CSV_COLUMNS",
    "MEMORY_CSV_COLUMNS",
    "SessionLog",
    "csv_rows",
    "session_paths",
]

FORMATS = ("jsonl", "csv")
SYNC_EVERY = 1.0  # seconds between fsyncs of a busy session log

# `local_time` is for spreadsheets: Excel reads "YYYY-MM-DD HH:MM:SS" as a date and time, not a Unix timestamp.
MEMORY_CSV_COLUMNS = (
    "timestamp",
    "local_time",
    "phase",
    "kind",
    "name",
    "key",
    "memory_bytes",
    "rss_bytes",
    "pss_bytes",
    "swap_bytes",
    "processes",
    "gpu_memory_bytes",
    "limit_bytes",
    "limit_rule",
    "total_bytes",
    "available_bytes",
    "swap_total_bytes",
    "swap_used_bytes",
)
GPU_CSV_COLUMNS = (
    "timestamp",
    "local_time",
    "phase",
    "gpu",
    "uuid",
    "name",
    "memory_total_bytes",
    "memory_used_bytes",
    "utilization_ratio",
    "temperature_celsius",
    "power_watts",
    "power_limit_watts",
)


def session_paths(directory: str | os.PathLike, session: str, started: float, fmt: str) -> dict[str, Path]:
    """The files of one session: `memory-<session>-<YYYY-MM-DD_HH-mm-ss>.jsonl` (or the two CSVs) and the
    event log; a suffix `-2`, `-3`... when a session of that name started in the same second."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    directory = Path(directory)
    base = f"{safe_name(session, 'session')}-{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(started))}"
    for n in range(1, 1000):
        stem = base if n == 1 else f"{base}-{n}"
        if fmt == "jsonl":
            paths = {"samples": directory / f"memory-{stem}.jsonl"}
        else:
            paths = {"memory": directory / f"memory-{stem}.csv", "gpu": directory / f"gpu-memory-{stem}.csv"}
        paths["events"] = directory / f"events-{stem}.jsonl"
        if not any(os.path.lexists(p) for p in paths.values()):  # a dangling link is taken too
            return paths
    raise FileExistsError(f"too many sessions named {session!r} in {directory} this second")


def csv_rows(record: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(memory rows, gpu rows) of a sample record, in MEMORY_CSV_COLUMNS / GPU_CSV_COLUMNS order."""
    t, phase, s = record["t"], record["phase"] or "", record["system"]
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    memory = [
        (
            t,
            at,
            phase,
            "system",
            "system",
            "",
            s["used_bytes"],
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            s["total_bytes"],
            s["available_bytes"],
            s["swap_total_bytes"],
            s["swap_used_bytes"],
        )
    ]
    for g in record["groups"]:
        mem = g.get("pss_bytes", g["rss_bytes"]) if record["memtype"] == "pss" else g["rss_bytes"]
        limit_rule, limit = min((g.get("limits") or {}).items(), key=lambda kv: kv[1], default=("", ""))
        memory.append(
            (
                t,
                at,
                phase,
                "group",
                g["group"],
                g["key"],
                mem,
                g["rss_bytes"],
                g.get("pss_bytes", ""),
                g.get("swap_bytes", ""),
                g["processes"],
                sum((g.get("gpu_memory_bytes") or {}).values()) or "",
                limit,
                limit_rule,
                "",
                "",
                "",
                "",
            )
        )
    gpus = [
        (t, at, phase, c["gpu"], c["uuid"], c["name"], *("" if c[k] is None else c[k] for k in GPU_CSV_COLUMNS[6:]))
        for c in record["gpus"]
    ]
    return memory, gpus


def _csv_cell(value: Any) -> Any:
    """A line break inside a cell (a process may name itself so) would make one row two physical lines;
    readers take a row per line, so that a damaged row costs exactly that row."""
    return value.replace("\r", " ").replace("\n", " ") if isinstance(value, str) else value


def _csv_line(row: Sequence) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_csv_cell(v) for v in row])
    return buf.getvalue()


def csv_header(columns: Sequence[str]) -> str:
    """The first line of every CSV piece, after a UTF-8 byte order mark: without it Excel reads the file
    in the machine's ANSI code page and garbles non-ASCII process names."""
    return "\ufeff" + _csv_line(columns)


class SessionLog:
    """Writes one session's samples (and events) under `directory`. Reusable by any command that owns a
    SamplingLoop: append `on_sample` to its consumers, call `close()` at the end."""

    def __init__(
        self,
        directory: str | os.PathLike,
        session: str = "session",
        fmt: str = "jsonl",
        max_bytes: int = DEFAULT_SESSION_MAX_BYTES,
        keep: int = DEFAULT_SESSION_KEEP,
        *,
        limits: Callable[[], Limits] | None = None,
        info: dict[str, Any] | None = None,
        started: float | None = None,
        queue_size: int = 10_000,
    ):
        self.started = time.time() if started is None else started
        self.directory = Path(directory)
        make_private_dirs(self.directory)
        self.fmt = fmt
        self.paths = session_paths(self.directory, session, self.started, fmt)
        self.limits = limits  # called on the sampling thread: must be cheap (a list copy)
        self.dropped = 0
        header = dumps(session_header(session, self.started, format=fmt, **(info or {})))
        if fmt == "jsonl":
            self._files = {"samples": LogFile(self.paths["samples"], max_bytes, keep, header)}
        else:
            columns = {"memory": MEMORY_CSV_COLUMNS, "gpu": GPU_CSV_COLUMNS}
            self._files = {
                name: RotatingFile(self.paths[name], max_bytes, keep, csv_header(cols))
                for name, cols in columns.items()
            }
        self._events: LogFile | None = None  # opened with the first event (the enforcer may be writing it too)
        self._synced = time.monotonic()
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="session-log", daemon=True)
        self._thread.start()

    @property
    def event_log_path(self) -> Path:
        """Where the enforcer's events of this session go (it writes them itself, one JSON line each)."""
        return self.paths["events"]

    def on_sample(self, sample: Sample) -> None:
        self._put(("sample", sample, list(self.limits()) if self.limits else ()))

    def write_event(self, event: dict[str, Any]) -> None:
        """Append a JSON event (a `run`'s exit, say) to this session's event log."""
        self._put(("event", event, None))

    def _put(self, item) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:  # the disk cannot keep up: lose log lines, never slow the sampler
            self.dropped += 1
            if self.dropped in (1, 100, 10_000):
                log.warning("session log %s cannot keep up; %d records dropped", self.directory, self.dropped)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                break
            try:
                self._write(*item)
                if self._q.empty() and time.monotonic() - self._synced >= SYNC_EVERY:  # caught up: make it durable
                    self._sync()
            except Exception:  # a bug must not kill the thread: keep trying with later samples
                log.exception("session log write failed")
        for f in self._files.values():
            f.close()
        if self._events is not None:
            self._events.sync()

    def _sync(self) -> None:
        self._synced = time.monotonic()
        for f in self._files.values():
            f.sync()

    def _write(self, kind: str, obj: Any, limits: Limits | None) -> None:
        if kind == "event":  # the enforcer appends to the same file, through the same shared writer
            if self._events is None:
                try:
                    self._events = shared_log(self.paths["events"])  # the enforcer's limits, if it came first
                except OSError as e:
                    log.error("cannot write event log %s: %s", self.paths["events"], e.strerror or e)
                    return
            self._events.write(obj)
            return
        record = session_sample_record(obj, obj.exported, limits or ())  # the groups capped once, by the sampler
        if self.fmt == "jsonl":
            self._files["samples"].write(record)
            return
        memory, gpus = csv_rows(record)
        self._files["memory"].write_bytes("".join(_csv_line(r) for r in memory).encode("utf-8", "replace"))
        if gpus:
            self._files["gpu"].write_bytes("".join(_csv_line(r) for r in gpus).encode("utf-8", "replace"))
