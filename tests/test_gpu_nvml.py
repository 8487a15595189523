"""The NVML source against a stubbed `pynvml` that raises the real NVMLError classes."""

from __future__ import annotations

import logging
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pynvml
import pytest
from helpers.nvml_stub import GIB, MIB, StubCard, StubNvml

from mem_exporter.gpu import GpuReading, open_gpu_source
from mem_exporter.gpu.nvml import NvmlSource

ROOT = Path(__file__).parents[1]

LOGGER = "mem_exporter.gpu"


def source(stub: StubNvml, **kw) -> NvmlSource:
    return NvmlSource(nvml=stub, **kw)


def notable(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.INFO]


def test_stub_raises_the_classes_the_bindings_build_from_codes():
    stub = StubNvml()
    stub.fail("nvmlDeviceGetCount", pynvml.NVML_ERROR_GPU_IS_LOST)
    stub.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        stub.nvmlDeviceGetCount()
    assert type(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)) is pynvml.NVMLError_NotSupported


def test_a_normal_card_in_base_units():
    stub = StubNvml([StubCard(compute=[(4242, 5 * GIB)])])
    r = source(stub).read(0.0)
    assert r == GpuReading(r.cards, True, None)
    (c,) = r.cards
    assert (c.index, c.uuid, c.name, c.driver_version) == (
        0,
        "GPU-5a1c2d3e-0000-4000-8000-000000000000",
        "NVIDIA GeForce RTX 3060",
        "550.54.15",
    )
    assert c.memory_total_bytes == 12 * GIB == 12_884_901_888
    assert c.memory_used_bytes == 5 * GIB
    assert c.memory_reserved_bytes == 300 * MIB
    assert c.memory_free_bytes == 12 * GIB - 5 * GIB - 300 * MIB
    assert c.utilization_ratio == pytest.approx(0.87)
    assert c.memory_utilization_ratio == pytest.approx(0.41)
    assert c.temperature_celsius == 66.0
    assert c.power_watts == pytest.approx(185.5)
    assert c.power_limit_watts == pytest.approx(170.0)
    assert c.energy_joules == pytest.approx(123_456.789)
    assert c.clock_sm_hertz == 1_980_000_000
    assert c.clock_memory_hertz == 7_501_000_000
    assert c.clock_sm_max_hertz == 2_100_000_000
    assert c.clock_memory_max_hertz == 7_501_000_000
    assert [(p.pid, p.gpu_memory_bytes, p.kind) for p in c.processes] == [(4242, 5 * GIB, "compute")]


def test_byte_strings_from_older_bindings_are_decoded():
    stub = StubNvml([StubCard(uuid=b"GPU-abc", name=b"Tesla T4")], driver=b"470.82.01")
    (c,) = source(stub).read(0.0).cards
    assert (c.uuid, c.name, c.driver_version) == ("GPU-abc", "Tesla T4", "470.82.01")


def test_not_supported_leaves_those_values_out_and_keeps_the_rest():
    card = StubCard()
    for fn in (
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetMaxClockInfo",
    ):
        card.fail(fn, pynvml.NVML_ERROR_NOT_SUPPORTED)
    stub = StubNvml([card])
    src = source(stub)
    r = src.read(0.0)
    assert r.up and r.error is None
    (c,) = r.cards
    assert c.power_watts is c.power_limit_watts is c.energy_joules is None
    assert c.clock_sm_hertz is c.clock_memory_hertz is None
    assert c.clock_sm_max_hertz is c.clock_memory_max_hertz is None
    assert c.memory_total_bytes == 12 * GIB and c.utilization_ratio == pytest.approx(0.87)
    assert c.temperature_celsius == 66.0
    # not supported does not change: the next read does not ask again
    stub.calls.clear()
    src.read(2.0)
    assert "nvmlDeviceGetPowerUsage" not in stub.calls and "nvmlDeviceGetClockInfo" not in stub.calls
    assert "nvmlDeviceGetTemperature" in stub.calls


def test_no_permission_is_a_missing_value_asked_again_next_time():
    card = StubCard(compute=[(1, GIB)])
    card.fail("nvmlDeviceGetComputeRunningProcesses", pynvml.NVML_ERROR_NO_PERMISSION)
    stub = StubNvml([card])
    src = source(stub)
    r = src.read(0.0)
    assert r.up and r.cards[0].processes == () and r.cards[0].memory_used_bytes == 5 * GIB
    card.fail("nvmlDeviceGetComputeRunningProcesses", None)
    assert [p.pid for p in src.read(2.0).cards[0].processes] == [1]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_library_or_driver_is_down_logged_once_and_not_an_error(caplog, code):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    stub = StubNvml()
    stub.fail("nvmlInit", code)
    src = source(stub)
    readings = [src.read(t * 2.0) for t in range(200)]  # retries reach retry_max (60 s) on the way
    assert all(r == GpuReading((), False, None) for r in readings)
    (record,) = notable(caplog)
    assert record.levelno == logging.INFO
    assert 'source_up{source="gpu"} is 0' in record.getMessage()
    # probed again now and then, not every tick
    assert 5 < stub.calls.count("nvmlInit") < 20


