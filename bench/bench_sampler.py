"""Full-sample cost at about 200, 1000 and 3000 live processes, side by side in one run.

    python bench/bench_sampler.py [--sizes 200,1000,3000] [--rounds 15]

Columns: this project's full sample (warm, the steady state), the same with
`memory: pss`, the same Sample through the portable source (`source: psutil`, what
macOS and Windows run) and its ratio to the procfs path, a plain psutil loop, a
minimal C walk of stat+statm that opens each file anew (bench/cwalk.c), the same C walk keeping
each process's two descriptors open and re-reading them with pread (`cwalk N keep`: the floor for
what the reader does) with our sample's ratio to it in wall and in CPU time, Debian's
prometheus-process-exporter scrape (if installed), and for the exporter daemon the /metrics scrape
p50/p99 and its RSS. Our sample and the kept-descriptor floor are taken in turn, round by round, so
that load from elsewhere weighs on both alike; CPU time (user + system) does not count waiting for a
core. The processes are `sleep`s in one process group that the bench starts and kills itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import free_port, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mem_exporter.config import validate_config  # noqa: E402
from mem_exporter.sampler import Sampler, quiet_gc  # noqa: E402


def live_processes() -> int:
    return sum(1 for n in os.listdir("/proc") if n.isdigit())


class Population:
    """`count` sleeping processes in one process group owned by the bench."""

    def __init__(self, count: int):
        # a group in our session, so others can join
        self.leader = subprocess.Popen(["sleep", "3600"], preexec_fn=os.setpgrp)
        self.pgid = self.leader.pid
        self.procs = [self.leader] + [
            subprocess.Popen(["sleep", "3600"], preexec_fn=lambda: os.setpgid(0, self.pgid)) for _ in range(count - 1)
        ]

    def close(self) -> None:
        os.killpg(self.pgid, signal.SIGKILL)
        for p in self.procs:
            p.wait()


def median_ms(fn, rounds: int) -> float:
    fn()  # warm-up: caches, imports, page cache
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def psutil_loop() -> None:
    import psutil

    for p in psutil.process_iter(["pid", "ppid", "name", "memory_info"]):
        _ = p.info  # process_iter reads the attributes; touching them is the cost measured


def c_walk_ms(binary: str, rounds: int) -> float:
    out = subprocess.run([binary, str(rounds + 1)], capture_output=True, text=True, check=True).stdout.split("\n")
    return statistics.median(float(line.split()[0]) for line in out[1:] if line)


def against_kept_floor(tick, binary: str, rounds: int) -> tuple[float, float, float, float]:
    """Medians in ms of (our sample, the kept-descriptor C floor) in wall time, then in CPU time: one
    of each in turn per round, after a warm-up round of each."""
    walk = subprocess.Popen([binary, str(rounds + 1), "keep", "step"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert walk.stdin is not None and walk.stdout is not None

    def floor_round() -> tuple[float, float]:
        walk.stdin.write(b"\n")
        walk.stdin.flush()
        fields = walk.stdout.readline().split()
        return float(fields[0]), float(fields[3])

    tick()
    floor_round()
    ours, floor, ours_cpu, floor_cpu = [], [], [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        tick()
        ours.append((time.perf_counter() - wall) * 1000)
        ours_cpu.append((time.process_time() - cpu) * 1000)
        wall_ms, cpu_ms = floor_round()
        floor.append(wall_ms)
        floor_cpu.append(cpu_ms)
    walk.stdin.close()
    walk.wait()
    median = statistics.median
    return median(ours), median(floor), median(ours_cpu), median(floor_cpu)


def profile_ticks(tick, rounds: int) -> None:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(lambda: [tick() for _ in range(rounds)])
    pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(12)


def scrape_ms(url: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        urllib.request.urlopen(url, timeout=30).read()
        times.append((time.perf_counter() - t) * 1000)
    return times


def process_exporter_ms(rounds: int) -> float | None:
    binary = shutil.which("prometheus-process-exporter")
    if not binary:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write("process_names:\n  - name: '{{.Comm}}'\n    cmdline: ['.+']\n")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-config.path", f.name, "-web.listen-address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url)
        return statistics.median(scrape_ms(url, max(3, rounds // 3)))
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(f.name)


def exporter_scrape(rounds: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, RSS MiB) of `mem-exporter serve` at the current population."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mem_exporter",
            "serve",
            "--gpu-backend",
            "none",
            "--interval",
            "1s",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url)
        time.sleep(2.5)  # a few full samples at this population
        times = sorted(scrape_ms(url, 200))
        rss_kb = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS"))
        return statistics.median(times), times[int(len(times) * 0.99) - 1], rss_kb / 1024
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,1000,3000")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of our ticks at each size")
    args = ap.parse_args()

    build = Path(tempfile.mkdtemp(prefix="memexp-bench-"))
    cwalk = build / "cwalk"
    subprocess.run(["cc", "-O2", "-o", str(cwalk), str(Path(__file__).with_name("cwalk.c"))], check=True)

    rows = []
    base = live_processes()
    quiet_gc()  # as the daemon does at start
    for size in (int(s) for s in args.sizes.split(",")):
        pop = Population(max(1, size - base))
        try:
            time.sleep(0.5)
            n = live_processes()
            rss_sampler = Sampler(validate_config({"gpu": {"backend": "none"}}))
            pss_sampler = Sampler(validate_config({"gpu": {"backend": "none"}, "memory": "pss"}))
            psutil_sampler = Sampler(validate_config({"gpu": {"backend": "none"}, "source": "psutil"}))
            ours, kept, ours_cpu, kept_cpu = against_kept_floor(rss_sampler.tick, str(cwalk), args.rounds)
            if args.profile:
                profile_ticks(rss_sampler.tick, args.rounds)
            portable = median_ms(psutil_sampler.tick, args.rounds)
            pss = median_ms(pss_sampler.tick, max(3, args.rounds // 3))
            ps = median_ms(psutil_loop, args.rounds)
            floor = c_walk_ms(str(cwalk), args.rounds)
            pe = process_exporter_ms(args.rounds)
            p50, p99, rss = exporter_scrape(args.rounds)
            rows.append((n, ours, pss, portable, ps, floor, kept, ours_cpu / kept_cpu, pe, p50, p99, rss))
            print(f"measured {n} processes", file=sys.stderr)
        finally:
            pop.close()
    shutil.rmtree(build)

    print(f"\nFull sample, median ms (host: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n")
    print(
        "| processes | mem-exporter | with pss | psutil source | psutil source / ours | psutil loop | C floor | "
        "C floor, kept descriptors | ours / kept floor | same, CPU time | "
        "process-exporter | ours / C | process-exporter / ours | scrape p50 | scrape p99 | exporter RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, ours, pss, portable, ps, floor, kept, cpu_ratio, pe, p50, p99, rss in rows:
        pe_text = f"{pe:.1f}" if pe is not None else "n/a"
        ratio = f"{pe / ours:.1f}x" if pe is not None else "n/a"
        print(
            f"| {n} | {ours:.1f} | {pss:.1f} | {portable:.1f} | {portable / ours:.1f}x | {ps:.1f} | {floor:.1f} | "
            f"{kept:.1f} | {ours / kept:.2f}x | {cpu_ratio:.2f}x | "
            f"{pe_text} | {ours / floor:.2f}x | {ratio} | {p50:.2f} | {p99:.2f} | {rss:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
