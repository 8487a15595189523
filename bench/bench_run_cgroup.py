"""A stalled `run` and a hog growing 1 GB/s: the cgroup's kernel limit bounds it, today's path does not.

    python bench/bench_run_cgroup.py [--threshold 300] [--cap-mib 1024]

`mem-exporter run -t 300MB` starts tests/hog.py, which waits for SIGUSR1; the bench then stops the
wrapper (SIGSTOP) and tells the hog to grow about 1 GB/s (10 MiB every 10 ms) up to --cap-mib (1 GiB:
the bench stays safe on a shared host). It follows the hog's VmHWM until the hog dies or stops
growing, then resumes the wrapper. Twice in one run: with the command's cgroup (the default: its
kernel limit is the limit + the hard ceiling) and with --no-cgroup (today's path). Root, Linux.
Only what the bench started is signalled: the wrapper's process group and the hog's pid.
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

from benchlib import HOG, HOG_COMM, MIB

ROOT = Path(__file__).resolve().parents[1]
MB = 1000**2


def hwm(pid: int) -> int | None:
    """VmHWM (peak RSS) of a live process, in bytes; None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    if fields.get("State", "").split()[:1] == ["Z"] or "VmHWM" not in fields:
        return None
    return int(fields["VmHWM"].split()[0]) * 1024


def trial(threshold_mb: int, cap_mib: int, cgroup: bool, tmp: Path) -> dict:
    log, ready = tmp / f"run-{cgroup}.jsonl", tmp / f"ready-{cgroup}"
    hog = [sys.executable, str(HOG), "--comm", HOG_COMM, "--grow-on-signal", "--ready", str(ready)]
    hog += ["--grow", "1000", "--step-ms", "10", "--max-mb", str(cap_mib)]  # hog.py's MB is a MiB
    run = [sys.executable, "-m", "mem_exporter", "run", "-t", f"{threshold_mb}MB", "-l", str(log)]
    run += [] if cgroup else ["--no-cgroup"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wrapper = subprocess.Popen([*run, "--", *hog], cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE)
    command = None
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        header = json.loads(log.read_text().splitlines()[0])
        command = header["command_pid"]
        os.kill(wrapper.pid, signal.SIGSTOP)  # the wrapper stalls: only the kernel can stop the hog now
        memory_dir = next((d for d in (header.get("cgroup") or {}).get("dirs", []) if "/memory/" in d), None)
        os.kill(command, signal.SIGUSR1)
        began, peak, last_growth = time.monotonic(), 0, time.monotonic()
        while time.monotonic() - began < 10:
            now = hwm(command)
            if now is None:
                break
            if now > peak:
                peak, last_growth = now, time.monotonic()
            elif time.monotonic() - last_growth > 1.0:  # reached the cap and holds it
                break
            time.sleep(0.005)
        killed = hwm(command) is None
        cgroup_peak = int(Path(memory_dir, "memory.max_usage_in_bytes").read_text()) if memory_dir else None
        took = time.monotonic() - began
    finally:
        if command is not None and hwm(command) is not None:
            os.kill(command, signal.SIGKILL)  # the hog the bench started, still growing or holding
        os.kill(wrapper.pid, signal.SIGCONT)
    try:
        _, err = wrapper.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(wrapper.pid, signal.SIGKILL)
        _, err = wrapper.communicate()
    exit_record = json.loads(log.read_text().splitlines()[-1])
    return {
        "mode": "cgroup" if cgroup else "no cgroup (today's path)",
        "peak_rss": peak,
        "cgroup_peak": cgroup_peak,
        "killed_while_stalled": killed,
        "seconds": took,
        "exit_status": wrapper.returncode,
        "kernel_oom_kills": exit_record.get("kernel_oom_kills"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threshold", type=int, default=300, help="run's -t, in MB (default 300)")
    p.add_argument("--cap-mib", type=int, default=1024, help="the hog stops growing here (default 1024 MiB)")
    a = p.parse_args()
    ceiling = a.threshold * MB * 1.10
    print(f"run -t {a.threshold}MB, stopped after the start; hog +1 GB/s up to {a.cap_mib} MiB")
    print(f"kernel limit with the cgroup: limit + hard ceiling = {ceiling / MB:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="bench-run-cgroup-") as tmp:
        rows = [trial(a.threshold, a.cap_mib, cgroup, Path(tmp)) for cgroup in (True, False)]
    print(f"{'mode':26} {'hog peak RSS':>13} {'cgroup peak':>12} {'killed':>7} {'after':>7} {'exit':>5}")
    for r in rows:
        cg = f"{r['cgroup_peak'] / MB:.0f} MB" if r["cgroup_peak"] else "-"
        print(
            f"{r['mode']:26} {r['peak_rss'] / MB:10.0f} MB {cg:>12} {'yes' if r['killed_while_stalled'] else 'no':>7} "
            f"{r['seconds']:6.2f}s {r['exit_status']:>5}"
        )
    with_cg, without = rows
    # the kernel limits the cgroup's charge; the hog's RSS also counts the interpreter's shared file
    # pages (its binary, libraries), charged to whichever cgroup read them first, so it may be a few MB more
    charged = with_cg["cgroup_peak"] or 0
    print(
        f"with the cgroup: charge peak {charged / MB:.0f} MB, "
        f"{'within' if charged <= ceiling else 'OVER'} the {ceiling / MB:.0f} MB kernel limit "
        f"(hog's peak RSS {with_cg['peak_rss'] / MB:.0f} MB); without: {without['peak_rss'] / MB:.0f} MB, "
        f"{without['peak_rss'] / with_cg['peak_rss']:.1f}x, bounded only by the bench's cap "
        f"({a.cap_mib * MIB / MB:.0f} MB)"
    )


if __name__ == "__main__":
    main()
