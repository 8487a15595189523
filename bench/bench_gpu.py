"""Cost of one full GPU read (every field of every card), against the 2 s sampling interval.

    python bench/bench_gpu.py [--reads N]

Rows:
- fake: the 8-card scenario tests/fixtures/gpu/box-8x80gb.yaml replayed by the fake source;
- stub NVML: NvmlSource over an in-memory pynvml with 8 cards: our own per-call overhead
  (query helper, error mapping, unit conversion), without the driver's cost;
- real NVML: only where a driver answers; this includes the driver's own time.

The DRM table times the fdinfo scan (the expensive part of the DRM source) over a fixture /proc of
`--drm-processes` processes (default 1000) built in a temporary directory by tests/helpers/sysfs_builder.py:
descriptors per process cycle through 8, 12, 20, 30, 45, 64, 120 and 250 (62 on average; a desktop
or a server with browsers, databases and language servers), and one process in 20 holds a DRM client
on the fixture's AMD card. Rows: the first read (every descriptor resolved), a steady read (the
(pid, start time) cache: only DRM descriptors read), and a read with the cache off (recheck 0: every
descriptor resolved each time); plus a steady scan of this host's own /proc. The fixture lies on the
temporary directory's file system, where fd/ has no descriptor count as its size: every fd/ is listed
on every read there. The host row scans this host's own /proc, where (Linux 6.2+) an fd/ whose size
(its descriptor count) is unchanged is not listed again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.nvml_stub: the pynvml test double

from helpers.nvml_stub import GIB, MIB, StubCard, StubNvml  # noqa: E402

from mem_exporter.gpu import GpuSource, open_gpu_source  # noqa: E402
from mem_exporter.gpu.drm import DrmSource  # noqa: E402
from mem_exporter.gpu.fake import FakeGpuSource, load_scenario  # noqa: E402
from mem_exporter.gpu.nvml import NvmlSource  # noqa: E402

INTERVAL = 2.0


def time_reads(source: GpuSource, reads: int) -> tuple[float, int]:
    """Seconds per read (best of 5 rounds) and the cards in the last reading."""
    now = 1000.0
    reading = source.read(now)  # warm: init, static fields, first step
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reads):
            now += INTERVAL
            reading = source.read(now)
        best = min(best, (time.perf_counter() - start) / reads)
    return best, len(reading.cards)


def stub_box() -> StubNvml:
    cards = []
    for i in range(8):
        compute = [(5000 + i, 62 * GIB)] + ([(6100, 6 * GIB)] if i == 7 else [])
        graphics = [(6200, 180 * MIB)] if i == 7 else []
        cards.append(
            StubCard(
                uuid=f"GPU-h100{i:04d}",
                name="NVIDIA H100 80GB HBM3",
                memory_total=81559 * MIB,
                memory_used=62 * GIB,
                memory_reserved=520 * MIB,
                compute=compute,
                graphics=graphics,
            )
        )
    return StubNvml(cards, driver="550.90.07")


FD_COUNTS = (8, 12, 20, 30, 45, 64, 120, 250)


def drm_tree(root: Path, processes: int) -> int:
    """A fixture /proc and /sys with `processes` processes; returns the number of descriptors."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.procfs_builder import FakeProc
    from helpers.sysfs_builder import FakeSys, add_fd, add_plain_fds

    FakeSys(root / "sys").add_card("amd-discrete")
    fp = FakeProc(root / "proc")
    total = 0
    for i in range(processes):
        pid = 1000 + i
        d = fp.add(pid, f"proc{i % 50}", start=10_000 + i)
        n = FD_COUNTS[i % len(FD_COUNTS)]
        add_plain_fds(d, n)
        total += n
        if i % 20 == 0:  # a DRM client of its own (a unique drm-client-id)
            add_fd(d, n, "/dev/dri/renderD128", "amdgpu-client42.fdinfo")
            text = (d / "fdinfo" / str(n)).read_text()
            (d / "fdinfo" / str(n)).write_text(text.replace("drm-client-id:\t42", f"drm-client-id:\t{1000 + i}"))
            total += 1
    return total


