#!/usr/bin/env python3
"""Reaction between full samples, and what the lanes cost: three tables from one run.

    python bench/bench_reaction.py [--rates 200,500] [--phases 4] [--newborn-phases 8] [--procs 1000,10000]

(a) System threshold vs Debian's earlyoom on the same MemAvailable point. Before each trial the
    threshold is set THRESHOLD_GAP (2000 MiB) below MemAvailable (rounded to an exact 0.01 % of
    total, the unit earlyoom 1.7 turns -M into, so both fire at the very same point). A hog
    (tests/hog.py, one process in a session of its own, named `membenchhog`) then grows at RATE MiB/s.
    * mem-exporter: a real `mem-exporter enforce` (default interval 2 s) started for the trial, whose one
      rule `system_available_below: <bytes>` selects only this trial's hog by a unique --tag; the hog
      starts growing at phase 0, 1/4, 1/2, 3/4 of the interval after a full sample (seen on /metrics as
      `mem_exporter_last_sample_timestamp_seconds`).
    * earlyoom: started for the trial as the bench's child with `-M TERM,KILL` (KILL 256 MiB lower),
      `--prefer` naming the hog only (which also sets its oom_score_adj to 1000) and stopped by its pid
      the moment the hog dies; the hog starts at the same offsets after earlyoom's start.
    Measured by a 2 ms monitor thread reading /proc/meminfo: overshoot = threshold - lowest MemAvailable,
    and the time from the monitor's first reading below the threshold to the hog's death (wait4).
(b) Groups born between full samples: a hog started at phase k/N of the interval after a full sample,
    growing at 200 MB/s from its birth past a `max_rss: 300MB` rule that selects only the bench's hogs.
    Overshoot = peak RSS (ru_maxrss from wait4) above the limit, as a % of the limit.
(c) CPU of `mem-exporter enforce` (utime+stime from /proc/PID/stat over --cpu-seconds) with N background
    processes forked by one spawner in a process group of its own: without rules, with one group rule,
    and with one group rule plus one system rule (neither crossed).

Safety: only processes this bench started are signalled (its hogs, its spawner and the spawner's
children, its earlyoom and enforcer children), by pid or by the process group it created; the
enforcer's rules and earlyoom's preference select only the bench's hogs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from benchlib import EARLYOOM, MIB, Hog, cpu_seconds, free_port, start_earlyoom, stop_earlyoom

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 2.0  # the enforcer's default interval
THRESHOLD_GAP = 2000 * MIB
EARLYOOM_KILL_GAP = 256 * MIB  # earlyoom's SIGKILL level below its SIGTERM level
NEWBORN_LIMIT = 300_000_000  # 300 MB
NEWBORN_RATE = 200_000_000 / MIB  # 200 MB/s in the hog's MiB/s

SPAWNER = r"""
import gc, os, signal, sys
n = int(sys.argv[1])
gc.freeze()  # children share the parent's pages untouched
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
def stop(*_):
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
    for pid in kids:
        os.waitpid(pid, 0)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    signal.pause()