def test_explicit_nvml_without_a_driver_warns_once(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    stub = StubNvml()
    stub.fail("nvmlInit", pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    src = source(stub, absent_level=logging.WARNING)
    for t in range(50):
        assert not src.read(float(t)).up
    assert [r.levelno for r in notable(caplog)] == [logging.WARNING]


def test_a_driver_loaded_later_is_picked_up(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stub = StubNvml()
    stub.fail("nvmlInit", pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    src = source(stub, retry_max=10)
    assert not src.read(0.0).up
    stub.fail("nvmlInit", None)
    assert not src.read(0.5).up  # still backing off
    r = src.read(1.0)
    assert r.up and len(r.cards) == 1
    assert "NVML up" in notable(caplog)[-1].getMessage()


def test_real_bindings_on_a_host_without_a_driver(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    src = open_gpu_source("auto")
    try:
        first = src.read(1e6)
        if first.up:
            pytest.skip("this host has a working NVIDIA driver")
        for t in range(1, 30):
            assert src.read(1e6 + 2 * t) == GpuReading((), False, None)
    finally:
        src.close()
    assert src.name == "nvml"
    assert len(notable(caplog)) == 1


def test_without_the_nvml_library_the_bindings_are_never_imported():
    """A Linux host with no NVIDIA driver (most laptops) pays neither the import nor the memory of pynvml."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); from mem_exporter.gpu import open_gpu_source; "
        "s = open_gpu_source('auto'); "
        "r = [s.read(1e6 + t) for t in range(3)]; print(any(x.up for x in r), 'pynvml' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.split()[0] == "True":
        pytest.skip("this host has a working NVIDIA driver")
    assert out.stdout.split() == ["False", "False"]
    assert "NVML not available (NvmlLibraryMissing: libnvidia-ml.so.1" in out.stderr


def test_gpu_lost_mid_run_backs_off_without_calling_nvml_then_recovers(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stub = StubNvml()
    src = source(stub, retry_max=60)
    assert src.read(0.0).up
    stub.cards[0].lost = True

    lost = src.read(2.0)
    assert not lost.up and lost.cards == ()
    assert "gpu 0" in lost.error and "GPU is lost" in lost.error

    calls = len(stub.calls)
    for t in (2.2, 2.5, 2.99):  # backoff is 1 s after the first failure
        assert src.read(t) == GpuReading((), False, None)
    assert len(stub.calls) == calls

    assert src.read(3.0).error  # retried: re-initialised, still lost; next wait 2 s
    assert stub.calls.count("nvmlInit") == 2
    calls = len(stub.calls)
    assert src.read(4.9) == GpuReading((), False, None)
    assert len(stub.calls) == calls

    stub.cards[0].lost = False
    back = src.read(5.0)
    assert back.up and back.error is None and back.cards[0].memory_total_bytes == 12 * GIB
    messages = [r.getMessage() for r in notable(caplog)]
    assert sum("GPU is lost" in m for m in messages) == 1  # warned once, retries at debug
    assert "is back" in messages[-1]


def test_backoff_doubles_up_to_retry_max():
    stub = StubNvml()
    src = source(stub, retry_max=5)
    src.read(0.0)
    stub.cards[0].lost = True
    attempts = []
    t = 0.0
    while t < 40:
        t = round(t + 0.1, 1)
        if src.read(t).error:
            attempts.append(t)
    gaps = [round(b - a, 1) for a, b in pairwise(attempts)]
    assert gaps[:4] == [1.0, 2.0, 4.0, 5.0]
    assert set(gaps[3:]) == {5.0}


def test_one_lost_card_of_two_leaves_the_other_read_every_tick():
    stub = StubNvml([StubCard(uuid="GPU-a"), StubCard(uuid="GPU-b")])
    src = source(stub)
    assert len(src.read(0.0).cards) == 2
    stub.cards[1].lost = True
    r = src.read(2.0)
    assert [c.uuid for c in r.cards] == ["GPU-a"] and not r.up and "gpu 1 (GPU-b)" in r.error
    r = src.read(2.5)  # card 1 still backing off: the other card is read, nothing counted
    assert [c.uuid for c in r.cards] == ["GPU-a"] and not r.up and r.error is None


def test_unknown_error_on_a_card_takes_the_error_path():
    stub = StubNvml()
    src = source(stub)
    src.read(0.0)
    stub.cards[0].fail("nvmlDeviceGetMemoryInfo_v2", pynvml.NVML_ERROR_UNKNOWN)
    r = src.read(2.0)
    assert not r.up and "NVMLError_Unknown" in r.error
    stub.cards[0].fail("nvmlDeviceGetMemoryInfo_v2", None)
    assert src.read(3.0).up


def test_nvml_failing_as_a_whole_is_counted_and_retried():
    stub = StubNvml()
    src = source(stub)
    src.read(0.0)
    stub.cards[0].fail("nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_UNINITIALIZED)
    r = src.read(2.0)
    assert r.cards == () and not r.up and "Uninitialized" in r.error
    calls = len(stub.calls)
    assert src.read(2.5) == GpuReading((), False, None) and len(stub.calls) == calls
    stub.cards[0].fail("nvmlDeviceGetUtilizationRates", None)
    assert src.read(3.0).up
    assert stub.initialised == 1  # every init was matched by a shutdown


def test_init_failure_met_at_start_is_counted_by_the_first_read():
    stub = StubNvml()
    stub.fail("nvmlInit", pynvml.NVML_ERROR_NO_PERMISSION)
    src = source(stub)
    src.start(0.0)
    first = src.read(0.1)
    assert not first.up and "Insufficient Permissions" in first.error
    assert src.read(0.2).error is None


def test_a_non_nvml_exception_never_escapes(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stub = StubNvml()
    stub.nvmlDeviceGetCount = lambda: 1 / 0
    r = source(stub).read(0.0)
    assert not r.up and "ZeroDivisionError" in r.error
    assert notable(caplog)[0].exc_info is not None


def test_empty_process_lists():
    (c,) = source(StubNvml([StubCard()])).read(0.0).cards
    assert c.processes == ()


def test_busy_process_lists():
    not_available = 2**64 - 1  # what bindings without the conversion hand back
    card = StubCard(
        compute=[(300, 2 * GIB), (100, None), (200, not_available), (400, 512 * MIB)],
        graphics=[(400, 512 * MIB), (500, 64 * MIB)],  # 400 uses both: listed twice by NVML
    )
    (c,) = source(StubNvml([card])).read(0.0).cards
    assert [(p.pid, p.gpu_memory_bytes, p.kind) for p in c.processes] == [
        (100, None, "compute"),
        (200, None, "compute"),
        (300, 2 * GIB, "compute"),
        (400, 512 * MIB, "compute"),
        (500, 64 * MIB, "graphics"),
    ]


def test_bindings_without_the_v2_memory_call():
    stub = StubNvml(memory_v2=False)
    (c,) = source(stub).read(0.0).cards
    assert c.memory_reserved_bytes is None
    assert c.memory_used_bytes == 5 * GIB + 300 * MIB  # v1 counts reserved memory as used
    assert c.memory_total_bytes == 12 * GIB
    assert "nvmlDeviceGetMemoryInfo_v2" not in stub.calls


def test_driver_without_the_v2_memory_call_falls_back_once():
    card = StubCard()
    card.fail("nvmlDeviceGetMemoryInfo_v2", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    stub = StubNvml([card])
    src = source(stub)
    for t in range(3):
        (c,) = src.read(float(t)).cards
        assert c.memory_reserved_bytes is None and c.memory_used_bytes == 5 * GIB + 300 * MIB
    assert stub.calls.count("nvmlDeviceGetMemoryInfo_v2") == 1
    assert stub.calls.count("nvmlDeviceGetMemoryInfo") == 3


def test_close_shuts_nvml_down():
    stub = StubNvml()
    src = source(stub)
    src.read(0.0)
    src.close()
    assert stub.initialised == 0


def test_only_the_nvml_module_imports_pynvml():
    root = Path(__file__).resolve().parents[1] / "mem_exporter"
    importers = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "import pynvml" in p.read_text() or "from pynvml" in p.read_text()
    )
    assert importers == ["gpu/nvml.py"]


def test_bindings_not_installed_is_absent(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    src = NvmlSource()
    assert [src.read(float(t)) for t in range(10)] == [GpuReading((), False, None)] * 10
    assert len(notable(caplog)) == 1 and "NVML not available" in notable(caplog)[0].getMessage()
