"""The exporter for real: a spawned process group shows up in a real scrape; signals; reload."""

import os
import signal
import subprocess
import time
import uuid

import pytest
from helpers.metrics import metric_value
from helpers.net import http_get
from helpers.processes import MB
from helpers.waiting import wait_for


def group_label_for_pgid(text: str, pgid: int) -> str | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        if fam.name == "mem_exporter_group_info":
            for s in fam.samples:
                if s.labels.get("pgid") == str(pgid):
                    return s.labels["group"]
    return None


@pytest.mark.integration
def test_a_spawned_group_appears_with_its_summed_rss(daemon, spawn_group):
    baseline = spawn_group()  # an idle hog: what the interpreter alone costs
    baseline.wait_ready()
    idle_rss = int(open(f"/proc/{baseline.pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    hog = spawn_group("--mb", "160", "--children", "2", "--child-mb", "20")
    hog.wait_ready()
    expected = 200 * MB + 3 * idle_rss

    d = daemon("serve", "--interval", "0.3s", "--gpu-backend", "none").wait_healthy()

    def scraped_rss():
        text = d.metrics()
        label = group_label_for_pgid(text, hog.pgid)
        return label and (
            label,
            metric_value(text, "mem_exporter_group_memory_bytes", group=label, memtype="rss"),
            metric_value(text, "mem_exporter_group_processes", group=label),
        )

    label, rss, processes = wait_for(scraped_rss, 10, what="the hog's group in /metrics")
    assert label.endswith(f"-{hog.pgid}")
    assert processes == 3
    assert abs(rss - expected) <= 0.10 * expected, f"rss {rss / MB:.1f} MiB vs expected {expected / MB:.1f} MiB"


@pytest.mark.integration
def test_landing_page_and_health(daemon):
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()
    status, body = http_get(d.url + "/")
    assert status == 200 and "/metrics" in body
    status, body = http_get(d.url + "/healthz")
    assert status == 200 and body.startswith("ok: last sample")
    assert http_get(d.url + "/nope")[0] == 404
    text = d.metrics()
    assert metric_value(text, "mem_exporter_source_up", source="procfs") == 1
    assert metric_value(text, "mem_exporter_system_memory_total_bytes") > 0
    assert metric_value(text, "process_resident_memory_bytes") > 0


@pytest.mark.integration
def test_sigterm_stops_within_a_second(daemon):
    d = daemon("serve", "--interval", "5s", "--gpu-backend", "none").wait_healthy()
    began = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(5) == 0
    assert time.monotonic() - began < 1.0


@pytest.mark.integration
def test_sigint_stops_cleanly(daemon):
    d = daemon("serve", "--gpu-backend", "none").wait_healthy()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(5) == 0


@pytest.mark.integration
def test_sighup_reloads_and_a_bad_reload_keeps_the_last_good_config(daemon, tmp_path, spawn_group):
    tag = "reload-" + uuid.uuid4().hex[:10]  # a match no other hog on this machine has
    hog = spawn_group("--mb", "20", "--tag", tag)
    hog.wait_ready()
    cfg = tmp_path / "config.yaml"
    cfg.write_text("interval: 0.3s\ngpu: {backend: none}\n")
    d = daemon("serve", "--config", str(cfg)).wait_healthy()
    wait_for(lambda: group_label_for_pgid(d.metrics(), hog.pgid), what="the hog's pgid group")

    named = (
        "interval: 0.3s\ngpu: {backend: none}\n"
        f"groups: {{named: [{{name: the-hog, match: {{cmdline: 'hog.py --mb 20 --tag {tag}'}}}}]}}\n"
    )
    cfg.write_text(named)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: metric_value(d.metrics(), "mem_exporter_group_processes", group="the-hog") == 1,
        what="the named group after a good reload",
    )

    cfg.write_text("interval: never\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in d.output(), what="the rejected reload in the log")
    assert f"{cfg}: line 1: interval: 'never' is not a duration" in d.output()
    time.sleep(0.7)  # two more ticks under the old config
    assert d.proc.poll() is None
    assert metric_value(d.metrics(), "mem_exporter_group_processes", group="the-hog") == 1


@pytest.mark.integration
def test_cannot_listen_is_one_line(tmp_path):
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "mem_exporter", "serve", "--gpu-backend", "none", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=Path(__file__).parents[1],
        )
    assert r.returncode == 1
    assert r.stderr.strip().endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
