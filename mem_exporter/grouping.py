"""From processes to groups: named groups first (first match wins), then PGID, cgroup or container."""

from __future__ import annotations

import dataclasses
import sys

try:
    import pwd
except ImportError:  # Windows: no user database by uid (the psutil source gives uid -1 there)
    pwd = None  # type: ignore[assignment]
from collections.abc import Iterable, Sequence
from functools import lru_cache

from .config import Groups
from .containers import parse_container
from .sample import GpuCard, GroupSample, ProcessInfo

OTHER = "other"


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    if pwd is None or sys.platform == "win32":
        return str(uid)
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def group_key(proc: ProcessInfo, cfg: Groups) -> tuple[str, str]:
    """(key, kind) of the group a process belongs to."""
    for named in cfg.named:
        if named.match.matches(proc.comm, proc.cmdline, proc.exe, user_name(proc.uid)):
            return f"named:{named.name}", "named"
    if cfg.by == "cgroup" and proc.cgroup is not None:
        return f"cgroup:{proc.cgroup}", "cgroup"
    if cfg.by == "container" and (owner := parse_container(proc.cgroup)) is not None:
        return f"{owner.kind}:{owner.label}", owner.kind  # the key holds the label: both are one per owner
    return f"pgid:{proc.pgid}", "pgid"


def _sum_optional(values: Iterable[int | None]) -> int | None:
    total, seen = 0, False
    for v in values:
        if v is not None:
            total += v
            seen = True
    return total if seen else None


def sum_os_memory(parts: Sequence[ProcessInfo] | Sequence[GroupSample], memtype: str) -> int | None:
    """macOS footprint or Windows private commit summed over processes (or groups): a part whose number
    could not be read (another user's process) counts with its RSS; None where no part has the number
    (another OS), so the group's own fallback to RSS applies."""
    field, total, seen = f"{memtype}_bytes", 0, False
    for part in parts:
        value = getattr(part, field)
        if value is None:
            value = part.rss_bytes
        else:
            seen = True
        total += value
    return total if seen else None


def make_group(
    key: str,
    kind: str,
    members: list[ProcessInfo],
    memtype: str = "rss",
    gpu_memory: dict[int, int] | None = None,
    gtt_memory: dict[int, int] | None = None,
) -> GroupSample:
    members.sort(
        key=lambda p: p.pss_bytes if memtype == "pss" and p.pss_bytes is not None else p.rss_bytes, reverse=True
    )
    pgid = None
    if kind == "pgid":
        pgid = int(key[5:])
        leader = next((p for p in members if p.pid == pgid), None) or min(members, key=lambda p: p.pid)
        label = f"{leader.comm}-{pgid}"
    elif kind in ("named", "container", "unit"):
        label = key.partition(":")[2]
    else:
        label = key[7:] or "/"
    return GroupSample(
        key=key,
        label=label,
        kind=kind,
        rss_bytes=sum(p.rss_bytes for p in members),
        processes=len(members),
        members=tuple(members),
        pss_bytes=_sum_optional(p.pss_bytes for p in members),
        swap_bytes=_sum_optional(p.swap_bytes for p in members),
        pgid=pgid,
        footprint_bytes=sum_os_memory(members, "footprint"),
        private_bytes=sum_os_memory(members, "private"),
        gpu_memory_bytes=gpu_memory or {},
        gpu_gtt_memory_bytes=gtt_memory or {},
    )


def group_processes(
    procs: Sequence[ProcessInfo], cfg: Groups, memtype: str = "rss", gpus: Sequence[GpuCard] = ()
) -> tuple[GroupSample, ...]:
    """Every group, largest first by `memtype`."""
    buckets: dict[str, tuple[str, list[ProcessInfo]]] = {}
    key_of_pid: dict[int, str] = {}
    for p in procs:
        key, kind = group_key(p, cfg)
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = bucket = (kind, [])
        bucket[1].append(p)
        key_of_pid[p.pid] = key
    gpu_by_key, gtt_by_key = _gpu_by_key(key_of_pid, gpus)
    groups = [
        make_group(key, kind, members, memtype, gpu_by_key.get(key), gtt_by_key.get(key))
        for key, (kind, members) in buckets.items()
    ]
    groups.sort(key=lambda g: g.memory_bytes(memtype), reverse=True)
    return tuple(groups)


