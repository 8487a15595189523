"""Kills on a busy host: N background processes (default 3000), then the enforcer must stop
(a) a SIGTERM-ignoring group with children and (b) a group forking about 100 children a second that
each allocate, and `run` must stop a SIGTERM-ignoring tree. Each must die whole, with its event and
counter. Only process groups this script started are ever signalled.

    python bench/bench_kill_busy.py [--background 3000]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
HOG = str(ROOT / "tests" / "hog.py")

from benchlib import background  # noqa: E402

# tests/hog.py growing 200 MB/s from 20 MB up to 800 MB and ignoring SIGTERM; each case adds its --children
SIGTERM_IGNORING_HOG = [sys.executable, HOG, "--mb", "20", "--grow", "200", "--max-mb", "800", "--ignore", "SIGTERM"]
FORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
end = time.time() + 60
while time.time() < end:
    if os.fork() == 0:
        block = bytearray(8 * 2**20)
        time.sleep(60)
        os._exit(0)
    time.sleep(0.01)
"""


def wait_dead(pids, timeout=20.0) -> bool:
    from helpers.processes import pid_alive

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def enforce_case(tmp: Path, name: str, cmd: list[str], limit: str) -> dict:
    from helpers.metrics import metric_value

    events = tmp / f"{name}.jsonl"
    tag = f"busy{name}{os.getpid()}"
    victim = subprocess.Popen(cmd + ["--tag", tag] if cmd[1] == HOG else cmd + [tag], start_new_session=True)
    config = tmp / f"{name}.yaml"
    config.write_text(
        json.dumps(
            {
                "interval": "1s",
                "gpu": {"backend": "none"},
                "enforcer": {
                    "event_log": str(events),
                    "rules": [{"name": name, "match": {"cmdline": tag}, "max_rss": limit, "grace": "1s"}],
                },
            }
        )
    )
    from benchlib import free_port, wait_http

    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mem_exporter", "enforce", "-c", str(config), "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        while time.monotonic() - started < 60 and not (events.exists() and events.read_text().strip()):
            time.sleep(0.1)
        time.sleep(2)
        ev = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
        kill = next((e for e in ev if e["action"] in ("term", "kill")), None)
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        pids = [s["pid"] for s in kill["signalled"]] if kill else []
        return {
            "case": name,
            "event": kill["action"] if kill else None,
            "outcome": kill and kill["outcome"],
            "signalled": len(pids),
            "all dead": wait_dead(pids + [victim.pid]),
            "kills_total": metric_value(body, "mem_exporter_enforcer_kills_total", rule=name),
            "time_to_death_s": kill and kill["time_to_death_seconds"],
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        try:
            os.killpg(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        victim.wait(10)


def run_case(tmp: Path) -> dict:
    log = tmp / "run.jsonl"
    run = [sys.executable, "-m", "mem_exporter", "run", "-t", "150", "-l", str(log), "--"]
    proc = subprocess.run(
        run + SIGTERM_IGNORING_HOG + ["--children", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    ev = next(json.loads(x) for x in log.read_text().splitlines() if json.loads(x).get("type") == "event")
    return {
        "case": "run, SIGTERM ignored, 2 children",
        "event": ev["action"],
        "outcome": ev["outcome"],
        "signalled": len(ev["signalled"]),
        "all dead": wait_dead([s["pid"] for s in ev["signalled"]]),
        "kills_total": f"exit {proc.returncode}",
        "time_to_death_s": ev["time_to_death_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--background", type=int, default=3000)
    args = ap.parse_args()
    bg = background(args.background)
    print(f"{args.background} background processes up; host has {len([d for d in os.listdir('/proc') if d.isdigit()])}")
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            rows = [
                enforce_case(tmp, "ignoreterm", SIGTERM_IGNORING_HOG + ["--children", "3"], "200MiB"),
                enforce_case(tmp, "forker", [sys.executable, "-c", FORKER], "300MiB"),
                run_case(tmp),
            ]
    finally:
        os.killpg(bg.pid, signal.SIGKILL)
        bg.wait(30)
    print("| case | action | outcome | processes signalled | all dead | kills_total / exit | time to death |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['case']} | {r['event']} | {r['outcome']} | {r['signalled']} | {r['all dead']} | "
            f"{r['kills_total']} | {r['time_to_death_s']} s |"
        )


if __name__ == "__main__":
    main()
