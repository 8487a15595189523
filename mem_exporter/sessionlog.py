"""Session logs: every Sample of a session, written to a directory as JSON lines or CSV.

`SessionLog.on_sample` is a SamplingLoop consumer that only queues the (immutable)
Sample; a writer thread turns it into records and appends them with buffered
writes, so logging never slows sampling. Each file is capped and rotated
(`NAME` -> `NAME.1` -> ... -> `NAME.<keep>`, the oldest deleted), so a long
session never fills the disk. The record shapes are documented in docs/report.md.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .grouping import cap_groups
from .sample import Sample
from .units import iso_utc as iso

log = logging.getLogger(__name__)

SCHEMA = 1
FORMATS = ("jsonl", "csv")
DEFAULT_MAX_BYTES = 50 * 1000**2  # per file, before it rotates
DEFAULT_KEEP = 4  # rotated files kept per stream: at most (keep + 1) * max_bytes on disk each

MEMORY_CSV_COLUMNS = ("timestamp", "phase", "kind", "name", "key", "memory_bytes", "rss_bytes", "pss_bytes",
                      "swap_bytes", "processes", "gpu_memory_bytes", "limit_bytes", "limit_rule",
                      "total_bytes", "available_bytes", "swap_total_bytes", "swap_used_bytes")
GPU_CSV_COLUMNS = ("timestamp", "phase", "gpu", "uuid", "name", "memory_total_bytes", "memory_used_bytes",
                   "utilization_ratio", "temperature_celsius", "power_watts", "power_limit_watts")

Limits = Sequence[tuple]  # (rule, group label, ..., limit bytes): the enforcer's limit_series rows



def safe_session(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "session"


def session_paths(directory: str | os.PathLike, session: str, started: float, fmt: str) -> dict[str, Path]:
    """The files of one session: `memory-<session>-<YYYY-MM-DD_HH-mm-ss>.jsonl` (or the two CSVs) and the
    event log; a suffix `-2`, `-3`... when a session of that name started in the same second."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    directory = Path(directory)
    base = f"{safe_session(session)}-{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(started))}"
    for n in range(1, 1000):
        stem = base if n == 1 else f"{base}-{n}"
        if fmt == "jsonl":
            paths = {"samples": directory / f"memory-{stem}.jsonl"}
        else:
            paths = {"memory": directory / f"memory-{stem}.csv", "gpu": directory / f"gpu-memory-{stem}.csv"}
        paths["events"] = directory / f"events-{stem}.jsonl"
        if not any(p.exists() for p in paths.values()):
            return paths
    raise FileExistsError(f"too many sessions named {session!r} in {directory} this second")


def _limits_by_group(limits: Limits) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in limits:
        out.setdefault(row[1], {})[row[0]] = int(row[-1])
    return out


def sample_record(sample: Sample, groups: Iterable, limits: Limits = ()) -> dict[str, Any]:
    """The JSON-lines record of one sample (`groups`: the capped groups to log)."""
    s = sample.system
    by_group = _limits_by_group(limits)
    out_groups = []
    for g in groups:
        rec: dict[str, Any] = {"group": g.label, "key": g.key, "kind": g.kind, "processes": g.processes,
                               "rss_bytes": g.rss_bytes}
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
        "system": {"total_bytes": s.total_bytes, "available_bytes": s.available_bytes, "used_bytes": s.used_bytes,
                   "free_bytes": s.free_bytes, "swap_total_bytes": s.swap_total_bytes,
                   "swap_used_bytes": s.swap_used_bytes},
        "cpu_ratio": None if sample.cpu_usage_ratio is None else round(sample.cpu_usage_ratio, 4),
        "processes": sample.process_count,
        "groups": out_groups,
        "gpus": [{"gpu": c.index, "uuid": c.uuid, "name": c.name, "memory_total_bytes": c.memory_total_bytes,
                  "memory_used_bytes": c.memory_used_bytes, "utilization_ratio": c.utilization_ratio,
                  "temperature_celsius": c.temperature_celsius, "power_watts": c.power_watts,
                  "power_limit_watts": c.power_limit_watts} for c in sample.gpus],
    }


