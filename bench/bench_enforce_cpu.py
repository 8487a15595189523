#!/usr/bin/env python3
"""What `enforce` costs on a busy host: its CPU share over a window at the default 2 s interval with
--procs idle processes (bench/spawner.c: --groups sessions), beside earlyoom, in one run.

    python bench/bench_enforce_cpu.py [--procs 10000] [--groups 100] [--seconds 40]

Configurations, each before (today's path forced: `walk_interval: 0`, `process_events: off`, every
process read every interval) and after (the defaults: every process read each `walk_interval`, or to
choose a victim; process events for newcomers):
 * no config (no rule at all);
 * one system rule (`system_available_below: 1%`, matching only this bench's tag: it never fires);
 * one group rule (`max_rss: 1GB`, matching only this bench's tag: no background process is selected).
earlyoom (Debian's, --dryrun, thresholds it never reaches) runs through every window; its share is
measured over the same windows. Each enforcer is started after the background processes, given 5 s
to settle (its first walk), then measured. Only processes this bench started are signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import EARLYOOM, cpu_seconds, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
WALK_INTERVAL = 300.0  # enforcer.walk_interval's default


def spawner(build: Path, procs: int, groups: int) -> subprocess.Popen:
    exe = build / "spawner"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).with_name("spawner.c"))], check=True)
    p = subprocess.Popen(
        [str(exe), str(groups), str(max(1, procs // groups))],  # no tag: the rules must select none of them
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in p.stdout:
        if line.strip() == "up":
            return p
    raise RuntimeError("the spawner did not start its processes")


def start_enforcer(tmp: Path, name: str, rules: list, before: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    enforcer: dict = {"event_log": str(tmp / f"{name}.jsonl"), "rules": rules, "dry_run": True}
    if before:
        enforcer |= {"walk_interval": 0, "process_events": "off"}
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"listen": f"127.0.0.1:{port}", "gpu": {"backend": "none"}, "enforcer": enforcer}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mem_exporter", "enforce", "--config", str(cfg)],
        cwd=ROOT,
        stdout=open(tmp / f"{name}.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    return proc, port


def walk_seconds() -> float:
    """CPU time of one walk of every process as `enforce` does it between windows: statics cached from an
    earlier walk, descriptors released after each (the windows are shorter than walk_interval, so none fell
    inside them; this is what each walk adds)."""
    sys.path.insert(0, str(ROOT))
    from mem_exporter.config import validate_config
    from mem_exporter.sampler import Sampler

    s = Sampler(validate_config({"gpu": {"backend": "none"}, "source": "procfs"}))
    s.tick()
    s.release_descriptors()
    t0 = time.process_time()
    s.tick()
    spent = time.process_time() - t0
    s.release_descriptors()
    return spent


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=10000)
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=40)
    a = ap.parse_args()
    tag = "cpubench" + uuid.uuid4().hex[:10]
    configs = {
        "no config": [],
        "one system rule": [{"name": "low", "system_available_below": "1%", "match": {"cmdline": tag}}],
        "one group rule": [{"name": "cap", "max_rss": "1GB", "match": {"cmdline": tag}}],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-enforce-cpu-") as d:
        tmp = Path(d)
        bg = spawner(tmp, a.procs, a.groups)
        eo = None
        try:
            total = len([n for n in os.listdir("/proc") if n.isdigit()])
            if os.path.exists(EARLYOOM):  # never fires: 1 % RAM, swap condition never met
                eo = subprocess.Popen(
                    [EARLYOOM, "--dryrun", "-m", "1,1", "-s", "1,1", "-r", "0"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            for name, rules in configs.items():
                for before in (True, False):
                    label = f"{name} ({'before' if before else 'after'})"
                    enf, _ = start_enforcer(tmp, f"{len(rows)}", rules, before)
                    try:
                        time.sleep(5)
                        e0 = cpu_seconds(eo.pid) if eo else 0.0
                        c0, t0 = cpu_seconds(enf.pid), time.monotonic()
                        time.sleep(a.seconds)
                        c1, t1 = cpu_seconds(enf.pid), time.monotonic()
                        e1 = cpu_seconds(eo.pid) if eo else 0.0
                        rows.append((label, (c1 - c0) / (t1 - t0), (e1 - e0) / (t1 - t0), rss_mib(enf.pid)))
                        print(f"{label}: {rows[-1][1] * 100:.2f} % of a core", flush=True)
                    finally:
                        os.killpg(enf.pid, signal.SIGTERM)
                        enf.wait(30)
            walk_cpu = walk_seconds()  # while the background processes are still there
            eo_total = None
            if eo is not None:
                eo_total = sum(r[2] for r in rows) / len(rows)
        finally:
            if eo is not None:
                eo.terminate()
                eo.wait(10)
            bg.kill()  # the spawner's children die with it (PR_SET_PDEATHSIG)
            bg.wait(10)
    print()
    print(f"{total} processes on the host ({a.procs} idle in {a.groups} sessions), interval 2s, {a.seconds:.0f} s each")
    print()
    print("| enforce | CPU share of one core | RSS MiB | earlyoom in the same window |")
    print("| --- | ---: | ---: | ---: |")
    for label, share, eo_share, rss in rows:
        print(f"| {label} | {share * 100:.2f} % | {rss:.1f} | {eo_share * 100:.3f} % |")
    period = WALK_INTERVAL
    print(
        f"\na walk of every process (descriptors released, as `enforce` walks): {walk_cpu * 1000:.0f} ms of CPU, "
        f"every walk_interval ({period:.0f} s): {walk_cpu / period * 100:.2f} % of a core to add to each 'after'"
    )
    for label, share, _, _ in rows:
        if label.endswith("(after)"):
            print(f"  {label}, walks included: {(share + walk_cpu / period) * 100:.2f} %")
    if eo_total is not None:  # its CPU time moves in 10 ms ticks: over all windows it is measurable
        print(f"\nearlyoom over all {len(rows)} windows: {eo_total * 100:.3f} % of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