"""


# --- reading the machine ------------------------------------------------------------------------


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/meminfo")


def exact_point(target_bytes: float) -> int:
    """A MemAvailable point (bytes) that is an exact 0.01 % of total, just above `target_bytes`:
    earlyoom 1.7 keeps -M as a percentage of total, so both sides fire at the same byte."""
    total_kib = meminfo_kib("MemTotal")
    steps = int(target_bytes / 1024 * 10000 / total_kib) + 1
    return steps * total_kib // 10000 * 1024


class Monitor:
    """MemAvailable every 2 ms: the lowest value and the first reading below `threshold`."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.lowest: int | None = None
        self.crossed: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open("/proc/meminfo", "rb", buffering=0) as f:
            while not self._stop.is_set():
                f.seek(0)
                data = f.read(4096)
                i = data.index(b"MemAvailable:")
                avail = int(data[i + 13 : data.index(b"kB", i)]) * 1024
                if self.lowest is None or avail < self.lowest:
                    self.lowest = avail
                if self.crossed is None and avail < self.threshold:
                    self.crossed = time.monotonic()
                time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Enforcer:
    """`mem-exporter enforce` as the bench's child, with its own config and /metrics port."""

    def __init__(self, rules: list[dict], tmp: Path):
        self.port = free_port()
        cfg = tmp / f"enforce-{self.port}.yaml"
        cfg.write_text(
            json.dumps(
                {  # JSON is YAML
                    "listen": f"127.0.0.1:{self.port}",
                    "gpu": {"backend": "none"},
                    "enforcer": {"event_log": str(tmp / "events.jsonl"), "rules": rules},
                }
            )
        )
        env = {**os.environ, "MEM_EXPORTER_PHASE_FILE": str(tmp / "phase")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mem_exporter", "enforce", "--config", str(cfg)],
            cwd=ROOT,
            stdout=open(tmp / "enforcer.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while self.last_sample() is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"enforcer did not serve a sample (see {tmp / 'enforcer.log'})")
            time.sleep(0.1)

    def last_sample(self) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("mem_exporter_last_sample_timestamp_seconds "):
                        return float(line.split()[1]) or None
        except OSError:
            return None
        return None

    def next_full_sample(self) -> float:
        """Wall time of the next full sample, polled every 25 ms (its timestamp is exact)."""
        first = self.last_sample()
        while True:
            time.sleep(0.025)
            ts = self.last_sample()
            if ts is not None and ts != first:
                return ts

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)  # the enforcer's own session and group
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)


