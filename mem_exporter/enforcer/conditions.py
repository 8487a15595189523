"""Rule conditions: one class each, and the one place that knows them by name.

A condition says
- its config key (`field`), its value's type and checks, and the description the schema shows;
- how it is judged on a sample (`decide`, through `policy.Pass`, so protection, other users, dry
  run, `for:` and cooldowns hold alike for every condition) and under which cooldown key;
- its `lane`: which loop of the enforcer judges it between full samples (daemon.py);
- what a sample must carry for it (`cgroup_pressure`), and how a report shows its limit.

`@condition` registers a class: config.Rule gains its key (in registration order), `policy.decide()`
judges it, the enforcer routes its rules by its lane. Nothing else needs its name.

Cooldown keys: a per-group condition (max_rss, max_pss, max_gpu_memory) cools down per group, so a
second runaway under the same rule is still stopped at once; `gpu_memory_above` per card;
`system_available_below`, `memory_pressure_above` and `system_pressure_level` per rule (memory freed
by a kill takes a moment to show, and a second victim must not follow on stale numbers).

This module imports nothing of the config or the enforcer at run time: config.py builds its Rule
from the conditions registered here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..config_types import Duration, Ratio, Size, SizeOrRatio
from ..platforms.macos import LEVEL_OF_NAME
from ..pressure import StallWindow
from ..sample import GroupSample, SystemMemory

if TYPE_CHECKING:
    from ..config import Config, Rule
    from .policy import Action, Pass, RuleState

# Lanes: what judges a condition between full samples (every condition is judged on each full sample).
FAST = "fast"  # groups near their limit re-read, newcomers read as they start (lane.FastLane)
SYSTEM = "system"  # system memory read at a pace set by its headroom (lane.SYSTEM_PACE)
PRESSURE = "pressure"  # PSI, through kernel triggers where granted (pressure.PressureWatches)
SAMPLE = "sample"  # nothing between samples: judged on each sample the sampler hands over

ALL: list[Condition] = []  # in registration order: the order of config.Rule's keys
_BY_FIELD: dict[str, Condition] = {}

C = TypeVar("C", bound="type[Condition]")


def condition(cls: C) -> C:
    """Register a condition class (one instance of it judges every rule that has its key). config.Rule
    is built from the conditions registered when config.py is first imported: register before that."""
    if cls.field in _BY_FIELD:
        raise ValueError(f"a condition named {cls.field!r} is registered already")
    if getattr(sys.modules.get("mem_exporter.config"), "Rule", None) is not None:
        raise RuntimeError(f"condition {cls.field!r} registered after config.Rule was built: no rule could have it")
    instance = cls()
    ALL.append(instance)
    _BY_FIELD[cls.field] = instance
    return cls


def of(rule: Rule) -> Condition:
    """The condition a rule has."""
    return _BY_FIELD[rule.condition]


def named(name: str) -> Condition | None:
    """The condition with this config key (an event's `condition`); None for what no rule has (`run`'s)."""
    return _BY_FIELD.get(name)


def in_lane(rules: list[Rule], lane: str) -> list[Rule]:
    return [r for r in rules if of(r).lane == lane]


def _above_zero(v: float | None) -> float | None:
    if v is not None and v <= 0:  # a zero limit would hold every group over it
        raise ValueError(f"must be above 0, got {v:g}")
    return v


class Condition:
    field: ClassVar[str]  # the rule's config key
    annotation: ClassVar[Any]  # the key's type, None included, with its checks
    description: ClassVar[str]
    lane: ClassVar[str] = SAMPLE
    per_group: ClassVar[bool] = False  # each selected group against its own limit; judged on partial samples too
    memtype: ClassVar[str] = ""  # per-group limits: which memory the limit series is of (rss, pss, gpu)
    key: ClassVar[str] = ""  # the cooldown key of a condition judged once per rule

    def config_field(self) -> tuple[Any, Any]:
        """The pydantic field config.Rule has for this condition."""
        return self.annotation, Field(None, description=self.description)

    def config_problem(self, config: Config) -> str | None:
        """What the rest of the config must give for this condition, when it does not."""
        return None

    def value(self, rule: Rule) -> Any:
        return getattr(rule, self.field)

    def decide(self, rule: Rule, rs: RuleState, p: Pass) -> None:
        """Add this rule's actions on `p.sample` to `p.out`."""
        raise NotImplementedError

    def rule_wide(self, key: str) -> bool:
        """Whether a cooldown key is the whole rule's (kept while no group is seen), not a group's."""
        return False

    def group_value(self, group: GroupSample) -> int:
        """What a per-group limit is measured against (and what the fast lane watches grow)."""
        return group.rss_bytes

    def headroom(self, rule: Rule, system: SystemMemory) -> float:
        """A system-lane condition: how far system memory is from making it hold (below 0: it holds)."""
        raise NotImplementedError(f"{self.field} is not judged by the system lane")

    def past_ceiling(self, action: Action, group: GroupSample | None, read_system: Callable[[], SystemMemory]) -> bool:
        """During a kill's grace period: whether things are past `action.ceiling` (then the kill goes on at once)."""
        return False

    def cgroup_pressure(self, rule: Rule) -> tuple[str, ...]:
        """The cgroups whose memory pressure a sample must carry for this rule."""
        return ()

    def limit_text(self, limit: float, format_bytes: Callable[[float], str]) -> str:
        """An event's limit as a report shows it."""
        return format_bytes(limit)


