"""Reading session logs into a `Run`: this project's JSONL and CSV, and the enforcer's event log.

A directory stands for every log file in it, rotated ones (`NAME.1`, ...) included.
Records are recognised by shape, not by file name, so event lines may sit in any file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..records import line_kind
from .model import Run, RunRecord
from .progress import Progress

_LOG_SUFFIXES = (".jsonl", ".json", ".csv", ".ndjson")


def is_log_file(path: Path) -> bool:
    name = path.name
    while name.rsplit(".", 1)[-1].isdigit() and "." in name:  # a rotated NAME.jsonl.3
        name = name.rsplit(".", 1)[0]
    return path.is_file() and name.endswith(_LOG_SUFFIXES)


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if is_log_file(f))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def _time(value: Any) -> float | None:
    """Unix seconds from a number or an ISO 8601 string ("...Z" included)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def add_sample(run: Run, rec: dict[str, Any]) -> None:
    """A `type: sample` record (docs/report.md)."""
    t = _time(rec["t"])
    if t is None:  # a sample without its time cannot be placed: a damaged record
        raise ValueError("no timestamp")
    if not run.new_sample(t, rec.get("phase")):
        return
    memtype = rec.get("memtype") or run.memtype
    run.memtype = memtype
    s = rec.get("system") or {}
    if s.get("total_bytes"):
        run.system.capacity = float(s["total_bytes"])
        used = s.get("used_bytes")
        run.system.add(t, used if used is not None else s["total_bytes"] - s["available_bytes"])
    if s.get("swap_total_bytes") is not None:
        run.swap.capacity = float(s["swap_total_bytes"]) or None
        run.swap.add(t, s.get("swap_used_bytes"))
    for g in rec.get("groups") or ():
        series = run.group(g["group"])
        value = g.get(f"{memtype}_bytes")  # pss, footprint (macOS), private (Windows) where the log has them
        value = g.get("rss_bytes") if value is None else value
        series.add(t, value)
        for rule, limit in (g.get("limits") or {}).items():
            series.limits[rule] = float(limit)
        series.gpu_bytes = max(series.gpu_bytes, float(sum((g.get("gpu_memory_bytes") or {}).values())))
    for c in rec.get("gpus") or ():
        run.gpu(str(c["gpu"]), c.get("name"), c.get("memory_total_bytes")).add(t, c.get("memory_used_bytes"))


def add_event(run: Run, rec: dict[str, Any], current: RunRecord | None = None) -> None:
    ev = dict(rec)
    ev["t"] = _time(rec.get("t", rec.get("timestamp"))) or 0.0
    run.events.append(ev)
    if current is not None and ev.get("cause") == "memory" and ev.get("action") in ("term", "kill"):
        current.killed = ev


def _run_started(run: Run, rec: dict[str, Any]) -> RunRecord | None:
    """The session line of a `run` log (it names the command and the threshold) opens a RunRecord."""
    command, threshold = rec.get("command"), rec.get("threshold_bytes")
    if not isinstance(command, list) or not threshold:
        return None
    r = RunRecord(
        command=[str(c) for c in command],
        group=str(rec.get("session") or command[0]),
        started=float(_time(rec.get("t", rec.get("started"))) or 0.0),
        threshold_bytes=float(threshold),
        threshold_text=rec.get("threshold_text"),
    )
    run.runs.append(r)
    return r


def _run_line(r: RunRecord, rec: dict[str, Any]) -> None:
    """A line of an open run: its samples' span, the peak's reading, the exit."""
    t = _time(rec.get("t"))
    kind = rec.get("type")
    if kind == "sample" and t is not None:
        r.first = t if r.first is None else r.first
        r.last = t
    elif kind == "peak":
        r.peak_t, r.peak_bytes = t, float(rec["memory_bytes"])
        r.peak_members = list(rec.get("members") or [])
    elif kind == "exit":
        r.exit_status, r.cause = rec.get("exit_status"), rec.get("cause")
        r.duration = _num(rec.get("duration_seconds"))
        if rec.get("peak_bytes") is not None:
            r.peak_bytes = float(rec["peak_bytes"])


