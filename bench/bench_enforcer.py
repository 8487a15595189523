#!/usr/bin/env python3
"""Reaction speed and cost of the enforcer, side by side with Debian's earlyoom, in one run.

    python bench/bench_enforcer.py [--rates 100,200,500] [--repeat 3] [--limit-mib 1024] [--procs 1000]

For each growth rate, a hog (tests/hog.py, one process in a session of its own, named
`membenchhog`) sits idle at ~10 MiB, then grows at RATE MiB/s towards a 1 GiB limit.
 * enforcer: `mem-exporter enforce` at default settings (interval 2s, grace 5s, hard ceiling
   10 %), started once; its one rule selects only this bench's hogs by a unique --tag.
 * earlyoom: started for each trial as a child of the bench, with -M set so that it fires
   when the hog reaches the limit given the memory available just before the growth starts
   (SIGKILL level 10 % further, like the hard ceiling); --prefer names only the hog and the
   hog sets its oom_score_adj to 1000, so the hog is always earlyoom's choice; earlyoom is
   stopped the moment the hog dies. (earlyoom watches MemAvailable, so other load on the
   machine moves its trigger point; the enforcer watches the group's own RSS.)
Measured: overshoot = the hog's peak RSS (ru_maxrss from wait4) above the limit, and the time
from crossing the limit (RSS polled every 5 ms) to death (wait4 returns).
Then one SIGTERM-ignoring hog at 200 MiB/s for the enforcer (what the hard ceiling bounds),
and the enforcer's CPU use at the default interval with --procs sleeping processes.

Safety: only processes this bench started are signalled (its hogs, its sleeps, its earlyoom and
enforcer children), by pid; the enforcer's rule and earlyoom's preference select only the hogs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from benchlib import EARLYOOM, MIB, Hog, cpu_seconds, free_port, rss, start_earlyoom, stop_earlyoom

ROOT = Path(__file__).resolve().parents[1]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def mem_total_kib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1])


class Trial(Hog):
    """One hog, idle until go(): when it crosses the limit (RSS polled every 5 ms) and, in earlyoom trials, its RSS
    where earlyoom's trigger was met."""

    def __init__(self, tag: str, rate: float, limit: int, tmp: Path, ignore_term: bool = False):
        ignore = ["--ignore", "SIGTERM"] if ignore_term else []
        super().__init__(tag, rate, 4 * limit // MIB, tmp, on_signal=True, extra=ignore)
        self.limit = limit
        self.avail_below: int | None = None  # earlyoom trials: its trigger, in MemAvailable bytes
        self.rss_at_trigger: int | None = None
        self.crossed: float | None = None

    def go(self) -> float:
        went = super().go()
        threading.Thread(target=self._watch, daemon=True).start()
        return went

    def _watch(self) -> None:
        while not self._done.is_set() and (self.crossed is None or (self.avail_below and self.rss_at_trigger is None)):
            r = rss(self.pid)
            if r is not None and r >= self.limit and self.crossed is None:
                self.crossed = time.monotonic()
            if self.avail_below and self.rss_at_trigger is None and r is not None:
                avail = mem_available()
                if avail <= self.avail_below:  # where earlyoom's trigger was met: correct for the 5 ms poll
                    self.triggered, self.rss_at_trigger = time.monotonic(), r - (self.avail_below - avail)
            time.sleep(0.005)

    def result(self) -> dict:
        out = {
            "peak_mib": self.peak / MIB if self.peak else None,
            "overshoot_mib": (self.peak - self.limit) / MIB if self.peak else None,
            "cross_to_death_s": (self.died - self.crossed) if self.crossed and self.died else None,
        }
        if self.avail_below:  # earlyoom: measured from the point where its own trigger was met
            out["peak_vs_limit_mib"] = out["overshoot_mib"]
            out["rss_at_trigger_mib"] = self.rss_at_trigger / MIB if self.rss_at_trigger else None
            over = (self.peak - self.rss_at_trigger) / MIB if self.peak and self.rss_at_trigger else None
            out["overshoot_mib"] = over
            out["cross_to_death_s"] = (self.died - self.triggered) if self.rss_at_trigger and self.died else None
        return out


def run_enforcer_trial(tag, rate, limit, tmp, interval, ignore_term=False) -> dict:
    t = Trial(tag, rate, limit, tmp, ignore_term)
    try:
        time.sleep(interval + random.uniform(0, interval))  # the enforcer has seen it idle; random phase
        t.go()
        if not t.wait(limit / MIB / rate + 30):
            return {"error": "not killed within 30 s of the limit"}
        return t.result()
    finally:
        t.cleanup()


def run_earlyoom_trial(tag, rate, limit, tmp) -> dict:
    t = Trial(tag, rate, limit, tmp)
    eo = None
    try:
        time.sleep(0.3)
        avail, hog_rss = mem_available(), rss(t.pid) or 0
        total_kib = mem_total_kib()

        # earlyoom 1.7 turns -M into a percentage of total: pick a size that is an exact 0.01 %,
        # so its trigger point is known to the byte (and sits just below the limit, never above)
        def exact(target_bytes):
            return int(int(target_bytes / 1024 * 10000 / total_kib + 1) * total_kib / 10000)

        term_kib = exact(avail - (limit - hog_rss))
        kill_kib = exact(avail - (int(limit * 1.1) - hog_rss))
        eo = start_earlyoom(term_kib, kill_kib)
        t.avail_below = term_kib * 1024
        time.sleep(0.5)
        if eo.poll() is not None:
            return {"error": f"earlyoom exited with {eo.returncode}"}
        time.sleep(random.uniform(0, 1))
        t.go()
        ok = t.wait(limit / MIB / rate + 30)
        return t.result() if ok else {"error": "earlyoom did not kill within 30 s of the limit"}
    finally:
        stop_earlyoom(eo)
        t.cleanup()


def start_enforcer(tag: str, limit: int, tmp: Path, port: int) -> subprocess.Popen:
    cfg = tmp / "bench-enforcer.yaml"
    cfg.write_text(
        json.dumps(
            {  # JSON is YAML
                "listen": f"127.0.0.1:{port}",
                "gpu": {"backend": "none"},
                "enforcer": {
                    "event_log": str(tmp / "events.jsonl"),
                    "rules": [{"name": "bench", "match": {"cmdline": f"hog\\.py.*--tag {tag}"}, "max_rss": limit}],
                },
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mem_exporter", "enforce", "--config", str(cfg)],
        cwd=ROOT,
        stdout=open(tmp / "enforcer.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("enforcer did not become healthy")


def measure_cpu(enforcer_pid: int, port: int, procs: int, seconds: float) -> dict:
    sleeps = []
    try:
        for _ in range(procs):  # in the bench's own process group; killed by pid below
            sleeps.append(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL))
        time.sleep(5)  # two full samples see them all
        c0, t0 = cpu_seconds(enforcer_pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(enforcer_pid), time.monotonic()
        import urllib.request  # after the window: a scrape costs the daemon CPU too

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            walk = next(
                float(line.split()[1])
                for line in r.read().decode().splitlines()
                if line.startswith("mem_exporter_sample_duration_seconds ")
            )
        return {
            "procs": len(sleeps),
            "cpu_share": (c1 - c0) / (t1 - t0),
            "seconds": t1 - t0,
            "walk_seconds": walk,
            "walk_share": walk / 2.0,
        }
    finally:
        for s in sleeps:
            s.kill()
        for s in sleeps:
            s.wait()


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".0f"):
    return "n/a" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100,200,500", help="MiB/s, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit-mib", type=int, default=1024)
    ap.add_argument("--procs", type=int, default=1000)
    ap.add_argument("--cpu-seconds", type=float, default=20)
    ap.add_argument("--no-earlyoom", action="store_true")
    a = ap.parse_args()
    rates = [float(r) for r in a.rates.split(",")]
    limit = a.limit_mib * MIB
    tag = "bench" + uuid.uuid4().hex[:10]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-enforcer-") as d:
        tmp = Path(d)
        port = free_port()
        enf = start_enforcer(tag, limit, tmp, port)
        results: dict = {}
        try:
            for rate in rates:
                for i in range(a.repeat):
                    r = run_enforcer_trial(tag, rate, limit, tmp, 2.0)
                    results.setdefault(("enforcer", rate), []).append(r)
                    print(f"enforcer  {rate:5.0f} MiB/s  #{i + 1}: {r}", flush=True)
                    if not a.no_earlyoom and os.path.exists(EARLYOOM):
                        # a tag the enforcer's rule does not select
                        r = run_earlyoom_trial("eo" + tag, rate, limit, tmp)
                        results.setdefault(("earlyoom", rate), []).append(r)
                        print(f"earlyoom  {rate:5.0f} MiB/s  #{i + 1}: {r}", flush=True)
            ignore = run_enforcer_trial(tag, 200, limit, tmp, 2.0, ignore_term=True)
            print(f"enforcer  200 MiB/s ignoring SIGTERM: {ignore}", flush=True)
            cpu = measure_cpu(enf.pid, port, a.procs, a.cpu_seconds)
            print(f"enforcer CPU: {cpu}", flush=True)
        finally:
            os.killpg(enf.pid, signal.SIGTERM)
            enf.wait(30)
        event_log = tmp / "events.jsonl"
        events = [json.loads(x) for x in event_log.read_text().splitlines()] if event_log.exists() else []

    print()
    earlyoom = "absent"
    if os.path.exists(EARLYOOM):
        version = subprocess.run([EARLYOOM, "-v"], capture_output=True, text=True)
        earlyoom = (version.stdout + version.stderr).strip()
    print(
        f"limit {a.limit_mib} MiB, {a.repeat} trials per cell, medians; enforcer at default settings "
        f"(interval 2s, grace 5s, hard ceiling 10%); earlyoom {earlyoom}"
    )
    print()
    # Overshoot is the peak above the limit for both. earlyoom watches MemAvailable, which does not
    # fall one-for-one with the hog's RSS, so its trigger lands past the limit; its overshoot above
    # its own trigger point (its reaction lag alone) is shown too, as the stricter comparison.
    print(
        "| rate MiB/s | enforcer overshoot MiB | earlyoom overshoot MiB | ratio | target (<= 1/3) "
        "| earlyoom past its own trigger MiB | ratio to that "
        "| enforcer crossing->death s | earlyoom trigger->death s |"
    )
    print("| ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        e = results.get(("enforcer", rate), [])
        o = results.get(("earlyoom", rate), [])
        eo_ = med([x.get("overshoot_mib") for x in e])
        vs_limit, vs_trigger = med([x.get("peak_vs_limit_mib") for x in o]), med([x.get("overshoot_mib") for x in o])
        et, ot = med([x.get("cross_to_death_s") for x in e]), med([x.get("cross_to_death_s") for x in o])
        ratio = (max(eo_, 0) / vs_limit) if eo_ is not None and vs_limit else None
        strict = (max(eo_, 0) / vs_trigger) if eo_ is not None and vs_trigger else None
        ok = ratio is not None and ratio <= 1 / 3
        print(
            f"| {rate:.0f} | {fmt(eo_)} (max {fmt(max((x.get('overshoot_mib') or 0 for x in e), default=None))}) | "
            f"{fmt(vs_limit)} | {fmt(ratio, '.2f')} | {'yes' if ok else 'no'} | {fmt(vs_trigger)} | "
            f"{fmt(strict, '.2f')} | {fmt(et, '.2f')} | {fmt(ot, '.2f')} |"
        )
    print()
    print(
        f"SIGTERM-ignoring hog at 200 MiB/s (enforcer): peak {fmt(ignore.get('peak_mib'))} MiB = "
        f"limit + {fmt(ignore.get('overshoot_mib'))} MiB (hard ceiling at +{a.limit_mib * 0.1:.0f} MiB), "
        f"crossing->death {fmt(ignore.get('cross_to_death_s'), '.2f')} s"
    )
    print(
        f"enforcer CPU at interval 2s with {cpu['procs']} extra processes: "
        f"{cpu['cpu_share'] * 100:.2f} % of one core over {cpu['seconds']:.0f} s "
        f"(target < 2 %: {'yes' if cpu['cpu_share'] < 0.02 else 'no'}); of which the shared /proc walk "
        f"(last sample {cpu['walk_seconds'] * 1000:.0f} ms per 2 s) is about {cpu['walk_share'] * 100:.2f} %"
    )
    kills = [e for e in events if e["action"] in ("term", "kill")]
    ceilings = sum(1 for e in kills if e.get("hard_ceiling"))
    print(
        f"enforcer events: {len(kills)} kills, hard ceiling used in {ceilings}; "
        f"bench took {time.monotonic() - began:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