# --- per group --------------------------------------------------------------------------------


class GroupLimit(Condition):
    """Every selected group over the limit is a victim of its own."""

    per_group = True

    def limit(self, rule: Rule) -> int:
        return int(self.value(rule))

    def ceiling(self, rule: Rule, limit: int) -> float | None:
        return None

    def decide(self, rule: Rule, rs: RuleState, p: Pass) -> None:
        lim = self.limit(rule)
        seen = set()
        for g in p.selected(rule):
            seen.add(g.key)
            value = self.group_value(g)
            if value <= lim:
                rs.since.pop(g.key, None)
                continue
            if not p.ready(rule, rs, g.key) or g.key in p.busy:
                continue
            action = p.victim(rule, g, self.field, value, lim, ceiling=self.ceiling(rule, lim))
            if p.emit(rule, rs, action, g.key):
                p.busy.add(g.key)
        if p.full:
            for key in [k for k in rs.since if k not in seen]:
                del rs.since[key]


class GroupMemory(GroupLimit):
    """A group's memory: watched between samples by the fast lane; past limit × (1 + hard_ceiling) during
    the grace period, the kill goes on at once."""

    lane = FAST
    annotation = Annotated[Size | None, AfterValidator(_above_zero)]

    def ceiling(self, rule: Rule, limit: int) -> float | None:
        return limit * (1 + rule.hard_ceiling)

    def past_ceiling(self, action: Action, group: GroupSample | None, read_system: Callable[[], SystemMemory]) -> bool:
        return group is not None and action.ceiling is not None and self.group_value(group) > action.ceiling


@condition
class MaxRss(GroupMemory):
    field = "max_rss"
    description = "kill a group whose summed RSS exceeds this"
    memtype = "rss"


@condition
class MaxPss(GroupMemory):
    field = "max_pss"
    description = "kill a group whose summed PSS exceeds this (needs memory: pss)"
    memtype = "pss"

    def config_problem(self, config: Config) -> str | None:
        return None if config.memory == "pss" else "needs `memory: pss`"

    def group_value(self, group: GroupSample) -> int:
        return group.pss_bytes if group.pss_bytes is not None else group.rss_bytes


class NativeMemory(GroupMemory):
    """The number a desktop OS shows its users per process, summed over the group: read by the psutil
    source on that OS only (platforms/), so a rule on another OS would judge RSS under this name."""

    os_name: ClassVar[str]

    def config_problem(self, config: Config) -> str | None:
        from .. import platforms

        if platforms.native_memtype() != self.memtype:
            return f"is read on {self.os_name} only; use max_rss here"
        return None

    def group_value(self, group: GroupSample) -> int:
        return group.memory_bytes(self.memtype)


@condition
class MaxFootprint(NativeMemory):
    field = "max_footprint"
    description = "macOS: kill a group whose summed memory footprint (Activity Monitor's Memory column) exceeds this"
    memtype = "footprint"
    os_name = "macOS"


