"""Cost of one full GPU read (every field of every card), against the 2 s sampling interval.

    python bench/bench_gpu.py [--reads N]

Rows:
- fake: the 8-card scenario tests/fixtures/gpu/box-8x80gb.yaml replayed by the fake source;
- stub NVML: NvmlSource over an in-memory pynvml with 8 cards: our own per-call overhead
  (query helper, error mapping, unit conversion), without the driver's cost;
- real NVML: only where a driver answers; this includes the driver's own time.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mem_exporter.gpu import GpuSource, open_gpu_source  # noqa: E402
from mem_exporter.gpu.fake import FakeGpuSource, load_scenario  # noqa: E402
from mem_exporter.gpu.nvml import NvmlSource  # noqa: E402
from mem_exporter.gpu.nvml_stub import GIB, MIB, StubCard, StubNvml  # noqa: E402

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
        cards.append(StubCard(uuid=f"GPU-h100{i:04d}", name="NVIDIA H100 80GB HBM3", memory_total=81559 * MIB,
                              memory_used=62 * GIB, memory_reserved=520 * MIB, compute=compute, graphics=graphics))
    return StubNvml(cards, driver="550.90.07")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=2000, help="reads per timing round (default 2000)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
