#!/usr/bin/env python3
"""The lab's demo workload: a process that grows until the lab's enforcer kills it.

It allocates and touches memory step by step (RSS rises at --grow-mb-per-s) up to --max-mb, then holds.
The lab's rule `lab-demo` (deploy/config/mem-exporter.yaml) kills it at 300 MB, about a minute after it
starts; Docker restarts it, so the lab shows a kill every couple of minutes. The marker argument
--mem-exporter-lab-demo is what the rule matches: no other process has it.

    python3 deploy/lab/demo-workload.py --mem-exporter-lab-demo [--grow-mb-per-s 5] [--max-mb 600]
"""

from __future__ import annotations

import argparse
import sys
import time

MB = 2**20
PAGE = 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mem-exporter-lab-demo", action="store_true", help="the marker the lab's rule selects")
    p.add_argument("--start-mb", type=int, default=20, help="memory at start")
    p.add_argument("--grow-mb-per-s", type=float, default=5.0, help="growth rate")
    p.add_argument("--max-mb", type=int, default=600, help="stop growing here (the host's safety net)")
    p.add_argument("--tag", default=None, help="ignored: a second marker, so a test's rule selects only its own run")
    a = p.parse_args(argv)
    chunks: list[bytearray] = []
    held = reported = 0
    started = time.monotonic()
    while True:
        want = min(a.max_mb, a.start_mb + a.grow_mb_per_s * (time.monotonic() - started))
        while held + 1 <= want:
            chunk = bytearray(MB)
            chunk[::PAGE] = b"\x01" * (MB // PAGE)  # touch every page: resident, not just reserved
            chunks.append(chunk)
            held += 1
        if held // 50 != reported // 50:
            print(f"demo workload holds {held} MB", file=sys.stderr, flush=True)
            reported = held
        time.sleep(0.2 if held < a.max_mb else 5.0)


if __name__ == "__main__":
    sys.exit(main())
