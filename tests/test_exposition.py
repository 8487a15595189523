"""/metrics content: a golden file from a fixture /proc tree (the procfs reader), and promtool on real scrapes
once per source (procfs, and psutil forced with --source)."""

import dataclasses
import os
from pathlib import Path

import pytest
from helpers.golden import assert_golden, promtool_check, render
from helpers.procfs_builder import FakeProc

from mem_exporter.config import validate_config
from mem_exporter.gpu import open_gpu_source
from mem_exporter.sampler import Sampler

GPU_SCENARIO = Path(__file__).parent / "fixtures" / "gpu" / "golden-2cards.yaml"


def fixture_tree(root: Path) -> None:
    fp = FakeProc(root, total_kb=8_000_000, available_kb=2_000_000)
    fp.pressure(some=(12.5, 4.0, 1.25, 3_250_000), full=(2.0, 0.5, 0.0, 750_000))
    fp.add(1, "systemd", rss_kb=12_000)
    fp.add(2, "kthreadd", flags=0x00208040)
    fp.add(400, "bun", cmdline="bun test", rss_kb=300_000, pss_kb=250_000, swap_kb=1000)
    fp.add(401, "ollama", ppid=400, pgid=400, cmdline="ollama serve", rss_kb=2_000_000, pss_kb=1_900_000, swap_kb=0)
    fp.add(402, "bun", ppid=400, pgid=400, state="Z")
    fp.add(500, "postgres", rss_kb=150_000, pss_kb=60_000)
    fp.add(501, "postgres", ppid=500, pgid=500, rss_kb=150_000, pss_kb=60_000)
    for pid in range(600, 606):
        fp.add(pid, "sleep", rss_kb=1_000, pss_kb=800)


def golden_sample(tmp_path, **config):
    fixture_tree(tmp_path)
    cfg = validate_config({"paths": {"procfs": str(tmp_path)}, "gpu": {"backend": "none"}, **config})
    sample = Sampler(cfg, gpu=open_gpu_source(cfg.gpu.backend)).tick()
    return cfg, dataclasses.replace(sample, timestamp=1_700_000_000.0, duration_seconds=0.0125, cpu_usage_ratio=0.25)


@pytest.mark.parametrize(
    "name,config",
    [
        ("rss", {"groups": {"max_groups": 3, "min_memory": "5MB"}}),
        (
            "pss-named",
            {
                "memory": "pss",
                "groups": {
                    "named": [{"name": "db", "match": {"comm": "^postgres$"}}],
                    "max_groups": 2,
                    "cmdline_label": True,
                },
            },
        ),
    ],
)
def test_golden_metrics(tmp_path, name, config):
    cfg, sample = golden_sample(tmp_path, **config)
    assert_golden(render(sample, cfg), f"metrics-{name}.txt")


def test_golden_metrics_with_two_fake_gpus(tmp_path):
    cfg, sample = golden_sample(tmp_path, gpu={"backend": f"fake:{GPU_SCENARIO}"})
    text = render(sample, cfg)
    assert_golden(text, "metrics-gpu.txt")
    assert 'mem_exporter_group_gpu_memory_bytes{gpu="0",group="bun-400"} 8.05306368e+09' in text
    assert 'mem_exporter_gpu_power_watts{gpu="1"}' not in text  # not reported by that card: absent, not 0
    assert 'mem_exporter_gpu_temperature_celsius{gpu="1"} 35.0' in text


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["none", "auto", f"fake:{GPU_SCENARIO}"])
def test_a_real_scrape_passes_promtool(daemon, backend, source):
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", backend, "--source", source).wait_healthy()
    text = d.metrics()
    assert promtool_check(text) == ""
    from helpers.metrics import metric_value

    assert metric_value(text, "mem_exporter_source_up", source=source) == 1
    if backend == "auto":  # no NVIDIA driver on this machine: the GPU source is down, and says so
        from helpers.metrics import metric_value

        assert metric_value(text, "mem_exporter_source_up", source="gpu") == 0
        assert "mem_exporter_gpu_info" not in text
    if backend.startswith("fake:"):
        assert 'mem_exporter_gpu_info{driver_version="550.54.15",gpu="1",name="Tesla T4"' in text


@pytest.mark.integration
def test_serve_reports_a_spawned_group_within_ten_percent(daemon, spawn_group, source):
    from helpers.metrics import metric_value
    from helpers.waiting import wait_for

    hog = spawn_group("--mb", "200", "--children", "1", "--child-mb", "10")
    members = (hog.pid, *hog.wait_ready())
    resident = sum(int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") for pid in members)
    label = f"{open(f'/proc/{hog.pid}/comm').read().strip()}-{hog.pgid}"
    d = daemon("serve", "--interval", "0.3s", "--gpu-backend", "none", "--source", source).wait_healthy()
    value = wait_for(
        lambda: metric_value(d.metrics(), "mem_exporter_group_memory_bytes", group=label, memtype="rss"),
        what=f"group {label} on /metrics",
    )
    assert abs(value - resident) <= 0.10 * resident and value >= 210 * 1024 * 1024, (value, resident)
