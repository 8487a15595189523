"""Replays a YAML scenario of GPU cards over time, for machines without an NVIDIA GPU.

Tests, the compose lab and dashboards use it (`gpu.backend: fake:FILE`). The format is described
in docs/gpu.md; in short:

    loop: true
    duration: 120s                   # required with loop: the scenario starts over after this
    cards:
      - {name: Fake RTX 3060, memory_total: 12GiB, power_limit: 170, clock_sm_max: 2100MHz}
    steps:                           # at: seconds since the first read
      - at: 0
        cards: {0: {utilization: 3%, power: 22, processes: [{pid: self, gpu_memory: 300MiB}]}}
      - at: 60s
        cards: {0: {lost: true}}

Values carry forward from step to step until a later step changes them. A scenario is checked
whole at load; a problem raises ValueError with one line naming the file and the key.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..sample import GpuCard, GpuMigInstance, GpuProcess
from ..units import parse_duration, parse_hertz, parse_ratio, parse_size, read_yaml
from .source import GpuReading


class ScenarioError(ValueError):
    """A bad scenario: `str(e)` is one line, `file: key: problem`."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _watts(value: Any) -> float:
    """Watts from `185.5`, `185.5W` or `500mW`."""
    if isinstance(value, str):
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(W|mW)?\s*$", value)
        if not m:
            raise ValueError(f"{value!r} is not a power (examples: 185.5, '185.5W', '500mW')")
        return float(m.group(1)) * (1e-3 if m.group(2) == "mW" else 1.0)
    watts = _number(value)
    if watts < 0:
        raise ValueError(f"{value!r}: a power cannot be negative")
    return watts


def _text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a card index (0, 1, ...)")
    return value


# key -> parser, for each level of the scenario
_TOP = {
    "description": _text,
    "loop": _flag,
    "duration": parse_duration,
    "driver_version": _text,
    "cards": None,
    "steps": None,
}
_CARD = {
    "index": _index,
    "uuid": _text,
    "name": _text,
    "driver_version": _text,
    "vendor": _text,
    "pci_bus_id": _text,
    "memory_total": parse_size,
    "memory_reserved": parse_size,
    "power_limit": _watts,
    "clock_sm_max": parse_hertz,
    "clock_memory_max": parse_hertz,
}
_STEP = {"at": parse_duration, "cards": None}
_VALUES = {
    "lost": _flag,
    "memory_used": parse_size,
    "utilization": parse_ratio,
    "memory_utilization": parse_ratio,
    "temperature": _number,
    "power": _watts,
    "clock_sm": parse_hertz,
    "clock_memory": parse_hertz,
    "processes": None,
    "throttle": None,
    "xid_errors": None,
    "last_xid": None,
    "ecc_corrected": None,
    "ecc_uncorrected": None,
    "performance_state": None,
    "mig": None,
}
_MIG = {"mig": _text, "memory_used": parse_size, "memory_total": parse_size}


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count (0, 1, ...)")
    return value


def _pstate(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"P\d+", value):
        value = int(value[1:])
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 15:
        raise ValueError(f"{value!r} is not a performance state (0..15 or P0..P15)")
    return value


_PROCESS = {"pid": None, "gpu_memory": parse_size, "kind": None}