def sleep_until_wall(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


# --- (a) system threshold -----------------------------------------------------------------------


def system_trial(who: str, rate: float, phase: float, tmp: Path) -> dict:
    tag = "sys" + uuid.uuid4().hex[:10]
    hog = Hog(tag, rate, (THRESHOLD_GAP + 2500 * MIB) / MIB, tmp, on_signal=True)
    peer: Enforcer | subprocess.Popen | None = None
    monitor = None
    try:
        threshold = exact_point(meminfo_kib("MemAvailable") * 1024 - THRESHOLD_GAP)
        if who == "mem-exporter":
            peer = Enforcer(
                [{"name": "low-memory", "match": {"cmdline": f"--tag {tag}"}, "system_available_below": threshold}], tmp
            )
            sleep_until_wall(peer.next_full_sample() + phase * INTERVAL)
        else:
            peer = start_earlyoom(threshold // 1024, (threshold - EARLYOOM_KILL_GAP) // 1024)
            time.sleep(0.5 + phase * INTERVAL)
            if peer.poll() is not None:
                return {"error": f"earlyoom exited with {peer.returncode}"}
        monitor = Monitor(threshold)
        hog.go()
        if not hog.wait((THRESHOLD_GAP + 2500 * MIB) / MIB / rate + 20):
            log = (tmp / "enforcer.log").read_text().splitlines()[-5:] if who == "mem-exporter" else []
            return {"error": "not killed", "lowest_below_threshold_mib": (threshold - monitor.lowest) / MIB, "log": log}
        time.sleep(0.05)  # the lowest point is at the death; memory comes back after it
        monitor.stop()
        if monitor.crossed is None:
            return {"error": "killed before MemAvailable crossed the threshold (other load moved it)"}
        return {"overshoot_mib": (threshold - monitor.lowest) / MIB, "cross_to_death_s": hog.died - monitor.crossed}
    finally:
        if monitor is not None:
            monitor.stop()
        if isinstance(peer, Enforcer):
            peer.stop()
        else:
            stop_earlyoom(peer)
        hog.cleanup()


# --- (b) groups born between full samples -------------------------------------------------------


def newborn_trial(enf: Enforcer, tag: str, phase: float, tmp: Path) -> dict:
    ts = enf.next_full_sample()
    sleep_until_wall(ts + phase * INTERVAL)
    born = time.time()
    hog = Hog(tag, NEWBORN_RATE, 3 * NEWBORN_LIMIT / MIB, tmp, on_signal=False)
    try:
        if not hog.wait(3 * NEWBORN_LIMIT / MIB / NEWBORN_RATE + 10):
            return {"error": "not killed", "phase": (born - ts) / INTERVAL}
        return {
            "phase": (born - ts) / INTERVAL,
            "peak_mb": hog.peak / 1e6,
            "over_pct": 100 * (hog.peak - NEWBORN_LIMIT) / NEWBORN_LIMIT,
            "birth_to_death_s": hog.died - hog.born,
        }
    finally:
        hog.cleanup()


# --- (c) CPU ------------------------------------------------------------------------------------


def spawn_background(n: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, str(n)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the spawner of background processes failed")
    return proc


def stop_background(proc: subprocess.Popen) -> None:
    proc.terminate()  # the spawner kills and reaps its own children
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group the spawner and its children live in
        proc.wait(10)


def cpu_share(rules: list[dict], seconds: float, tmp: Path) -> float:
    enf = Enforcer(rules, tmp)
    try:
        enf.next_full_sample()
        enf.next_full_sample()  # settled: the background processes are known
        c0, t0 = cpu_seconds(enf.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_seconds(enf.pid) - c0) / (time.monotonic() - t0)
    finally:
        enf.stop()


# --- the tables ---------------------------------------------------------------------------------


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def top(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def system_trials(rates: list[float], phases: int, tmp: Path) -> dict:
    """(a): per (side, rate), the trials at phases k/N of the interval."""
    system: dict = {}
    for rate in rates:
        for k in range(phases):
            for who in ("mem-exporter", "earlyoom"):
                r = system_trial(who, rate, k / phases, tmp)
                system.setdefault((who, rate), []).append(r)
                print(f"(a) {who:12} {rate:4.0f} MiB/s phase {k}/{phases}: {r}", flush=True)
    return system


def print_system(system: dict, rates: list[float], phases: int, eo_version: str) -> None:
    """(a)'s table."""
    print(
        f"(a) system_available_below vs {eo_version}, same MemAvailable point ({THRESHOLD_GAP // MIB} MiB below "
        f"MemAvailable at the trial's start), {phases} phase-stratified trials per cell; median (max)"
    )
    print()
    print(
        "| rate MiB/s | mem-exporter overshoot MiB | earlyoom overshoot MiB "
        "| ratio of medians (target <= 1, aim 0.5) "
        "| mem-exporter crossing->death s | earlyoom crossing->death s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        ours, theirs = system.get(("mem-exporter", rate), []), system.get(("earlyoom", rate), [])
        o_med, t_med = med([x.get("overshoot_mib") for x in ours]), med([x.get("overshoot_mib") for x in theirs])
        ratio = max(o_med, 0) / t_med if o_med is not None and t_med and t_med > 0 else None
        errors = sum("error" in x for x in ours + theirs)
        print(
            f"| {rate:.0f} | {fmt(o_med)} ({fmt(top([x.get('overshoot_mib') for x in ours]))}) "
            f"| {fmt(t_med)} ({fmt(top([x.get('overshoot_mib') for x in theirs]))}) | {fmt(ratio, '.2f')} "
            f"| {fmt(med([x.get('cross_to_death_s') for x in ours]), '.3f')} "
            f"({fmt(top([x.get('cross_to_death_s') for x in ours]), '.3f')}) "
            f"| {fmt(med([x.get('cross_to_death_s') for x in theirs]), '.3f')} "
            f"({fmt(top([x.get('cross_to_death_s') for x in theirs]), '.3f')}) |"
            + (f" {errors} trial(s) failed" if errors else "")
        )
    print()


def print_newborn(newborn: list[dict], phases: int) -> None:
    """(b)'s table and its verdict."""
    print(
        f"(b) groups born at phase k/{phases} of the 2 s interval after a full sample, growing at "
        f"200 MB/s past max_rss 300 MB (target: every trial within 10 %)"
    )
    print()
    print("| born at (share of the interval) | peak MB | over the limit | birth->death s |")
    print("| ---: | ---: | ---: | ---: |")
    for r in newborn:
        print(
            f"| {fmt(r.get('phase'), '.2f')} | {fmt(r.get('peak_mb'))} | {fmt(r.get('over_pct'), '.1f')} % "
            f"| {fmt(r.get('birth_to_death_s'), '.2f')} |" + (f" {r['error']}" if "error" in r else "")
        )
    worst = top([r.get("over_pct") for r in newborn])
    ok = worst is not None and worst <= 10 and all("error" not in r for r in newborn)
    print(f"\nworst {fmt(worst, '.1f')} % over (target <= 10 %: {'yes' if ok else 'no'})")
    print()


def print_cpu(cpu: dict, seconds: float) -> None:
    """(c)'s table."""
    print(
        f"(c) CPU of `mem-exporter enforce` (interval 2 s) over {seconds:.0f} s, % of one core "
        f"(target < 2 % at 1000 with the default config)"
    )
    print()
    names = list(dict.fromkeys(name for _, name in cpu))
    counts = list(dict.fromkeys(n for n, _ in cpu))
    print("| config | " + " | ".join(f"+{n} processes" for n in counts) + " |")
    print("| --- | " + " | ".join("---:" for _ in counts) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{cpu[(n, name)] * 100:.2f} %" for n in counts) + " |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="200,500", help="MiB/s for (a), comma separated")
    ap.add_argument(
        "--phases", type=int, default=4, help="(a): trials per rate and side, at phases k/N of the interval"
    )
    ap.add_argument("--newborn-phases", type=int, default=8, help="(b): trials at phases k/N of the interval")
    ap.add_argument("--procs", default="1000,10000", help="(c): background processes, comma separated")
    ap.add_argument("--cpu-seconds", type=float, default=20)
    ap.add_argument("--skip", default="", help="parts to skip, e.g. 'c' or 'a,b'")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    rates = [float(r) for r in a.rates.split(",")]
    began = time.monotonic()
    system: dict = {}
    newborn: list[dict] = []
    cpu: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-reaction-") as d:
        tmp = Path(d)
        if "a" not in skip:
            system = system_trials(rates, a.phases, tmp)
        if "b" not in skip:
            tag = "new" + uuid.uuid4().hex[:10]
            enf = Enforcer([{"name": "newborn", "match": {"cmdline": f"--tag {tag}"}, "max_rss": NEWBORN_LIMIT}], tmp)
            try:
                for k in range(a.newborn_phases):
                    r = newborn_trial(enf, tag, k / a.newborn_phases, tmp)
                    newborn.append(r)
                    print(f"(b) phase {k}/{a.newborn_phases}: {r}", flush=True)
            finally:
                enf.stop()
        if "c" not in skip:
            configs = {
                "no rules": [],
                "one group rule": [{"name": "g", "match": {"cmdline": "--tag nosuchtag"}, "max_rss": "1GB"}],
                "one group rule + one system rule": [
                    {"name": "g", "match": {"cmdline": "--tag nosuchtag"}, "max_rss": "1GB"},
                    {"name": "s", "match": {"cmdline": "--tag nosuchtag"}, "system_available_below": "5%"},
                ],
            }
            for n in [int(x) for x in a.procs.split(",")]:
                spawner = spawn_background(n)
                try:
                    for name, rules in configs.items():
                        cpu[(n, name)] = cpu_share(rules, a.cpu_seconds, tmp)
                        print(f"(c) {n} processes, {name}: {cpu[(n, name)] * 100:.2f} % of one core", flush=True)
                finally:
                    stop_background(spawner)

    eo = subprocess.run([EARLYOOM, "-v"], capture_output=True, text=True)
    eo_version = (eo.stdout + eo.stderr).strip()
    print()
    if system:
        print_system(system, rates, a.phases, eo_version)
    if newborn:
        print_newborn(newborn, a.newborn_phases)
    if cpu:
        print_cpu(cpu, a.cpu_seconds)
    print(f"bench took {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
