#!/usr/bin/env python3
"""What one `policy.decide()` costs, for this tree and (with --baseline DIR) another, in one run.

    python bench/bench_decide.py [--groups 1000] [--rounds 3] [--baseline /tmp/old-tree]

A synthetic sample of --groups process groups (three processes each, none over any limit) and a GPU
card, judged by one rule of each condition (all of them selecting every group), as a full sample and
as the fast lane's partial sample of one group. Pure computation: nothing is read or signalled.
Each tree is timed in a Python of its own (its own imports), the trees taking turns --rounds times;
the figures are the best of all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, timeit
from mem_exporter.config import validate_config
from mem_exporter.enforcer.policy import Context, PolicyState, decide
from mem_exporter.grouping import make_group
from mem_exporter.sample import GpuCard, ProcessInfo, Sample, SystemMemory

groups_n = int(sys.argv[1])
MB = 1 << 20


def proc(pid, pgid):
    return ProcessInfo(pid=pid, ppid=1, pgid=pgid, sid=pgid, uid=1000, comm="python3", cmdline=f"python3 job{pgid}.py",
                       start_time=pid, state="S", rss_bytes=10 * MB, exe="/usr/bin/python3")


groups = [make_group(f"pgid:{g}", "pgid", [proc(g * 4 + i, g) for i in range(3)], "rss", {0: MB})
          for g in range(1, groups_n + 1)]
card = GpuCard(index=0, uuid="GPU-0", name="bench", driver_version="0", memory_total_bytes=80 << 30,
               memory_used_bytes=1 << 30)


def sample(gs):
    return Sample(timestamp=1.7e9, monotonic=100.0, duration_seconds=0.01,
                  system=SystemMemory(16 << 30, 8 << 30, 8 << 30, 0, 0), cpu_usage_ratio=None,
                  process_count=3 * len(gs), groups=tuple(gs), processes=tuple(p for g in gs for p in g.members),
                  gpus=(card,))
full, partial = sample(groups), sample(groups[:1])
every = {"all": True}
rules = validate_config({"memory": "pss", "enforcer": {"rules": [
    {"name": "rss", "match": every, "max_rss": "1GB"},
    {"name": "pss", "match": every, "max_pss": "1GB"},
    {"name": "gpu", "match": every, "max_gpu_memory": "1GB"},
    {"name": "card", "match": every, "gpu_memory_above": "90%"},
    {"name": "system", "match": every, "system_available_below": "5%"},
    {"name": "psi", "match": every, "memory_pressure_above": "50%"},
    {"name": "level", "match": every, "system_pressure_level": "critical"},
]}}).enforcer.rules
ctx, state = Context(uid=1000, pid=1, pgid=1), PolicyState()
out = {}
for name, s, is_full in (("full", full, True), ("partial", partial, False)):
    assert decide(s, rules, state, ctx, full=is_full) == []
    timer = timeit.Timer(lambda: decide(s, rules, state, ctx, full=is_full))
    n, _ = timer.autorange()  # calls that take at least 0.2 s
    out[name] = min(timer.repeat(5, n)) / n * 1e6
print(json.dumps(out))
"""


def measure(tree: Path, groups: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(groups)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another tree (e.g. `git archive main | tar -x -C DIR`)")
    args = ap.parse_args()
    started = time.monotonic()
    trees = [("this tree", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):  # the trees take turns, so a busy spell on the host weighs on both
        for name, tree in trees:
            got = measure(tree, args.groups)
            results[name] = {k: min(v, results.get(name, got)[k]) for k, v in got.items()}
    print(f"decide() with one rule of each condition, {args.groups} groups (µs per call, best of 5 × {args.rounds})")
    for case in ("full", "partial"):
        cells = "  ".join(f"{name}: {r[case]:10.1f}" for name, r in results.items())
        ratio = ""
        if "baseline" in results:
            ratio = f"  this/baseline: {results['this tree'][case] / results['baseline'][case]:.3f}"
        print(f"  {case:8s} {cells}{ratio}")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