class _Checker:
    """Reads one scenario, turning any problem into a ScenarioError naming the file and key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {key}: {problem}" if key else f"{self.source}: {problem}")

    def mapping(
        self,
        data: Any,
        key: str,
        allowed: dict[str, Any],
        required: tuple[str, ...] = (),
        nullable: tuple[str, ...] = (),
    ) -> dict:
        if not isinstance(data, dict):
            raise self.fail(key, f"must be a mapping of keys, got {type(data).__name__}")
        for k in data:
            if k not in allowed:
                raise self.fail(_join(key, k), f"unknown key (known: {', '.join(allowed)})")
        for k in required:
            if k not in data:
                raise self.fail(_join(key, k), "required key is missing")
        out = {}
        for k, v in data.items():
            parse = allowed[k]
            out[k] = v if parse is None or (v is None and k in nullable) else self.value(v, _join(key, k), parse)
        return out

    def value(self, value: Any, key: str, parse: Callable[[Any], Any]) -> Any:
        if value is None:
            raise self.fail(key, "needs a value")
        try:
            return parse(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def sequence(self, data: Any, key: str) -> list:
        if not isinstance(data, list):
            raise self.fail(key, f"must be a list, got {type(data).__name__}")
        return data


def _join(key: str, part: Any) -> str:
    return f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))


@dataclass(frozen=True)
class Scenario:
    source: str
    loop: bool
    duration: float | None
    cards: tuple[GpuCard, ...]  # static fields only
    ats: tuple[float, ...]  # step offsets, increasing
    # per step: card index -> (the card at that step without energy, lost)
    states: tuple[dict[int, tuple[GpuCard, bool]], ...]

    def at(self, offset: float) -> dict[int, tuple[GpuCard, bool]]:
        """Every card as the scenario has it `offset` seconds after the first read."""
        if self.loop and self.duration:
            offset %= self.duration
        i = bisect.bisect_right(self.ats, offset) - 1
        if i < 0:
            return {c.index: (c, False) for c in self.cards}
        return self.states[i]


def load_scenario(path: str | os.PathLike) -> Scenario:
    try:
        data = read_yaml(path)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    return parse_scenario(data, str(path))


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    ck = _Checker(source)
    top = ck.mapping(data, "", _TOP, required=("cards",))
    loop = top.get("loop", False)
    duration = top.get("duration")
    driver = top.get("driver_version", "fake")

    cards: dict[int, GpuCard] = {}
    for i, raw in enumerate(ck.sequence(top["cards"], "cards")):
        key = f"cards[{i}]"
        c = ck.mapping(raw, key, _CARD, required=("memory_total",))
        index = c.get("index", i)
        if index in cards:
            raise ck.fail(f"{key}.index", f"card index {index} is used twice")
        cards[index] = GpuCard(
            index=index,
            uuid=c.get("uuid", f"GPU-fa4e0000-0000-4000-8000-{index:012d}"),
            name=c.get("name", "Fake GPU"),
            driver_version=c.get("driver_version", driver),
            vendor=c.get("vendor", "nvidia"),
            pci_bus_id=c.get("pci_bus_id", ""),
            memory_total_bytes=c["memory_total"],
            memory_reserved_bytes=c.get("memory_reserved"),
            power_limit_watts=c.get("power_limit"),
            clock_sm_max_hertz=c.get("clock_sm_max"),
            clock_memory_max_hertz=c.get("clock_memory_max"),
        )
    if not cards:
        raise ck.fail("cards", "needs at least one card")

    ats: list[float] = []
    states: list[dict[int, tuple[GpuCard, bool]]] = []
    values: dict[int, dict[str, Any]] = {index: {} for index in cards}  # carried forward
    for s, raw in enumerate(ck.sequence(top.get("steps", []), "steps")):
        key = f"steps[{s}]"
        step = ck.mapping(raw, key, _STEP, required=("at",))
        at = step["at"]
        if at < 0:
            raise ck.fail(f"{key}.at", "cannot be negative")
        if ats and at <= ats[-1]:
            raise ck.fail(f"{key}.at", f"{at:g}s is not after the previous step ({ats[-1]:g}s)")
        changes = step.get("cards") or {}
        if not isinstance(changes, dict):
            raise ck.fail(f"{key}.cards", "must be a mapping of card index to values")
        for index, given in changes.items():
            ckey = f"{key}.cards.{index}"
            if index not in cards:
                raise ck.fail(ckey, f"no card with index {index!r} in cards")
            v = ck.mapping(given or {}, ckey, _VALUES)
            if "processes" in v:
                v["processes"] = _processes(ck, v["processes"], f"{ckey}.processes")
            _health(ck, v, ckey)
            values[index].update(v)
            _check_memory(ck, cards[index], values[index], ckey)
        ats.append(at)
        states.append({index: _card_at(card, values[index]) for index, card in cards.items()})

    if loop:
        if duration is None:
            raise ck.fail("duration", "loop: true needs a duration (how long before the scenario starts over)")
        if ats and duration <= ats[-1]:
            raise ck.fail("duration", f"{duration:g}s must be after the last step ({ats[-1]:g}s)")
    return Scenario(source, loop, duration, tuple(cards.values()), tuple(ats), tuple(states))


def _processes(ck: _Checker, data: Any, key: str) -> tuple[GpuProcess, ...]:
    out = []
    for i, raw in enumerate(ck.sequence(data or [], key)):
        pkey = f"{key}[{i}]"
        p = ck.mapping(raw, pkey, _PROCESS, required=("pid",), nullable=("gpu_memory",))
        pid = p["pid"]
        if pid == "self":  # the exporter itself: shows up in its own group's GPU memory
            pid = os.getpid()
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ck.fail(f"{pkey}.pid", f"{p['pid']!r} is not a process id (a positive integer or 'self')")
        kind = p.get("kind", "compute")
        if kind not in ("compute", "graphics"):
            raise ck.fail(f"{pkey}.kind", f"{kind!r} is not compute or graphics")
        out.append(GpuProcess(pid, p.get("gpu_memory"), kind))
    return tuple(out)


def _health(ck: _Checker, v: dict[str, Any], key: str) -> None:
    """NVIDIA health values of one step, checked and turned into GpuCard fields (in place)."""
    from .nvml import THROTTLE_REASONS

    if "throttle" in v:
        active = ck.sequence(v["throttle"] or [], f"{key}.throttle")
        for i, reason in enumerate(active):
            if reason not in THROTTLE_REASONS:
                raise ck.fail(f"{key}.throttle[{i}]", f"{reason!r} is not a reason ({', '.join(THROTTLE_REASONS)})")
        v["throttle"] = tuple((r, r in active) for r in THROTTLE_REASONS)
    for k in ("xid_errors", "last_xid", "ecc_corrected", "ecc_uncorrected"):
        if k in v:
            v[k] = ck.value(v[k], f"{key}.{k}", _count)
    if "performance_state" in v:
        v["performance_state"] = ck.value(v["performance_state"], f"{key}.performance_state", _pstate)
    if "mig" in v:
        out = []
        for i, raw in enumerate(ck.sequence(v["mig"] or [], f"{key}.mig")):
            m = ck.mapping(raw, f"{key}.mig[{i}]", _MIG, required=("mig", "memory_total"))
            out.append(GpuMigInstance(m["mig"], m.get("memory_used"), m["memory_total"]))
        v["mig"] = tuple(out)


def _check_memory(ck: _Checker, card: GpuCard, values: dict[str, Any], key: str) -> None:
    total = card.memory_total_bytes or 0
    used = _used(values)
    if used is not None and used + (card.memory_reserved_bytes or 0) > total:
        what = "memory_used" if "memory_used" in values else "processes (summed gpu_memory)"
        raise ck.fail(key, f"{what} {used} B (plus memory_reserved) exceeds memory_total {total} B")


def _used(values: dict[str, Any]) -> int | None:
    # memory_used, when never given, is what the processes hold
    if "memory_used" in values:
        return values["memory_used"]
    procs = values.get("processes")
    if procs is None:
        return None
    return sum(p.gpu_memory_bytes or 0 for p in procs)


def _card_at(card: GpuCard, v: dict[str, Any]) -> tuple[GpuCard, bool]:
    used = _used(v)
    # memory_total is required of every fake card
    free = None if used is None else (card.memory_total_bytes or 0) - used - (card.memory_reserved_bytes or 0)
    return replace(
        card,
        memory_used_bytes=used,
        memory_free_bytes=free,
        utilization_ratio=v.get("utilization"),
        memory_utilization_ratio=v.get("memory_utilization"),
        temperature_celsius=v.get("temperature"),
        power_watts=v.get("power"),
        clock_sm_hertz=v.get("clock_sm"),
        clock_memory_hertz=v.get("clock_memory"),
        processes=v.get("processes", ()),
        throttle_reasons=v.get("throttle", ()),
        xid_errors_total=v.get("xid_errors"),
        last_xid=v.get("last_xid"),
        ecc_corrected_total=v.get("ecc_corrected"),
        ecc_uncorrected_total=v.get("ecc_uncorrected"),
        performance_state=v.get("performance_state"),
        mig=v.get("mig", ()),
    ), v.get("lost", False)


class FakeGpuSource:
    """A GpuSource replaying a Scenario; time starts at the first read.

    A lost card is left out of the reading, which is then up=False with an error, on every read
    while it is lost (the fake does not back off). Energy is power integrated over read time.
    """

    name = "fake"

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self._start: float | None = None
        self._last: float | None = None
        self._energy: dict[int, float] = {}
        self._power: dict[int, float | None] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FakeGpuSource:
        return cls(load_scenario(path))

    def read(self, now: float) -> GpuReading:
        if self._start is None:
            self._start = self._last = now
        elapsed = max(0.0, now - (self._last or now))
        self._last = now
        cards, errors = [], []
        for index, (card, lost) in self.scenario.at(now - self._start).items():
            # energy from the power held since the previous read (a lost card draws nothing we see)
            prev = self._power.get(index)
            if prev is not None:
                self._energy[index] = self._energy.get(index, 0.0) + prev * elapsed
            self._power[index] = None if lost else card.power_watts
            if lost:
                errors.append(f"gpu {index} ({card.uuid}): GPU is lost (fake scenario)")
                continue
            energy = self._energy.setdefault(index, 0.0) if card.power_watts is not None else self._energy.get(index)
            cards.append(replace(card, energy_joules=energy))
        return GpuReading(tuple(cards), not errors, "; ".join(errors) or None)

    def close(self) -> None:
        pass