def add_record(run: Run, rec: dict[str, Any], current: RunRecord | None = None) -> RunRecord | None:
    """One JSON line of any of this project's logs: a session log, a `run` log, an event log. Returns the
    `run` this line belongs to, if any (a run log's lines follow its session line)."""
    kind = line_kind(rec)
    if kind == "sample":
        add_sample(run, rec)
    elif kind == "session":
        run.sessions.append(rec)
        run.memtype = rec.get("memtype") or run.memtype
        return _run_started(run, rec)
    elif kind == "event":
        add_event(run, rec, current)
    if current is not None and kind in ("sample", "peak", "exit"):
        _run_line(current, rec)
    return current


def _damaged(run: Run, path: Path) -> None:
    run.skipped[str(path)] = run.skipped.get(str(path), 0) + 1


def read_jsonl(path: Path, run: Run, progress: Progress) -> None:
    """Every line a record; one that does not parse (cut by a crash or a full disk) is skipped and counted."""
    current: RunRecord | None = None
    with open(path, "rb") as f:
        for line in f:
            progress.update(len(line))
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if isinstance(rec, dict):
                    current = add_record(run, rec, current)
            except (ValueError, KeyError, TypeError):
                _damaged(run, path)


def read_csv(path: Path, run: Run, progress: Progress) -> None:
    """The memory CSV (system and group rows) or the GPU CSV, told apart by their columns. A row per line
    (the writer keeps line breaks out of cells), so a damaged row is skipped alone and counted."""
    keep = False  # whether the current timestamp is new (the same file read twice adds nothing)
    fields: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            progress.update(len(raw))
            try:
                # a byte order mark opens each file (for Excel); files written before it have none
                cells = next(csv.reader([raw.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")]), [])
            except (UnicodeDecodeError, csv.Error):
                _damaged(run, path)
                continue
            if not cells or cells == [""]:
                continue
            if not fields or cells == fields:  # the header (a rotated file repeats it)
                fields = cells
                continue
            if len(cells) != len(fields):
                _damaged(run, path)
                continue
            try:
                keep = _csv_row(run, dict(zip(fields, cells, strict=True)), "gpu" in fields, keep)
            except (ValueError, KeyError, TypeError):
                _damaged(run, path)


def _csv_row(run: Run, row: dict[str, str], gpu: bool, keep: bool) -> bool:
    t = _time(row["timestamp"])
    if t is None:
        raise ValueError("no timestamp")
    if gpu:
        total, used = _num(row.get("memory_total_bytes")), _num(row.get("memory_used_bytes"))
        run.gpu(row["gpu"], row.get("name"), total).add(t, used)
    elif row["kind"] == "system":
        values = [_num(row[k]) for k in ("total_bytes", "memory_bytes", "swap_total_bytes", "swap_used_bytes")]
        keep = run.new_sample(t, row.get("phase"))
        if keep:
            run.system.capacity = values[0]
            run.system.add(t, values[1])
            run.swap.capacity = values[2] or None
            run.swap.add(t, values[3])
    elif row["kind"] != "group":
        raise ValueError(f"unknown row kind {row['kind']!r}")
    elif keep:
        memory, gpu_bytes = _num(row["memory_bytes"]), _num(row.get("gpu_memory_bytes")) or 0.0
        limit = float(row["limit_bytes"]) if row.get("limit_rule") else None
        series = run.group(row["name"])
        series.add(t, memory)
        if limit is not None:
            series.limits[row["limit_rule"]] = limit
        series.gpu_bytes = max(series.gpu_bytes, gpu_bytes)
    return keep


def read_logs(paths: Iterable[str | os.PathLike], run: Run | None = None, progress: bool | None = None) -> Run:
    files = expand(paths)
    run = run or Run()
    bar = Progress(sum(f.stat().st_size for f in files), "reading logs", progress)
    for f in files:
        run.sources.append(str(f))
        (read_csv if ".csv" in f.name else read_jsonl)(f, run, bar)
    bar.close()
    return run.finish()
