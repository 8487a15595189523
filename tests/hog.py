"""A test process that holds a known amount of memory, optionally with children.

Run as `python hog.py --mb 200 --children 2 --child-mb 20 --ready FILE`.
It touches every page it allocates, so RSS is real, then sleeps until killed.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

MB = 1024 * 1024


def allocate(mb: float) -> bytearray:
    buf = bytearray(int(mb * MB))
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))  # touch each page
    return buf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=0)
    p.add_argument("--grow", type=float, default=0, help="MB per second to add after the start")
    p.add_argument("--max-mb", type=float, default=10_000)
    p.add_argument("--step-ms", type=float, default=20)
    p.add_argument("--children", type=int, default=0)
    p.add_argument("--child-mb", type=float, default=0)
    p.add_argument("--setsid-child", action="store_true", help="one more child that moves to its own session")
    p.add_argument("--ignore", action="append", default=[], help="signal names to ignore, e.g. SIGTERM")
    p.add_argument("--ready", help="write this file once everything is allocated")
    p.add_argument("--exit", type=int, default=None, help="exit with this status after --sleep seconds")
    p.add_argument("--sleep", type=float, default=3600)
    p.add_argument("--tag", default=None, help="ignored: a marker for rules to select only this test's hogs")
    p.add_argument("--setsid-grandchild", action="store_true", help="the first child starts a child in its own session")
    p.add_argument("--comm", default=None, help="set the process name (/proc/PID/comm) to this")
    p.add_argument(
        "--grow-on-signal", action="store_true", help="start growing only once SIGUSR1 arrives (after --ready)"
    )
    p.add_argument("--oom-score-adj", type=int, default=None, help="write this to /proc/self/oom_score_adj")
    a = p.parse_args()
    if a.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(a.oom_score_adj))
    if a.grow_on_signal:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    if a.comm:
        import ctypes

        ctypes.CDLL(None).prctl(15, a.comm.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    for name in a.ignore:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    kids = []
    child_args = [sys.executable, __file__, "--mb", str(a.child_mb)] + sum((["--ignore", n] for n in a.ignore), [])
    if a.tag:
        child_args += ["--tag", a.tag]
    for i in range(a.children):
        args = child_args + (["--setsid-child"] if i == 0 and a.setsid_grandchild else [])
        kids.append(subprocess.Popen(args + ["--ready", f"{a.ready}.child{i}"] if a.ready else args))
    if a.setsid_child:
        kids.append(
            subprocess.Popen(child_args + (["--ready", f"{a.ready}.setsid"] if a.ready else []), start_new_session=True)
        )
    held = [allocate(a.mb)] if a.mb else []
    if a.ready:
        deadline = time.time() + 30
        wanted = [f"{a.ready}.child{i}" for i in range(a.children)] + ([f"{a.ready}.setsid"] if a.setsid_child else [])
        while any(not os.path.exists(w) for w in wanted) and time.time() < deadline:
            time.sleep(0.01)
        with open(a.ready + ".tmp", "w") as f:
            f.write(" ".join(str(k.pid) for k in kids))
        os.replace(a.ready + ".tmp", a.ready)
    if a.grow_on_signal:
        signal.sigwait({signal.SIGUSR1})
    total = a.mb
    end = time.time() + a.sleep
    while time.time() < end:
        if a.grow and total < a.max_mb:
            step = min(a.grow * a.step_ms / 1000, a.max_mb - total)
            held.append(allocate(step))
            total += step
        time.sleep(a.step_ms / 1000 if a.grow else min(0.5, max(0.0, end - time.time())))
    if a.exit is not None:
        sys.exit(a.exit)


if __name__ == "__main__":
    main()
