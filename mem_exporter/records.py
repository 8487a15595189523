"""Every log line this project writes: its shape, its JSON, and the JSON Schema of all of them.

Shapes: the session header (the first line of a session log, of each rotated file, and of a `run` log),
the sample of a session and of a `run`, the enforcer's event, the `run`'s exit. `LINE_SCHEMA` is the JSON
Schema of all of them; docs/report.md and docs/run.md describe them for people. The file they go to is
written by `logfile.LogFile`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .sample import GroupSample, ProcessInfo, Sample, SystemMemory
from .units import iso_utc

if TYPE_CHECKING:
    from .enforcer.policy import Action

SCHEMA = 1  # the version in every session header
MB = 1000**2  # the run command's MB: powers of 1000, like every size in this project
TOP_MEMBERS = 20  # processes listed per `run` sample line, largest first (the count covers all)
QUIET_ACTIONS = ("skipped_protected", "skipped_other_user", "no_victim")  # no kill: logged at INFO, not notified


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
        "started": iso_utc(started),
        "t": round(started, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **info,
    }


def exit_record(now: float, started: float, cause: str, exit_status: int, **info: Any) -> dict[str, Any]:
    """The last line of a `run` log: why it ended, with what status, after how long."""
    return {
        "type": "exit",
        "timestamp": iso_utc(now),
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
        "timestamp": iso_utc(timestamp),
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


def make_event(action: Action, timestamp: float, top: int = 5, memtype: str = "rss", **extra: Any) -> dict[str, Any]:
    """The enforcer's event for a policy Action; `extra` (outcome, signals, time_to_death_seconds...) is merged in."""
    g = action.group
    ev: dict[str, Any] = {
        "timestamp": iso_utc(timestamp),
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
_MEMTYPE = {"enum": ["rss", "pss", "footprint", "private"]}  # which memory a log's byte counts are
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
            "memtype": _MEMTYPE,
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
            "memtype": _MEMTYPE,
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
