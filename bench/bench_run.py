"""CPU of `mem-exporter run -t 2000 -- sleep 40` on a quiet and on busy hosts, before and after a change.

    python bench/bench_run.py [--before REF] [--hosts 1000,10000] [--seconds 25] [--young]

For each host size (the host as it is, then topped up with background processes to about 1000 and
10 000) the wrapper of REF's code (`git archive`, default `main`) and of this checkout's run side by
side, each watching `sleep 40`; the bench reads their utime+stime from /proc/PID/stat over the same
window, after their first two samples. With --young the window is the run's first seconds instead (from
the command's start, the session line of the log, for --seconds, default 5), where a young run is
sampled faster. The background processes are forked from one Python process into one new process
group and wait in signal.pause(); each group is killed by its pgid at the end.
Only process groups the bench started are ever signalled.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchlib import background

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
COMMAND = ["run", "-t", "2000", "--", "sleep", "40"]


def host_processes() -> int:
    return sum(1 for n in os.listdir("/proc") if n.isdigit())


def checkout(ref: str, into: Path) -> Path:
    """REF's mem_exporter package, unpacked from git (the repository's worktrees are left alone)."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "mem_exporter"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime + stime of the process (all its threads), in seconds, and the same from the scheduler's
    nanosecond count (/proc/PID/task/*/schedstat): the clock-tick figure is too coarse for a few ms."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ns += int(f.read().split()[0])
        except OSError:
            pass
    return (int(fields[11]) + int(fields[12])) / TICK, ns / 1e9  # fields 14 and 15 of proc(5)


class Wrapper:
    """`mem-exporter run` from one code tree; python -m puts the working directory (the tree) first."""

    def __init__(self, name: str, code: Path, tmp: Path):
        self.name, self.code = name, code
        self.log = tmp / f"{name}-{time.monotonic_ns()}.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEM_EXPORTER_")}
        where = subprocess.run(
            [sys.executable, "-c", "import mem_exporter; print(mem_exporter.__file__)"],
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(code)):
            raise RuntimeError(f"{name}: imports {where}, not the code under {code}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mem_exporter", *COMMAND[:1], "-l", str(self.log), *COMMAND[1:]],
            cwd=code,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def started(self) -> bool:
        try:
            return '"type":"session"' in self.log.read_text()
        except OSError:
            return False

    def samples(self) -> int:
        try:
            return self.log.read_text().count('"type":"sample"')
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # it stops its own tree
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def measure(codes: dict[str, Path], tmp: Path, seconds: float, young: bool = False) -> dict[str, tuple[float, float]]:
    """Both wrappers at once over the same window: their CPU share of one core (utime+stime, schedstat)."""
    wrappers = [Wrapper(name, code, tmp) for name, code in codes.items()]
    try:
        deadline = time.monotonic() + 30
        ready = (lambda w: w.started()) if young else (lambda w: w.samples() >= 2)
        while not all(ready(w) for w in wrappers):  # start-up (imports) left out of the window
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in wrappers):
                raise RuntimeError("a wrapper did not start sampling")
            time.sleep(0.1)
        t0, c0 = time.monotonic(), {w.name: cpu_seconds(w.proc.pid) for w in wrappers}
        time.sleep(seconds)
        t1, c1 = time.monotonic(), {w.name: cpu_seconds(w.proc.pid) for w in wrappers}
        if any(w.proc.poll() is not None for w in wrappers):
            raise RuntimeError("a wrapper ended inside the window")
        return {w.name: tuple((c1[w.name][i] - c0[w.name][i]) / (t1 - t0) for i in (0, 1)) for w in wrappers}
    finally:
        for w in wrappers:
            w.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git ref of the code to compare with (default main)")
    ap.add_argument("--hosts", default="1000,10000", help="host sizes to top up to, after the host as it is")
    ap.add_argument("--seconds", type=float, default=None, help="measuring window (default 25, 5 with --young)")
    ap.add_argument("--young", action="store_true", help="measure the run's first seconds (a young run)")
    args = ap.parse_args()
    args.seconds = args.seconds or (5.0 if args.young else 25.0)
    if args.seconds > 32:
        ap.error("--seconds: at most 32, the window must end before `sleep 40` does")
    groups: list[subprocess.Popen] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as d:
        tmp = Path(d)
        codes = {"before": checkout(args.before, tmp / "before"), "after": ROOT}
        try:
            for target in [0, *(int(x) for x in args.hosts.split(","))]:
                missing = target - host_processes()
                if missing > 0:
                    groups.append(background(missing))
                host = host_processes()
                cpu = measure(codes, tmp, args.seconds, args.young)
                end = host_processes()  # the host moves on by itself: both ends when they differ by over 5 %
                label = str(host) if abs(end - host) <= host // 20 else f"{host}-{end}"
                rows.append((label, cpu["before"], cpu["after"]))
                print(f"host {host}: before {cpu['before']}, after {cpu['after']}", file=sys.stderr)
        finally:
            for g in groups:
                os.killpg(g.pid, signal.SIGKILL)
                g.wait(60)
    print(
        f"`mem-exporter run -t 2000 -- sleep 40`, CPU of the wrapper (utime+stime) over {args.seconds:g} s"
        + (" from the command's start" if args.young else "")
        + ", "
        f"before = {args.before}, {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| host processes | before, utime+stime | after, utime+stime | ratio | before, schedstat | "
        "after, schedstat | ratio |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.0f}x" if b > 0 else "n/a"

    for host, before, after in rows:
        print(
            f"| {host} | {before[0]:.2%} | {after[0]:.2%} | {ratio(before[0], after[0])} | {before[1]:.3%} | "
            f"{after[1]:.3%} | {ratio(before[1], after[1])} |"
        )
    print("\n(% of one core; schedstat: the scheduler's nanosecond count, finer than the 10 ms clock tick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
