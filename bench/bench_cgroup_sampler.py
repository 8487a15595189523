#!/usr/bin/env python3
"""A sample with `groups.by: cgroup`: every process read and summed (today's path, `memory_from: processes`)
against the cgroups' own accounts (`memory_from: auto`), in one run.

    python bench/bench_cgroup_sampler.py [--cgroups 30] [--per-cgroup 100] [--rounds 20]

The bench makes --cgroups memory cgroups (cgroup v1, below the cgroup this process is in) with
--per-cgroup idle processes each (bench/spawner.c), then times Sampler.tick() of both kinds,
alternating, after one warm-up tick each (the first sight of every process). Every process on the
host is sampled, not only the bench's. Only processes this bench started are signalled; its
cgroups are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mem_exporter.config import validate_config  # noqa: E402
from mem_exporter.sampler import Sampler  # noqa: E402

V1 = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path:
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
    return V1 / line.split(":", 2)[2].lstrip("/")


def sampler(memory_from: str) -> Sampler:
    cfg = {"gpu": {"backend": "none"}, "source": "procfs", "groups": {"by": "cgroup", "memory_from": memory_from}}
    return Sampler(validate_config(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgroups", type=int, default=30)
    ap.add_argument("--per-cgroup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    parent = own_memory_cgroup() / f"me-bench-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    spawners: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cgroup-") as d:
            exe = Path(d) / "spawner"
            subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).with_name("spawner.c"))], check=True)
            for i in range(a.cgroups):
                cg = parent / f"g{i:02d}"
                cg.mkdir()
                # the spawner joins the cgroup before it forks; itself, a leader and per-2 children
                script = f"echo $$ > {cg}/cgroup.procs && exec {exe} 1 {a.per_cgroup - 1}"
                p = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
                spawners.append(p)
                for line in p.stdout:
                    if line.strip() == "up":
                        break
            mine = sum(len((parent / f"g{i:02d}" / "cgroup.procs").read_text().split()) for i in range(a.cgroups))
            walk, accounts = sampler("processes"), sampler("auto")
            assert accounts.cgroups is not None, "no cgroup memory accounts here"
            first = {"processes": walk.tick().duration_seconds, "accounts": accounts.tick().duration_seconds}
            times: dict[str, list[float]] = {"processes": [], "accounts": []}
            for _ in range(a.rounds):
                for name, s in (("processes", walk), ("accounts", accounts)):
                    t0 = time.perf_counter()
                    sample = s.tick()
                    times[name].append(time.perf_counter() - t0)
                    time.sleep(0.05)
            total = sample.process_count
            ours = [g for g in sample.groups if g.key.startswith(f"cgroup:/{parent.relative_to(V1)}/")]
            walked = {g.key: g for g in walk.tick().groups}
    finally:
        for p in spawners:
            p.kill()  # its leader and children die with it (PR_SET_PDEATHSIG)
            p.wait(10)
        for cg in sorted(parent.glob("g*")):
            deadline = time.monotonic() + 10
            while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            cg.rmdir()
        parent.rmdir()
    p_med, c_med = statistics.median(times["processes"]), statistics.median(times["accounts"])
    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"{total} processes on the host, {mine} of them in the bench's {a.cgroups} cgroups; {a.rounds} rounds; "
        f"load average {load} on {os.cpu_count()} CPUs"
    )
    print()
    print("| groups.by: cgroup | first tick ms | tick ms (median) | min | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, label in (("processes", "every process read and summed (today)"), ("accounts", "cgroup accounts")):
        ts = times[name]
        print(
            f"| {label} | {first[name] * 1000:.1f} | {statistics.median(ts) * 1000:.2f} | "
            f"{min(ts) * 1000:.2f} | {max(ts) * 1000:.2f} |"
        )
    print()
    print(f"accounts / today: {c_med / p_med:.2f} (target: a sample <= 5 ms: {'yes' if c_med <= 0.005 else 'no'})")
    if ours:
        g = ours[0]
        summed = walked.get(g.key)
        print(
            f"one bench cgroup: {g.processes} processes, accounts {g.rss_bytes / 2**20:.1f} MiB, "
            f"summed RSS {summed.rss_bytes / 2**20 if summed else float('nan'):.1f} MiB "
            "(shared pages once vs per process)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
