"""Load: 50 scrapers back to back while the enforcer kills a runaway group; neither sampling nor the kill slows.

The run itself is bench/bench_load.py (one harness for the numbers and for this check).
MEM_EXPORTER_LOAD_SECONDS sets its length (default 15; the issue's figure is 20).
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_load  # noqa: E402

SECONDS = float(os.environ.get("MEM_EXPORTER_LOAD_SECONDS", "15"))
INTERVAL = 1.0
GRACE = 1.0


@pytest.mark.slow
@pytest.mark.integration
def test_scrape_flood_delays_neither_sampling_nor_a_kill(tmp_path):
    r = bench_load.run(
        tmp_path, scrapers=50, seconds=SECONDS, interval=INTERVAL, limit_mib=200, grow_mib=100, grace=GRACE
    )
    print(r)
    assert r["failures"] == {}, r  # 50 connections are within web.max_connections: every scrape answered
    assert r["scrapes_per_second"] >= 10, r
    # sampling kept its schedule: every tick seen, none more than twice the interval after the last
    assert r["samples_seen"] >= SECONDS / INTERVAL * 0.7, r
    assert r["sample_gap_max_s"] <= 2 * INTERVAL, r
    # the runaway died about as fast as without load: the enforcer's fast lane, then SIGTERM
    assert r["hog_died"] and r["event_outcome"] == "dead", r
    assert r["crossing_to_death_s"] is not None and r["crossing_to_death_s"] <= GRACE + 2 * INTERVAL + 2, r
    assert r["event_time_to_death_s"] <= GRACE + 2, r
