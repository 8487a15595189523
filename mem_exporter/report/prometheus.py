"""Reading a run straight from Prometheus (/api/v1/query_range), for a lab run without log files."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Callable
from itertools import pairwise
from typing import Any

from .model import Run
from .progress import Progress

MAX_POINTS = 2000  # per series; Prometheus refuses more than 11000


def query_range(base: str, query: str, start: float, end: float, step: float, timeout: float = 30.0) -> list[dict]:
    params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    with urllib.request.urlopen(f"{base.rstrip('/')}/api/v1/query_range?{params}", timeout=timeout) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise ValueError(f"Prometheus: {body.get('error') or body}")
    return body["data"]["result"]


def _selector(name: str, selector: str, extra: str = "") -> str:
    inside = ",".join(x for x in (selector.strip().strip("{}"), extra) if x)
    return f"{name}{{{inside}}}"


def _points(series: dict) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series["values"] if not math.isnan(float(v))]


def read_prometheus(
    base: str,
    start: float,
    end: float,
    step: float | None = None,
    selector: str = "",
    memtype: str = "rss",
    run: Run | None = None,
    progress: bool | None = None,
) -> Run:
    """Samples at each `step` between start and end, built from the exporter's own series."""
    run = run or Run()
    run.memtype = memtype
    step = step or max(1.0, math.ceil((end - start) / MAX_POINTS))
    run.sources.append(f"{base} ({_selector('mem_exporter_*', selector)}, step {step:g}s)")
    P = "mem_exporter_"
    queries = {
        "total": _selector(P + "system_memory_total_bytes", selector),
        "available": _selector(P + "system_memory_available_bytes", selector),
        "swap_total": _selector(P + "system_swap_total_bytes", selector),
        "swap_used": _selector(P + "system_swap_used_bytes", selector),
        "phase": _selector(P + "phase_info", selector),
        "groups": _selector(P + "group_memory_bytes", selector, f'memtype="{memtype}"'),
        "group_gpu": f"sum by (group) ({_selector(P + 'group_gpu_memory_bytes', selector)})",
        "gpu_total": _selector(P + "gpu_memory_total_bytes", selector),
        "gpu_used": _selector(P + "gpu_memory_used_bytes", selector),
        "gpu_info": _selector(P + "gpu_info", selector),
        "limits": _selector(P + "enforcer_limit_bytes", selector),
        "kills": _selector(P + "enforcer_kills_total", selector),
    }
    bar = Progress(len(queries), "querying Prometheus", progress)
    data: dict[str, list[dict]] = {}
    for key, q in queries.items():
        data[key] = query_range(base, q, start, end, step)
        bar.update(1)
    bar.close()
    instances = {s["metric"].get("instance") for s in data["total"]}

    def name(metric: dict, label: str) -> str:  # several exporters in one report: say which one
        value = metric.get(label, "")
        return f"{value}@{metric.get('instance')}" if len(instances) > 1 else value

    _add_system(run, data)
    _add_gpus(run, data, name)
    _add_groups(run, data, name)
    _add_kills(run, data)
    return run.finish()


def _add_system(run: Run, data: dict[str, list[dict]]) -> None:
    """The samples, their phases, system RAM and swap."""
    # a sample is a time at which the exporter reported its system memory
    totals = {t: v for s in data["total"] for t, v in _points(s)}
    phases = {t: s["metric"].get("phase") for s in data["phase"] for t, _ in _points(s)}
    for t in sorted(totals):
        run.new_sample(t, phases.get(t))
    run.system.capacity = max(totals.values(), default=None)
    for s in data["available"]:
        for t, v in _points(s):
            run.system.add(t, totals.get(t, v) - v)
    for s in data["swap_total"]:
        run.swap.capacity = max((v for _, v in _points(s)), default=0) or None
    for s in data["swap_used"]:
        for t, v in _points(s):
            run.swap.add(t, v)


def _add_gpus(run: Run, data: dict[str, list[dict]], name: Callable[[dict, str], str]) -> None:
    """Each card: its size and its memory in use."""
    gpu_names = {name(s["metric"], "gpu"): s["metric"].get("name") for s in data["gpu_info"]}
    for s in data["gpu_total"]:
        idx = name(s["metric"], "gpu")
        run.gpu(idx, gpu_names.get(idx), max((v for _, v in _points(s)), default=None))
    for s in data["gpu_used"]:
        idx = name(s["metric"], "gpu")
        series = run.gpu(idx, gpu_names.get(idx), None)
        for t, v in _points(s):
            series.add(t, v)


def _add_groups(run: Run, data: dict[str, list[dict]], name: Callable[[dict, str], str]) -> None:
    """Each group: its memory, its GPU memory at the most, the enforcer's limits on it."""
    for s in data["groups"]:
        series = run.group(name(s["metric"], "group"))
        for t, v in _points(s):
            series.add(t, v)
    for s in data["group_gpu"]:
        series = run.group(name(s["metric"], "group"))
        series.gpu_bytes = max([series.gpu_bytes] + [v for _, v in _points(s)])
    for s in data["limits"]:
        points = _points(s)
        if points:
            run.group(name(s["metric"], "group")).limits[s["metric"].get("rule", "")] = points[-1][1]


def _add_kills(run: Run, data: dict[str, list[dict]]) -> None:
    """The enforcer's kills."""
    for s in data["kills"]:  # no event log here: a counter step is a kill, with the time and the rule
        points = _points(s)
        for (_, a), (t, b) in pairwise(points):
            if b > a:
                run.events.append(_kill(t, s["metric"].get("rule", ""), int(b - a)))


def _kill(t: float, rule: str, count: int) -> dict[str, Any]:
    return {"t": t, "action": "kill", "rule": rule, "group": None, "count": count, "source": "prometheus"}
