"""NVIDIA health: throttle reasons, XID events, ECC, performance state and MIG memory, from a stubbed pynvml
(the real NVMLError classes), and the series they become (exact names: dashboards and alerts use them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers.golden import assert_golden, render
from helpers.nvml_stub import GIB, StubCard, StubNvml
from helpers.procfs_builder import FakeProc

from mem_exporter.config import validate_config
from mem_exporter.gpu import open_gpu_source
from mem_exporter.gpu.fake import ScenarioError, parse_scenario
from mem_exporter.gpu.nvml import THROTTLE_REASONS, NvmlSource
from mem_exporter.sampler import Sampler

FIXTURES = Path(__file__).parent / "fixtures"


def card_of(stub: StubNvml, src: NvmlSource, now: float = 0.0, index: int = 0):
    reading = src.read(now)
    assert reading.up, reading.error
    return reading.cards[index]


def test_throttle_reasons_name_every_supported_reason_with_its_state():
    stub = StubNvml([StubCard(throttle=0x4 | 0x20, throttle_supported=0x1FF & ~0x100)])
    c = card_of(stub, NvmlSource(nvml=stub))
    reasons = dict(c.throttle_reasons)
    assert [r for r, on in c.throttle_reasons if on] == ["sw_power_cap", "sw_thermal"]
    assert "display_clocks" not in reasons and len(reasons) == len(THROTTLE_REASONS) - 1


def test_throttle_reasons_through_the_older_call_name():
    stub = StubNvml([StubCard()])
    stub.nvmlDeviceGetCurrentClocksEventReasons = None  # bindings before the rename
    stub.nvmlDeviceGetSupportedClocksEventReasons = None
    stub.nvmlDeviceGetCurrentClocksThrottleReasons = lambda card: 0x40
    c = card_of(stub, NvmlSource(nvml=stub))
    assert [r for r, on in c.throttle_reasons if on] == ["hw_thermal"] and len(c.throttle_reasons) == 9


def test_xid_events_are_counted_per_card_registered_once_and_polled_without_blocking():
    a, b = StubCard(uuid="GPU-a"), StubCard(uuid="GPU-b")
    stub = StubNvml([a, b])
    waits = []
    wait = stub.nvmlEventSetWait_v2
    stub.nvmlEventSetWait_v2 = lambda s, timeout: (waits.append(timeout), wait(s, timeout))[1]
    src = NvmlSource(nvml=stub)
    first = src.read(0.0)
    assert [(c.xid_errors_total, c.last_xid) for c in first.cards] == [(0, 0), (0, 0)]
    stub.xid(b, 79)
    stub.xid(b, 48)
    stub.xid(a, 13)
    second = src.read(2.0)
    assert [(c.xid_errors_total, c.last_xid) for c in second.cards] == [(1, 13), (2, 48)]
    src.read(4.0)
    assert stub.calls.count("nvmlDeviceRegisterEvents") == 2  # once per card, not per read
    assert set(waits) == {0}  # never blocks the sampler


def test_xid_counts_survive_a_lost_card_and_the_reinit():
    card = StubCard()
    stub = StubNvml([card])
    src = NvmlSource(nvml=stub)
    src.read(0.0)
    stub.xid(card, 79)
    assert card_of(stub, src, 1.0).xid_errors_total == 1
    card.lost = True
    assert not src.read(2.0).up
    card.lost = False
    stub.xid(card, 31)
    c = card_of(stub, src, 10.0)  # re-initialised: a new event set, the count goes on
    assert (c.xid_errors_total, c.last_xid) == (2, 31)
    assert stub.calls.count("nvmlEventSetFree") == 1 and stub.calls.count("nvmlEventSetCreate") == 2


def test_a_card_without_xid_events_has_no_xid_series():
    stub = StubNvml([StubCard()])
    stub.cards[0].fail("nvmlDeviceRegisterEvents", stub.NVML_ERROR_NOT_SUPPORTED)
    c = card_of(stub, NvmlSource(nvml=stub))
    assert (c.xid_errors_total, c.last_xid) == (None, None)


@pytest.mark.parametrize("ecc,expected", [(None, (None, None)), (False, (None, None)), (True, (3, 1))])
def test_ecc_counts_only_where_ecc_is_on(ecc, expected):
    stub = StubNvml([StubCard(ecc=ecc, ecc_corrected=3, ecc_uncorrected=1)])
    c = card_of(stub, NvmlSource(nvml=stub))
    assert (c.ecc_corrected_total, c.ecc_uncorrected_total) == expected


@pytest.mark.parametrize("pstate,expected", [(0, 0), (8, 8), (32, None)])
def test_performance_state(pstate, expected):
    stub = StubNvml([StubCard(pstate=pstate)])
    assert card_of(stub, NvmlSource(nvml=stub)).performance_state == expected


def test_mig_memory_per_gpu_instance_once_however_many_compute_instances():
    stub = StubNvml([StubCard(mig=[(1, 9 * GIB, 40 * GIB), (1, 9 * GIB, 40 * GIB), (2, 1 * GIB, 20 * GIB)])])
    c = card_of(stub, NvmlSource(nvml=stub))
    assert [(m.mig, m.memory_used_bytes, m.memory_total_bytes) for m in c.mig] == [
        ("1", 9 * GIB, 40 * GIB),
        ("2", 1 * GIB, 20 * GIB),
    ]
    plain = StubNvml([StubCard()])
    assert card_of(plain, NvmlSource(nvml=plain)).mig == ()


def test_nvidia_cards_say_vendor_and_bus_id_as_sysfs_writes_it():
    stub = StubNvml([StubCard(pci_bus_id="00000000:41:00.0")])
    c = card_of(stub, NvmlSource(nvml=stub))
    assert (c.vendor, c.pci_bus_id) == ("nvidia", "0000:41:00.0")


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("throttle", "[too_hot]", "is not a reason"),
        ("performance_state", "P16", "is not a performance state"),
        ("xid_errors", "-1", "is not a count"),
        ("mig", "[{mig: '1'}]", "memory_total: required key is missing"),
    ],
)
def test_bad_health_values_in_a_scenario_name_the_key(key, value, problem):
    import yaml

    data = yaml.safe_load(f"cards: [{{memory_total: 1GiB}}]\nsteps: [{{at: 0, cards: {{0: {{{key}: {value}}}}}}}]")
    with pytest.raises(ScenarioError, match=problem) as e:
        parse_scenario(data, "s.yaml")
    assert str(e.value).startswith("s.yaml: steps[0].cards.0.")


def test_health_series_golden_and_promtool(tmp_path):
    FakeProc(tmp_path).add(1, "systemd")
    scenario = FIXTURES / "gpu" / "health.yaml"
    cfg = validate_config({"paths": {"procfs": str(tmp_path)}, "gpu": {"backend": f"fake:{scenario}"}})
    sample = Sampler(cfg, gpu=open_gpu_source(cfg.gpu.backend)).tick()
    sample = dataclasses.replace(sample, timestamp=1_700_000_000.0, duration_seconds=0.0125, cpu_usage_ratio=0.25)
    text = render(sample, cfg)
    assert_golden(text, "metrics-gpu-health.txt")
    for line in (
        'mem_exporter_gpu_throttle_active{gpu="0",reason="sw_thermal"} 1.0',
        'mem_exporter_gpu_throttle_active{gpu="0",reason="hw_thermal"} 0.0',
        'mem_exporter_gpu_xid_errors_total{gpu="0"} 2.0',
        'mem_exporter_gpu_last_xid{gpu="0"} 79.0',
        'mem_exporter_gpu_ecc_errors_total{gpu="0",type="corrected"} 12.0',
        'mem_exporter_gpu_ecc_errors_total{gpu="0",type="uncorrected"} 0.0',
        'mem_exporter_gpu_performance_state{gpu="1"} 8.0',
        'mem_exporter_gpu_mig_memory_used_bytes{gpu="0",mig="1"} 9.663676416e+09',
        'mem_exporter_gpu_mig_memory_total_bytes{gpu="0",mig="2"} 2.147483648e+10',
    ):
        assert line in text
    assert 'mem_exporter_gpu_xid_errors_total{gpu="1"}' not in text  # not offered: absent, not 0
