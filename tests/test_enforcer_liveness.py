"""The enforcer keeps deciding and killing when what it writes to cannot take it, and when descriptors run out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, free_port, http_get, metric_value, wait_for

from mem_exporter.outbox import QUEUE_SIZE


def fill(fd: int) -> int:
    """Write into a pipe until it takes not one more byte; the bytes written. Through a file description
    of its own (O_NONBLOCK on `fd` itself would make the reader's other writers non-blocking too)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    total = 0
    try:
        for size in (4096, 1):
            try:
                while True:
                    total += os.write(own, b"x" * size)
            except BlockingIOError:
                pass
    finally:
        os.close(own)
    return total


def test_a_stderr_nobody_reads_stops_no_kill(tmp_path, spawn_group, tag):
    """stderr is a pipe, full, never read. A system rule with no victim logs a line every second from the
    enforcer's thread: that write used to block the thread, and the hog after it lived on."""
    port = free_port()
    cfg = tmp_path / "enforce.yaml"
    cfg.write_text(
        "interval: 0.3s\ngpu: {backend: none}\n"
        f"enforcer:\n  event_log: {tmp_path / 'events.jsonl'}\n  rules:\n"
        f"    - {{name: hogs, match: {{cmdline: '{tag}-hog'}}, max_rss: 150MB, grace: 1s}}\n"
        # below the threshold always; its match selects nothing, so it only ever logs `no_victim`
        f"    - {{name: lonely, match: {{cmdline: '{tag}-nothing'}}, system_available_below: 99%, cooldown: 0s}}\n"
    )
    r, w = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mem_exporter",
            "--log-level",
            "debug",
            "enforce",
            "-c",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=w,
        stderr=w,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _healthy(port), 20, what="the enforcer's /healthz")
        assert fill(w) > 0  # from now on every write to the enforcer's stderr would block
        time.sleep(2.5)  # `no_victim` lines are due meanwhile (one a second)
        hog = spawn_group("--mb", "250", "--tag", f"{tag}-hog")
        wait_for(lambda: hog.proc.poll() is not None, 15, what="the hog killed while stderr is blocked")
        assert hog.proc.returncode == -signal.SIGTERM
        for _ in range(QUEUE_SIZE + 100):  # each request is a debug line: more than the queue holds
            assert _healthy(port)
        _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert metric_value(body, "mem_exporter_enforcer_kills_total", rule="hogs") == 1
        assert metric_value(body, "mem_exporter_enforcer_events_dropped_total", sink="stderr") > 0
        assert metric_value(body, "mem_exporter_enforcer_events_dropped_total", sink="event_log") == 0
        events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert any(e["rule"] == "hogs" and e["outcome"] == "dead" for e in events)  # the file sink goes on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        os.close(r)
        os.close(w)


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False