def time_scan(source: DrmSource, reads: int, fresh: bool = False) -> float:
    """Seconds per read, best of 3 rounds; `fresh`: a new source (empty cache) for every read."""
    best = float("inf")
    now = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reads):
            now += INTERVAL
            (DrmSource(source.procfs, source.sysfs) if fresh else source).read(now)
        best = min(best, (time.perf_counter() - start) / reads)
    return best


def drm_rows(processes: int, reads: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-drm-") as tmp:
        root = Path(tmp)
        fds = drm_tree(root, processes)
        steady = DrmSource(str(root / "proc"), str(root / "sys"))
        steady.read(0.0)
        nocache = DrmSource(str(root / "proc"), str(root / "sys"), recheck=0.0)
        rows = [
            ("first read (cold)", time_scan(steady, max(1, reads // 4), fresh=True), None),
            ("steady (cached)", time_scan(steady, reads), dict(steady.cost)),
            ("cache off", time_scan(nocache, max(1, reads // 4)), dict(nocache.cost)),
        ]
        print(
            f"\nDRM fdinfo scan: {processes} processes, {fds} descriptors, "
            f"{len(steady.read(1e9).cards[0].processes)} DRM clients (fixture on {tmp.split('/')[1]})"
        )
        print(f"{'read':<22} {'ms/read':>9} {'of a 2 s interval':>18}  syscalls (stat/listdir/readlink/fdinfo)")
        for name, seconds, cost in rows:
            calls = "-" if cost is None else "/".join(str(cost[k]) for k in ("stat", "listdir", "readlink", "fdinfo"))
            print(f"{name:<22} {seconds * 1e3:>9.3f} {seconds / INTERVAL:>17.4%}  {calls}")
        print(f"cache off / steady: {rows[2][1] / rows[1][1]:.1f}x")
    host = DrmSource("/proc", "/sys")
    cold = _timed(lambda: host.scan_processes({}, {}, 0.0))
    n, fds = host.cost["stat"], host.cost["readlink"]
    seconds = min(_timed(lambda: host.scan_processes({}, {}, 1.0)) for _ in range(max(3, reads // 4)))
    print(
        f"this host's /proc: {n} processes, {fds} descriptors; first read {cold * 1e3:.1f} ms, steady "
        f"{seconds * 1e3:.1f} ms ({seconds / max(1, n) * 1e6:.1f} us/process, {host.cost['listdir']} listings: "
        f"fd/ sizes as counts {'on' if host._counted else 'off'})"
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=2000, help="reads per timing round (default 2000)")
    ap.add_argument("--drm-processes", type=int, default=1000, help="processes in the DRM fixture (default 1000)")
    ap.add_argument("--drm-reads", type=int, default=10, help="DRM reads per timing round (default 10)")
    args = ap.parse_args()
    logging.getLogger("mem_exporter.gpu").setLevel(logging.ERROR)  # "no driver here" is shown in the table

    rows = []
    fake = FakeGpuSource(load_scenario(ROOT / "tests/fixtures/gpu/box-8x80gb.yaml"))
    rows.append(("fake (8-card scenario)", *time_reads(fake, args.reads), "-"))

    stub = stub_box()
    nvml = NvmlSource(nvml=stub)
    seconds, cards = time_reads(nvml, args.reads)
    before = len(stub.calls)
    nvml.read(1e9)
    rows.append(("stub NVML (8 cards)", seconds, cards, str(len(stub.calls) - before)))

    real = open_gpu_source("nvml")
    if real.read(0.0).up:
        rows.append(("real NVML", *time_reads(real, max(1, args.reads // 100)), "-"))
    else:
        rows.append(("real NVML", None, 0, "no driver here"))
    real.close()

    print(f"{'source':<24} {'cards':>5} {'ms/read':>9} {'of a 2 s interval':>18}  NVML calls/read")
    for name, seconds, cards, calls in rows:
        if seconds is None:
            print(f"{name:<24} {cards:>5} {'-':>9} {'-':>18}  {calls}")
            continue
        print(f"{name:<24} {cards:>5} {seconds * 1e3:>9.3f} {seconds / INTERVAL:>17.4%}  {calls}")
    drm_rows(args.drm_processes, args.drm_reads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