def _gpu_by_key(
    key_of_pid: dict[int, str], gpus: Iterable[GpuCard]
) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
    """GPU memory and GTT per group key and card, from the cards' processes."""
    gpu_by_key: dict[str, dict[int, int]] = {}
    gtt_by_key: dict[str, dict[int, int]] = {}
    for card in gpus:
        for gp in card.processes:
            owner = key_of_pid.get(gp.pid)
            if owner is not None and gp.gpu_memory_bytes is not None:
                per_card = gpu_by_key.setdefault(owner, {})
                per_card[card.index] = per_card.get(card.index, 0) + gp.gpu_memory_bytes
            if owner is not None and gp.gtt_memory_bytes is not None:
                per_card = gtt_by_key.setdefault(owner, {})
                per_card[card.index] = per_card.get(card.index, 0) + gp.gtt_memory_bytes
    return gpu_by_key, gtt_by_key


def attach_gpu(groups: list[GroupSample], key_of_pid: dict[int, str], gpus: Iterable[GpuCard]) -> list[GroupSample]:
    """The groups with the GPU memory of their processes (for groups made without group_processes)."""
    gpu_by_key, gtt_by_key = _gpu_by_key(key_of_pid, gpus)
    if not gpu_by_key and not gtt_by_key:
        return groups
    return [
        dataclasses.replace(
            g, gpu_memory_bytes=gpu_by_key.get(g.key, {}), gpu_gtt_memory_bytes=gtt_by_key.get(g.key, {})
        )
        for g in groups
    ]


def cap_groups(
    groups: Sequence[GroupSample], max_groups: int, min_memory: int, memtype: str = "rss"
) -> list[GroupSample]:
    """The groups that get their own series; the rest summed into one `other` group.

    Named groups are always kept (the config asked for them by name). Groups using
    the most GPU memory are kept too, so a VRAM hog never hides in `other`.
    """
    keep: list[GroupSample] = []
    rest: list[GroupSample] = []
    by_gpu = sorted((g for g in groups if g.gpu_memory_bytes), key=lambda g: g.gpu_memory_total_bytes, reverse=True)
    gpu_ranked = {g.key for g in by_gpu[:max_groups]}
    for g in groups:  # already largest first
        if (
            g.kind == "named"
            or g.key in gpu_ranked
            or (len(keep) < max_groups and g.memory_bytes(memtype) >= min_memory)
        ):
            keep.append(g)
        else:
            rest.append(g)
    if rest:
        gpu: dict[int, int] = {}
        gtt: dict[int, int] = {}
        for g in rest:
            for idx, b in g.gpu_memory_bytes.items():
                gpu[idx] = gpu.get(idx, 0) + b
            for idx, b in g.gpu_gtt_memory_bytes.items():
                gtt[idx] = gtt.get(idx, 0) + b
        keep.append(
            GroupSample(
                key=OTHER,
                label=OTHER,
                kind=OTHER,
                rss_bytes=sum(g.rss_bytes for g in rest),
                processes=sum(g.processes for g in rest),
                members=(),
                pss_bytes=_sum_optional(g.pss_bytes for g in rest),
                swap_bytes=_sum_optional(g.swap_bytes for g in rest),
                gpu_memory_bytes=gpu,
                footprint_bytes=sum_os_memory(rest, "footprint"),
                private_bytes=sum_os_memory(rest, "private"),
                gpu_gtt_memory_bytes=gtt,
            )
        )
    return keep


def descendants(procs: Iterable[ProcessInfo], roots: Iterable[int]) -> list[ProcessInfo]:
    """Every process whose ppid chain reaches one of the root pids (the roots themselves excluded):
    the one descendant walk, for the enforcer's targets and for `run`'s tree."""
    children: dict[int, list[ProcessInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    seen = set(roots)
    stack, out = list(seen), []
    while stack:
        for c in children.get(stack.pop(), ()):
            if c.pid not in seen:
                seen.add(c.pid)
                stack.append(c.pid)
                out.append(c)
    return out