def csv_rows(record: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(memory rows, gpu rows) of a sample record, in MEMORY_CSV_COLUMNS / GPU_CSV_COLUMNS order."""
    t, phase, s = record["t"], record["phase"] or "", record["system"]
    memory = [(t, phase, "system", "system", "", s["used_bytes"], "", "", "", "", "", "", "",
               s["total_bytes"], s["available_bytes"], s["swap_total_bytes"], s["swap_used_bytes"])]
    for g in record["groups"]:
        mem = g.get("pss_bytes", g["rss_bytes"]) if record["memtype"] == "pss" else g["rss_bytes"]
        limit_rule, limit = min((g.get("limits") or {}).items(), key=lambda kv: kv[1], default=("", ""))
        memory.append((t, phase, "group", g["group"], g["key"], mem, g["rss_bytes"], g.get("pss_bytes", ""),
                       g.get("swap_bytes", ""), g["processes"], sum((g.get("gpu_memory_bytes") or {}).values()) or "",
                       limit, limit_rule, "", "", "", ""))
    gpus = [(t, phase, c["gpu"], c["uuid"], c["name"], *("" if c[k] is None else c[k] for k in GPU_CSV_COLUMNS[5:]))
            for c in record["gpus"]]
    return memory, gpus


class RotatingFile:
    """An append-only text file that never grows past `max_bytes`: when full it is renamed to NAME.1
    (NAME.1 to NAME.2, ...), the one beyond `keep` is deleted, and a fresh NAME starts with `header`."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP, header: str = ""):
        self.path = Path(path)
        self.max_bytes = max(1024, int(max_bytes))
        self.keep = max(0, int(keep))
        self.header = header.encode()
        self.rotations = 0
        self._open()

    def _open(self) -> None:
        self._f = open(self.path, "ab", buffering=64 * 1024)
        self.size = self._f.tell()
        if self.size == 0 and self.header:
            self._f.write(self.header)
            self.size = len(self.header)

    def write(self, text: str) -> None:
        data = text.encode()
        if self.size > len(self.header) and self.size + len(data) > self.max_bytes:
            self.rotate()
        self._f.write(data)
        self.size += len(data)

    def rotate(self) -> None:
        self._f.close()
        name = str(self.path)
        if self.keep == 0:
            os.unlink(name)
        for i in range(self.keep, 0, -1):  # NAME.keep is overwritten: the oldest goes
            src = name if i == 1 else f"{name}.{i - 1}"
            if os.path.exists(src):
                os.replace(src, f"{name}.{i}")
        self.rotations += 1
        self._open()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _csv_line(row: Sequence) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


class SessionLog:
    """Writes one session's samples (and events) under `directory`. Reusable by any command that owns a
    SamplingLoop: append `on_sample` to its consumers, call `close()` at the end."""

    def __init__(self, directory: str | os.PathLike, session: str = "session", fmt: str = "jsonl",
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP, *,
                 groups_config: Callable[[], Any] | None = None, limits: Callable[[], Limits] | None = None,
                 info: dict[str, Any] | None = None, started: float | None = None, queue_size: int = 10_000):
        from .config import Groups
        self.started = time.time() if started is None else started
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self.paths = session_paths(self.directory, session, self.started, fmt)
        self.groups_config = groups_config or Groups
        self.limits = limits  # called on the sampling thread: must be cheap (a list copy)
        self.dropped = 0
        header = {"type": "session", "schema": SCHEMA, "session": session, "started": iso(self.started),
                  "t": round(self.started, 3), "host": socket.gethostname(), "pid": os.getpid(), "format": fmt,
                  **(info or {})}
        if fmt == "jsonl":
            self._files = {"samples": RotatingFile(self.paths["samples"], max_bytes, keep, json.dumps(header, separators=(",", ":")) + "\n")}
        else:
            self._files = {"memory": RotatingFile(self.paths["memory"], max_bytes, keep, _csv_line(MEMORY_CSV_COLUMNS)),
                           "gpu": RotatingFile(self.paths["gpu"], max_bytes, keep, _csv_line(GPU_CSV_COLUMNS))}
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
                if self._q.empty():  # idle: make what we have readable (a report of a live session)
                    self._flush()
            except Exception:  # a full disk or a bug must not kill the thread: keep trying with later samples
                log.exception("session log write failed")
        for f in self._files.values():
            f.close()

    def _flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def _write(self, kind: str, obj: Any, limits: Limits | None) -> None:
        if kind == "event":  # events are rare, and the enforcer appends to the same file: one whole line per write
            with open(self.paths["events"], "a") as f:
                f.write(json.dumps(obj, default=str) + "\n")
            return
        cfg = self.groups_config()
        record = sample_record(obj, cap_groups(obj.groups, cfg.max_groups, cfg.min_memory, obj.memtype), limits)
        if self.fmt == "jsonl":
            self._files["samples"].write(json.dumps(record, separators=(",", ":")) + "\n")
            return
        memory, gpus = csv_rows(record)
        self._files["memory"].write("".join(_csv_line(r) for r in memory))
        if gpus:
            self._files["gpu"].write("".join(_csv_line(r) for r in gpus))
