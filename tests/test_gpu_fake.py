"""The fake GPU source: YAML scenarios replayed over time, and their validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mem_exporter.gpu import NoGpuSource, open_gpu_source
from mem_exporter.gpu.fake import FakeGpuSource, load_scenario
from mem_exporter.units import parse_hertz

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"
PACKAGED = Path(__file__).resolve().parents[1] / "mem_exporter" / "gpu" / "scenarios"
GIB = 1024**3
MIB = 1024**2
T0 = 5000.0  # any monotonic clock value: scenario time starts at the first read


def rotating() -> FakeGpuSource:
    return open_gpu_source(f"fake:{FIXTURES / 'rotating-12gb.yaml'}")


@pytest.mark.parametrize(
    "path", sorted(FIXTURES.glob("*.yaml")) + sorted(PACKAGED.glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_scenario_loads(path):
    scenario = load_scenario(path)
    assert scenario.cards and scenario.ats


def test_replay_over_time():
    src = rotating()
    assert src.name == "fake"
    idle = src.read(T0)
    assert idle.up and idle.error is None
    (c,) = idle.cards
    assert (c.name, c.uuid, c.driver_version) == (
        "NVIDIA GeForce RTX 3060",
        "GPU-3060aaaa-1111-4222-8333-444455556666",
        "550.54.15",
    )
    assert c.memory_total_bytes == 12 * GIB and c.memory_used_bytes == 0 and c.processes == ()
    assert c.power_limit_watts == 170 and c.clock_sm_max_hertz == 2_100_000_000

    (c,) = src.read(T0 + 25).cards  # llm active
    assert c.memory_used_bytes == int(7.5 * GIB)
    assert c.memory_free_bytes == 12 * GIB - int(7.5 * GIB) - 300 * MIB
    assert c.memory_reserved_bytes == 300 * MIB
    assert c.utilization_ratio == pytest.approx(0.92)
    assert c.power_watts == 165.5 and c.temperature_celsius == 71
    assert c.clock_sm_hertz == 1_980_000_000
    assert [(p.pid, p.gpu_memory_bytes, p.kind) for p in c.processes] == [(4101, int(7.5 * GIB), "compute")]

    (c,) = src.read(T0 + 45).cards  # the step at 40 s changes processes only; the rest carries forward
    assert [p.pid for p in c.processes] == [4101, 4102]
    assert c.memory_used_bytes == int(9 * GIB)
    assert c.temperature_celsius == 71 and c.clock_memory_hertz == 7_501_000_000


def test_loop_starts_over_and_without_loop_the_last_step_holds(tmp_path):
    src = rotating()
    src.read(T0)
    assert src.read(T0 + 125).cards[0].processes == ()  # 125 s = 5 s into the second round: idle
    assert [p.pid for p in src.read(T0 + 145).cards[0].processes] == [4101]  # = 25 s

    f = tmp_path / "once.yaml"
    f.write_text(
        "cards: [{memory_total: 8GiB}]\n"
        "steps:\n- {at: 0, cards: {0: {utilization: 10%}}}\n- {at: 10, cards: {0: {utilization: 90%}}}\n"
    )
    once = FakeGpuSource.from_file(f)
    once.read(T0)
    assert once.read(T0 + 1000).cards[0].utilization_ratio == pytest.approx(0.9)


def test_energy_is_power_integrated_over_reads():
    src = rotating()
    src.read(T0)  # 18 W until the step at 10 s
    assert src.read(T0 + 2).cards[0].energy_joules == pytest.approx(36.0)
    assert src.read(T0 + 4).cards[0].energy_joules == pytest.approx(72.0)


def test_a_lost_card_is_left_out_and_counted_until_it_comes_back():
    src = open_gpu_source(f"fake:{FIXTURES / 'lost.yaml'}")
    assert len(src.read(T0).cards) == 2
    r = src.read(T0 + 12)
    assert [c.index for c in r.cards] == [0] and not r.up
    assert "gpu 1" in r.error and "lost" in r.error
    assert src.read(T0 + 14).error  # every read while lost
    back = src.read(T0 + 21)
    assert back.up and back.error is None and [c.index for c in back.cards] == [0, 1]
    assert back.cards[1].processes == () and back.cards[1].power_watts == 40


def test_pid_self_is_the_exporter(tmp_path):
    f = tmp_path / "self.yaml"
    f.write_text(
        "cards: [{memory_total: 8GiB}]\n"
        "steps: [{at: 0, cards: {0: {processes: "
        "[{pid: self, gpu_memory: 1GiB}, {pid: 77, gpu_memory: null}]}}}]\n"
    )
    (c,) = FakeGpuSource.from_file(f).read(T0).cards
    assert [(p.pid, p.gpu_memory_bytes) for p in c.processes] == [(os.getpid(), GIB), (77, None)]
    assert c.memory_used_bytes == GIB


def test_before_the_first_step_only_static_values():
    src = FakeGpuSource(load_scenario(FIXTURES / "box-8x80gb.yaml"))
    r = src.read(T0)
    assert len(r.cards) == 8 and r.up
    assert [p.pid for p in r.cards[7].processes] == [5007, 6100, 6200]
    assert r.cards[7].processes[2].kind == "graphics"


CARD = "cards: [{memory_total: 12GiB}]\n"


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("- just a list\n", "", "must be a mapping"),
        ("cards: [{memory_total: 12GiB}]\ncolour: red\n", "colour", "unknown key"),
        ("loop: true\n", "cards", "required key is missing"),
        ("cards: []\n", "cards", "at least one card"),
        ("cards: [{name: x}]\n", "cards[0].memory_total", "required key is missing"),
        ("cards: [{memory_total: 12 potatoes}]\n", "cards[0].memory_total", "size"),
        ("cards: [{memory_total: 1GiB}, {index: 0, memory_total: 1GiB}]\n", "cards[1].index", "used twice"),
        ("cards: [{memory_total: 8GiB, clock_sm_max: 2THz}]\n", "cards[0].clock_sm_max", "unknown frequency unit"),
        ("cards: [{memory_total: 8GiB, power_limit: lots}]\n", "cards[0].power_limit", "not a power"),
        (CARD + "steps: [{at: 0, cards: {0: {utilization: 150%}}}]\n", "steps[0].cards.0.utilization", "outside 0..1"),
        (CARD + "steps: [{cards: {}}]\n", "steps[0].at", "required key is missing"),
        (CARD + "steps: [{at: 10}, {at: 5}]\n", "steps[1].at", "not after the previous step"),
        (CARD + "steps: [{at: 0, cards: {3: {}}}]\n", "steps[0].cards.3", "no card with index 3"),
        (CARD + "steps: [{at: 0, cards: {0: {temprature: 50}}}]\n", "steps[0].cards.0.temprature", "unknown key"),
        (CARD + "steps: [{at: 0, cards: {0: {lost: maybe}}}]\n", "steps[0].cards.0.lost", "not true or false"),
        (
            CARD + "steps: [{at: 0, cards: {0: {processes: [{pid: abc}]}}}]\n",
            "steps[0].cards.0.processes[0].pid",
            "not a process id",
        ),
        (
            CARD + "steps: [{at: 0, cards: {0: {processes: [{gpu_memory: 1GiB}]}}}]\n",
            "steps[0].cards.0.processes[0].pid",
            "required key is missing",
        ),
        (
            CARD + "steps: [{at: 0, cards: {0: {processes: [{pid: 1, kind: video}]}}}]\n",
            "steps[0].cards.0.processes[0].kind",
            "not compute or graphics",
        ),
        (CARD + "steps: [{at: 0, cards: {0: {memory_used: 13GiB}}}]\n", "steps[0].cards.0", "exceeds memory_total"),
        (
            CARD
            + "steps: [{at: 0, cards: {0: {processes: [{pid: 1, gpu_memory: 7GiB}, {pid: 2, gpu_memory: 6GiB}]}}}]\n",
            "steps[0].cards.0",
            "exceeds memory_total",
        ),
        (CARD + "loop: true\nsteps: [{at: 0}]\n", "duration", "needs a duration"),
        (CARD + "loop: true\nduration: 5s\nsteps: [{at: 0}, {at: 10s}]\n", "duration", "after the last step"),
        ("cards: [{memory_total: 12GiB}\n", "", "YAML syntax error"),
    ],
)
def test_bad_scenarios_fail_with_one_line_naming_file_and_key(tmp_path, text, key, problem):
    f = tmp_path / "scenario.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        open_gpu_source(f"fake:{f}")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{f}: ")
    if key:
        assert f": {key}: " in message
    assert problem in message


def test_missing_scenario_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=rf"^{missing}: cannot read: No such file"):
        open_gpu_source(f"fake:{missing}")


def test_other_backends():
    assert isinstance(open_gpu_source("none"), NoGpuSource)
    assert open_gpu_source("none").read(0.0).cards == ()
    with pytest.raises(ValueError, match="unknown gpu backend 'cuda'"):
        open_gpu_source("cuda")
    with pytest.raises(ValueError, match="unknown gpu backend"):
        open_gpu_source("fake:")


@pytest.mark.parametrize("text, hertz", [("1980MHz", 1.98e9), ("1.5 GHz", 1.5e9), (405, 405.0), ("810kHz", 810e3)])
def test_parse_hertz(text, hertz):
    assert parse_hertz(text) == pytest.approx(hertz)