@condition
class MaxPrivate(NativeMemory):
    field = "max_private"
    description = "Windows: kill a group whose summed private commit (Task Manager's Commit size) exceeds this"
    memtype = "private"
    os_name = "Windows"


@condition
class MaxGpuMemory(GroupLimit):
    """A group's GPU memory: its members' GPU processes are read by each walk (no lane reads them between)."""

    field = "max_gpu_memory"
    annotation = Annotated[Size | None, AfterValidator(_above_zero)]
    description = "kill a group whose summed GPU memory exceeds this"
    memtype = "gpu"

    def group_value(self, group: GroupSample) -> int:
        return group.gpu_memory_total_bytes


# --- one victim per crossing --------------------------------------------------------------------


class VictimChoice(Condition):
    """When the condition holds, one victim: the selected group whose killable members hold the most."""

    def reading(self, rule: Rule, rs: RuleState, p: Pass) -> tuple[float, float] | None:
        """(value, limit) while the condition holds, else None."""
        raise NotImplementedError

    def ceiling(self, rule: Rule, limit: float) -> float | None:
        return None

    def rule_wide(self, key: str) -> bool:
        return key == self.key

    def decide(self, rule: Rule, rs: RuleState, p: Pass) -> None:
        reading = self.reading(rule, rs, p)
        if reading is None:
            rs.since.pop(self.key, None)
            return
        if not p.ready(rule, rs, self.key):
            return
        value, limit = reading
        ceiling = self.ceiling(rule, limit)
        p.choose(rule, rs, p.largest_first(rule), self.field, value, limit, self.key, ceiling=ceiling)


@condition
class GpuMemoryAbove(Condition):
    """A card's used memory: one victim per card, its largest selected VRAM user; cooldown per card."""

    field = "gpu_memory_above"
    annotation = Annotated[Ratio | None, AfterValidator(_above_zero)]
    description = "when a card's used memory exceeds this share, kill its largest selected VRAM user"

    def rule_wide(self, key: str) -> bool:
        return key.startswith("gpu:")

    def decide(self, rule: Rule, rs: RuleState, p: Pass) -> None:
        share = self.value(rule)
        for card in p.sample.gpus:
            key = f"gpu:{card.index}"
            ratio = card.memory_used_ratio
            if ratio is None or ratio <= share:
                rs.since.pop(key, None)
                continue
            if not p.ready(rule, rs, key):
                continue
            using = (g for g in p.selected(rule) if g.gpu_memory_bytes.get(card.index, 0) > 0 and g.key not in p.busy)
            candidates = sorted(using, key=lambda g: g.gpu_memory_bytes[card.index], reverse=True)
            p.choose(rule, rs, candidates, self.field, ratio, share, key, card=card)

    def limit_text(self, limit: float, format_bytes: Callable[[float], str]) -> str:
        return f"{float(limit):.0%} of the card"


@condition
class SystemAvailableBelow(VictimChoice):
    field = "system_available_below"
    annotation = Annotated[SizeOrRatio | None, AfterValidator(_above_zero)]
    description = "when system available memory is below this, kill the largest selected group"
    lane = SYSTEM
    key = "system"

    def threshold(self, rule: Rule, total_bytes: int) -> float:
        t = self.value(rule)
        if t is None:
            raise ValueError(f"rule {rule.name} has no {self.field}")
        return t * total_bytes if t < 1 else t

    def headroom(self, rule: Rule, system: SystemMemory) -> float:
        """Bytes available above the threshold (below 0: below it)."""
        return system.available_bytes - self.threshold(rule, system.total_bytes)

    def reading(self, rule: Rule, rs: RuleState, p: Pass) -> tuple[float, float] | None:
        system = p.sample.system
        threshold = self.threshold(rule, system.total_bytes)
        if not system.total_bytes or system.available_bytes >= threshold:
            return None
        return system.available_bytes, threshold

    def ceiling(self, rule: Rule, limit: float) -> float | None:
        return limit * (1 - rule.hard_ceiling)

    def past_ceiling(self, action: Action, group: GroupSample | None, read_system: Callable[[], SystemMemory]) -> bool:
        try:
            return action.ceiling is not None and read_system().available_bytes < action.ceiling
        except OSError:
            return False

    def limit_text(self, limit: float, format_bytes: Callable[[float], str]) -> str:
        return f"{format_bytes(limit)} available"


