#!/usr/bin/env python3
"""A scrape flood while the enforcer kills: does HTTP load delay sampling or a kill?

    python bench/bench_load.py [--scrapers 50] [--seconds 20] [--interval 1s] [--baseline]

Starts `mem-exporter serve` on 127.0.0.1 with the enforcer on and one rule that selects only
this run's hog (tests/hog.py, matched by a unique --tag) at --limit-mib, then SCRAPERS threads
scrape /metrics back to back over keep-alive connections (as Prometheus does) for SECONDS. A
third of the way in, the hog starts growing at --grow-mib MiB/s and crosses the limit.
Measured: scrape rate, latency and failures; the sample interval, from successive values of
mem_exporter_last_sample_timestamp_seconds; the time from the hog crossing its limit (its RSS
polled every 5 ms) to its death, and the enforcer's own time_to_death from its event log.
--baseline runs the same once more with a single scraper, for comparison.

Safety: only what this run started is signalled (the daemon's and the hog's process groups);
the rule selects only the hog; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from itertools import pairwise
from pathlib import Path

from benchlib import MIB, free_port, rss

ROOT = Path(__file__).resolve().parents[1]
HOG = ROOT / "tests" / "hog.py"
_TIMESTAMP = re.compile(rb"^mem_exporter_last_sample_timestamp_seconds (\S+)$", re.M)


def _killpg(proc: subprocess.Popen) -> None:
    """Stop a process group this run started (its leader is `proc`, started with a session of its own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class Scraper(threading.Thread):
    """Scrapes /metrics back to back on one keep-alive connection until `stop` is set."""

    def __init__(self, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}
        self.timestamps: set[float] = set()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            began = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    self.failures[str(r.status)] = self.failures.get(str(r.status), 0) + 1
                    continue
            except (OSError, http.client.HTTPException) as e:
                self.failures[type(e).__name__] = self.failures.get(type(e).__name__, 0) + 1
                conn = None
                time.sleep(0.05)
                continue
            self.latencies.append(time.perf_counter() - began)
            m = _TIMESTAMP.search(body)
            if m:
                self.timestamps.add(float(m.group(1)))
        if conn is not None:
            conn.close()


def flood(port: int, scrapers: int, seconds: float, out) -> None:
    """In a process of its own (so the measuring process keeps its GIL): SCRAPERS threads for SECONDS."""
    stop = threading.Event()
    threads = [Scraper(port, stop) for _ in range(scrapers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(15)
    failures: dict[str, int] = {}
    for t in threads:
        for k, v in t.failures.items():
            failures[k] = failures.get(k, 0) + v
    out.send(
        {
            "latencies": sorted(x for t in threads for x in t.latencies),
            "failures": failures,
            "timestamps": sorted({ts for t in threads for ts in t.timestamps}),
        }
    )
    out.close()


def run(
    workdir: Path,
    scrapers: int = 50,
    seconds: float = 20.0,
    interval: float = 1.0,
    limit_mib: int = 200,
    grow_mib: float = 100.0,
    grace: float = 1.0,
    log=print,
) -> dict:
    """One run: daemon, hog, flood; the numbers as a dict. Cleans up what it started."""
    tag = "load" + uuid.uuid4().hex[:12]
    events = workdir / f"events-{tag}.jsonl"
    cfg = workdir / f"load-{tag}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "interval": interval,
                "enforcer": {
                    "enabled": True,
                    "event_log": str(events),
                    "rules": [
                        {
                            "name": "load-hog",
                            "match": {"cmdline": rf"hog\.py.*--tag {tag}"},
                            "max_rss": f"{limit_mib}MiB",
                            "grace": grace,
                        }
                    ],
                },
            }
        )
    )
    port = free_port()
    daemon_log = open(workdir / f"daemon-{tag}.log", "w+")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mem_exporter",
            "serve",
            "--config",
            str(cfg),
            "--gpu-backend",
            "none",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ready = workdir / f"ready-{tag}"
    hog = subprocess.Popen(
        [
            sys.executable,
            str(HOG),
            "--mb",
            "10",
            "--grow",
            str(grow_mib),
            "--max-mb",
            "4000",
            "--grow-on-signal",
            "--tag",
            tag,
            "--ready",
            str(ready),
        ],
        start_new_session=True,
    )
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    scraping = None
    try:
        _wait(lambda: _healthy(port) or daemon.poll() is not None, 20)
        _wait(lambda: ready.exists() or hog.poll() is not None, 20)
        if daemon.poll() is not None or hog.poll() is not None:
            daemon_log.seek(0)
            raise RuntimeError(f"daemon or hog exited early: {daemon_log.read()[-2000:]}")
        began = time.monotonic()
        scraping = ctx.Process(target=flood, args=(port, scrapers, seconds, send), daemon=True)
        scraping.start()
        time.sleep(seconds / 3)
        grow_at = time.monotonic()
        hog.send_signal(signal.SIGUSR1)  # our own child; the rule selects nothing else
        crossed_at = died_at = below_at = None
        while died_at is None and time.monotonic() < began + seconds:
            value = rss(hog.pid)
            if value is None or hog.poll() is not None:
                died_at = time.monotonic()
            elif crossed_at is None and value > limit_mib * MIB:
                crossed_at = time.monotonic()
            elif crossed_at is None:
                below_at = time.monotonic()
            time.sleep(0.005)
        if died_at and crossed_at is None:  # killed between two readings: the crossing was after the last one below
            crossed_at = below_at
        if not receive.poll(seconds + 30):
            raise RuntimeError("the scrapers did not report")
        flooded = receive.recv()
        duration = time.monotonic() - began
        stamps, latencies = flooded["timestamps"], flooded["latencies"]
        gaps = [b - a for a, b in pairwise(stamps)]
        event = _kill_event(events, hog.pid)
        return {
            "scrapers": scrapers,
            "seconds": round(duration, 1),
            "interval": interval,
            "scrapes": len(latencies),
            "scrapes_per_second": round(len(latencies) / seconds, 1),
            "failures": flooded["failures"],
            "latency_p50_ms": _ms(_pct(latencies, 50)),
            "latency_p99_ms": _ms(_pct(latencies, 99)),
            "latency_max_ms": _ms(latencies[-1] if latencies else None),
            "samples_seen": len(stamps),
            "sample_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "sample_gap_max_s": round(max(gaps), 3) if gaps else None,
            "hog_crossed_after_s": round(crossed_at - grow_at, 3) if crossed_at else None,
            "crossing_to_death_s": round(died_at - crossed_at, 3) if died_at and crossed_at else None,
            "hog_died": died_at is not None,
            "event_outcome": event.get("outcome") if event else None,
            "event_time_to_death_s": event.get("time_to_death_seconds") if event else None,
        }
    finally:
        if scraping is not None:
            scraping.join(30)
            if scraping.is_alive():
                scraping.kill()
        _killpg(hog)
        _killpg(daemon)
        daemon_log.close()


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)


def _kill_event(path: Path, pgid: int) -> dict | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("pgid") == pgid and ev.get("action") in ("term", "kill"):
            return ev
    return None


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scrapers", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval in seconds")
    p.add_argument("--limit-mib", type=int, default=200)
    p.add_argument("--grow-mib", type=float, default=100.0)
    p.add_argument("--grace", type=float, default=1.0)
    p.add_argument("--baseline", action="store_true", help="also run once with a single scraper")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        runs = [a.scrapers] + ([1] if a.baseline else [])
        for n in runs:
            r = run(Path(d), n, a.seconds, a.interval, a.limit_mib, a.grow_mib, a.grace)
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
