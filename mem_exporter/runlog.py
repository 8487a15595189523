"""The log of one `mem-exporter run`: JSON lines, one per reading of the tree, then events and the exit.

The file is opened (and its directory made) before the command starts, so an unwritable path is
an error the user sees at once. Lines go through a 64 KiB buffer written from the sampling loop
and flushed once per full sample: a slow disk costs a write now and then, never the command's time.
Record shapes are documented in docs/run.md.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from .sample import GroupSample, SystemMemory
from .units import iso_utc as iso

SCHEMA = 1
MB = 1000**2  # the run command's MB: powers of 1000, like every size in this project
TOP_MEMBERS = 20  # processes listed per sample line, largest first (the count covers all)



def mb(n: float) -> float:
    return round(n / MB, 1)


def runs_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_STATE_HOME/mem-exporter/runs, or ~/.local/state/mem-exporter/runs (a relative XDG path is ignored, per the spec)."""
    state = environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path(environ.get("HOME") or os.path.expanduser("~")) / ".local" / "state"
    return base / "mem-exporter" / "runs"


def log_name(command: str, started: float, pid: int) -> str:
    """`<cmd>-<YYYYmmdd-HHMMSS>-<pid>.jsonl`, local time; the wrapper's pid keeps runs in one second apart."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(command)).strip("-.") or "run"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{pid}.jsonl"


def resolve_path(requested: str | None, command: str, started: float, pid: int,
                 environ: Mapping[str, str] = os.environ) -> Path:
    """The log file: `requested`, or a fresh name inside it when it is a directory (existing, or written
    with a trailing slash), or the default."""
    if not requested:
        return runs_dir(environ) / log_name(command, started, pid)
    path = Path(requested).expanduser()
    return path / log_name(command, started, pid) if requested.endswith("/") or path.is_dir() else path


def member(p) -> dict[str, Any]:
    return {"pid": p.pid, "comm": p.comm, "command": p.cmdline[:300], "memory_bytes": p.rss_bytes,
            "memory_mb": mb(p.rss_bytes)}


def sample_record(tree: GroupSample, threshold: int, timestamp: float, system: SystemMemory | None,
                  fast: bool = False, phase: str | None = None) -> dict[str, Any]:
    """One reading of the tree. `groups` repeats the total in the session-log shape, so the report tooling reads it."""
    rec: dict[str, Any] = {
        "type": "sample",
        "timestamp": iso(timestamp),
        "t": round(timestamp, 3),
        "pgid": tree.pgid,
        "memory_bytes": tree.rss_bytes,
        "memory_mb": mb(tree.rss_bytes),
        "threshold_bytes": threshold,
        "threshold_mb": mb(threshold),
        "percent": round(100 * tree.rss_bytes / threshold, 1) if threshold else None,
        "processes": tree.processes,
        "members": [member(p) for p in tree.members[:TOP_MEMBERS]],
        "fast": fast,
        "phase": phase,
        "memtype": "rss",
        "groups": [{"group": tree.label, "key": tree.key, "kind": tree.kind, "pgid": tree.pgid,
                    "processes": tree.processes, "rss_bytes": tree.rss_bytes, "limits": {"run": threshold}}],
    }
    if system is not None and system.total_bytes:
        rec["system"] = {"total_bytes": system.total_bytes, "available_bytes": system.available_bytes,
                         "used_bytes": system.used_bytes}
    return rec


class RunLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)  # OSError goes to the caller, before the command starts
        self._f = open(path, "a", buffering=64 * 1024)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        except (OSError, ValueError):  # a full disk must not stop the watching (ValueError: closed)
            pass

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError:
            pass

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