def _pressure_shorthand(value: Any) -> Any:
    """`memory_pressure_above: 20%` is short for `{kind: some, avg10: 20%}`."""
    return value if value is None or isinstance(value, dict) else {"avg10": value}


class PressureCondition(BaseModel):
    """Memory pressure (PSI): avg10 above a share, or at least `stall` of stall time within `window`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["some", "full"] = Field("some", description="some: any task stalled on memory; full: all at once")
    avg10: Ratio | None = Field(None, description="fire when the 10 s average stall share exceeds this")
    stall: Duration | None = Field(None, description="fire when tasks stalled this long within `window`")
    window: Duration = Field(1.0, ge=0.5, le=10.0, description="the window for `stall` (the kernel allows 500ms..10s)")
    cgroup: str | None = Field(
        None,
        description="watch this cgroup v2's memory.pressure (a path under paths.cgroupfs, "
        "or absolute) instead of the host's",
    )

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.avg10 is None) == (self.stall is None):
            raise ValueError("memory_pressure_above needs exactly one of avg10, stall")
        if self.stall is not None and not 0 < self.stall <= self.window:
            raise ValueError(f"memory_pressure_above.stall must be above 0 and at most window ({self.window}s)")
        if self.avg10 is not None and self.avg10 <= 0:  # any stall at all would count
            raise ValueError("memory_pressure_above.avg10 must be above 0")
        return self

    @property
    def source(self) -> str:
        """The key of the reading in a Sample: "host", or the cgroup path."""
        return self.cgroup or "host"


@condition
class MemoryPressureAbove(VictimChoice):
    """PSI: avg10 as a ratio, or the stall time per window estimated from the PSI totals of successive
    samples (rule state keeps them). Between full samples the pressure lane passes the latest sample
    with fresh readings."""

    field = "memory_pressure_above"
    annotation = Annotated[PressureCondition | None, BeforeValidator(_pressure_shorthand)]
    description = "when memory pressure (PSI) crosses this, kill the largest selected group"
    lane = PRESSURE
    key = "pressure"

    def reading(self, rule: Rule, rs: RuleState, p: Pass) -> tuple[float, float] | None:
        pc: PressureCondition = self.value(rule)
        psi = p.sample.pressure if pc.cgroup is None else p.sample.cgroup_pressure.get(pc.cgroup)
        line = psi.line(pc.kind) if psi is not None else None
        if line is None:  # no PSI here (or the cgroup is gone): nothing to judge
            return None
        pressure: float | None
        if pc.avg10 is not None:
            pressure, above = line.avg10, pc.avg10
        else:
            assert pc.stall is not None  # the config takes exactly one of avg10, stall
            window = rs.stall.get(pc.source)
            if window is None or window.window != pc.window:
                window = rs.stall[pc.source] = StallWindow(pc.window)
            pressure, above = window.add(p.now, line.total_seconds), pc.stall
        if pressure is None or pressure < above or (pc.avg10 is not None and pressure == above):
            return None
        return pressure, above

    def cgroup_pressure(self, rule: Rule) -> tuple[str, ...]:
        cgroup = self.value(rule).cgroup
        return () if cgroup is None else (cgroup,)


@condition
class SystemPressureLevel(VictimChoice):
    """macOS's own verdict (1 normal, 2 warn, 4 critical); None on every other OS: never fires there."""

    field = "system_pressure_level"
    annotation = Literal["warn", "critical"] | None
    description = (
        "macOS: when the kernel's memory pressure level (kern.memorystatus_vm_pressure_level) "
        "reaches this, kill the largest selected group; never fires where there is no such level"
    )
    key = "pressure_level"

    def reading(self, rule: Rule, rs: RuleState, p: Pass) -> tuple[float, float] | None:
        current, need = p.sample.system.pressure_level, LEVEL_OF_NAME[self.value(rule)]
        if current is None or current < need:
            return None
        return current, need
