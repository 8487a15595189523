"""Pure decisions: a Sample, the rules and their state in; actions out.

Nothing here touches the OS. `decide()` is called on every full sample and, for the
groups in the fast lane, on partial samples holding just those groups re-read
(`full=False`: only the per-group limit conditions are evaluated then).

Cooldown keys: a group-limit rule (max_rss, max_pss, max_gpu_memory) cools down per
group, so a second runaway under the same rule is still stopped at once;
`gpu_memory_above` per card; `system_available_below` and `memory_pressure_above` per rule
(memory freed by a kill takes a moment to show, and a second victim must not follow on stale numbers).

`memory_pressure_above` reads the Sample's PSI readings: avg10 as a ratio, or the stall time per
window estimated from the PSI totals of successive samples (rule state keeps them). A caller woken
by a `pressure.PressureWatch` between full samples passes the latest sample with fresh readings.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..config import Matcher, Rule, RuleMatch
from ..grouping import descendants as descendants_of
from ..grouping import user_name as _user_name
from ..pressure import StallWindow
from ..sample import GroupSample, ProcessInfo, Sample

GROUP_MEMORY = ("max_rss", "max_pss")
GROUP_LIMITS = GROUP_MEMORY + ("max_gpu_memory",)
LIMIT_MEMTYPE = {"max_rss": "rss", "max_pss": "pss", "max_gpu_memory": "gpu"}

# Programs never signalled whatever the config says, recognised by what a user cannot forge: the
# name of the resolved executable, which must sit under root-owned directories nobody else can
# write (a symlink or copy named `sshd` in a user's directory is not sshd). The exporter itself
# is recognised by its command line only when root runs it from such an interpreter.
PROTECTED_EXE = re.compile(
    r"^(init|systemd|systemd-[a-z-]+|launchd|sshd|sshd-session|containerd|containerd-shim.*|"
    r"dockerd|docker-proxy|docker-init|runc|crun|conmon|podman|crio|kubelet|kube-proxy|tini|"
    r"dumb-init|mem-exporter)$"
)
EXPORTER_CMDLINE = re.compile(r"(^|\s)(\S*/)?mem-exporter(\s|$)|(^|\s)-m\s+mem_exporter(\s|$)")


def _nothing_trusted(p: ProcessInfo) -> tuple[str | None, bool | None]:
    return p.exe, False


# Fast lane: how quickly a group might grow when we have no evidence, the regular shortest
# re-read period, the most groups re-read fast at once, and the predicted-crossing read.
FLOOR_RATE = 100 * 1024 * 1024  # bytes/s
MIN_PERIOD = 0.05
MAX_LANE = 32
PREDICT_MIN_RATE = 32 * 1024 * 1024  # bytes/s of sustained growth before crossings are predicted
PREDICT_LAG = 0.005
MIN_SPACING = 0.01


@dataclass(frozen=True)
class Context:
    """Who the enforcer is, and what it must never touch."""

    uid: int
    pid: int
    pgid: int
    ancestors: frozenset[int] = frozenset()
    protect: tuple[Matcher, ...] = ()
    dry_run: bool = False
    user_name: Callable[[int], str] = _user_name
    builtin: bool = True  # False for `run`: its tree is the user's own command, nothing in it is exempt
    # (resolved executable, trusted) of a process; trusted None: it could not be inspected
    inspect_exe: Callable[[ProcessInfo], tuple[str | None, bool | None]] = _nothing_trusted


@dataclass(frozen=True)
class Action:
    kind: str  # kill | dry_run | skipped_protected | skipped_other_user | no_victim
    rule: Rule
    group: GroupSample | None
    condition: str
    value: float  # what was measured: bytes, or a ratio for gpu_memory_above
    limit: float  # the limit, same unit
    at: float  # monotonic time of the decision
    targets: tuple[ProcessInfo, ...] = ()  # members and descendants that left the group, all to be signalled
    reason: str = ""
    gpu: int | None = None
    ceiling: float | None = None  # the hard ceiling in the same unit (None: none applies)

    @property
    def group_key(self) -> str | None:
        return self.group.key if self.group else None


@dataclass
class RuleState:
    since: dict[str, float] = field(default_factory=dict)  # condition key -> when it began to hold
    last_action: dict[str, float] = field(default_factory=dict)  # cooldown key -> last kill or dry run
    noted: dict[tuple[str, str], float] = field(default_factory=dict)  # (key, kind) -> last skip reported
    stall: dict[str, StallWindow] = field(default_factory=dict)  # pressure source -> recent PSI totals


@dataclass
class PolicyState:
    rules: dict[str, RuleState] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # group keys with a kill in progress

    def for_rule(self, name: str) -> RuleState:
        rs = self.rules.get(name)
        if rs is None:
            rs = self.rules[name] = RuleState()
        return rs

    def keep_only(self, names: Iterable[str]) -> None:
        names = set(names)
        for n in [n for n in self.rules if n not in names]:
            del self.rules[n]


# --- selection and limits ---------------------------------------------------------------------

_MEMO: weakref.WeakKeyDictionary[RuleMatch, dict] = weakref.WeakKeyDictionary()
_MEMO_MAX = 100_000


def _memo(match: RuleMatch) -> dict:
    memo = _MEMO.get(match)
    if memo is None or len(memo) > _MEMO_MAX:
        memo = _MEMO[match] = {}
    return memo


def selects(match: RuleMatch, group: GroupSample, user_name: Callable[[int], str] = _user_name) -> bool:
    """Whether a rule's `match` selects the group. Per-process regex results are memoized by
    everything they read: an exec may keep pid, start time and comm and change only the command line."""
    if group.kind == "other" or not group.members:
        return False
    if match.group is not None and not re.search(match.group, group.label):
        return False
    if match.is_empty:
        return True
    memo = _memo(match)

    def test(p: ProcessInfo) -> bool:
        key = (p.pid, p.start_time, p.comm, p.uid, p.cmdline, p.exe)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = match.matches(p.comm, p.cmdline, p.exe, user_name(p.uid))
        return hit

    return all(map(test, group.members)) if match.all_members else any(map(test, group.members))


def group_value(rule: Rule, group: GroupSample) -> int:
    if rule.max_pss is not None:
        return group.pss_bytes if group.pss_bytes is not None else group.rss_bytes
    if rule.max_gpu_memory is not None:
        return group.gpu_memory_total_bytes
    return group.rss_bytes


def group_limit(rule: Rule) -> int:
    return int(getattr(rule, rule.condition))


def system_threshold(rule: Rule, total_bytes: int) -> float:
    t = rule.system_available_below
    if t is None:
        raise ValueError(f"rule {rule.name} has no system_available_below")
    return t * total_bytes if t < 1 else t


def limits(
    sample: Sample, rules: Sequence[Rule], user_name: Callable[[int], str] = _user_name
) -> list[tuple[Rule, GroupSample, int]]:
    """(rule, group, limit) for every group a group-limit rule watches."""
    out: list[tuple[Rule, GroupSample, int]] = []
    for rule in rules:
        if rule.condition in GROUP_LIMITS:
            lim = group_limit(rule)
            out.extend((rule, g, lim) for g in sample.groups if selects(rule.match, g, user_name))
    return out


# --- safety -----------------------------------------------------------------------------------


def protection(p: ProcessInfo, ctx: Context) -> str | None:
    """Why this process must never be signalled, or None."""
    if p.pid == 1:
        return "pid 1"
    if p.pid == 2 or p.ppid == 2 or p.pid <= 0:
        return "kernel thread"
    if p.pid == ctx.pid:
        return "the enforcer itself"
    if p.pid in ctx.ancestors:
        return "an ancestor of the enforcer"
    if p.pgid == ctx.pgid:
        return "the enforcer's process group"
    if ctx.builtin:
        why = builtin_protection(p, ctx)
        if why:
            return why
    for m in ctx.protect:
        if m.matches(p.comm, p.cmdline, p.exe, ctx.user_name(p.uid)):
            return "protected by config"
    return None


def builtin_protection(p: ProcessInfo, ctx: Context) -> str | None:
    exe, trusted = ctx.inspect_exe(p)
    if trusted is None:
        # not ours to inspect (another user's, no privilege): a protected name is believed, since we
        # could not signal such a process through a rule that did not ask for other users anyway
        if p.uid != ctx.uid and PROTECTED_EXE.match(p.comm):
            return "built-in protected (unverified)"
        return None
    if not trusted or not exe:
        return None
    if PROTECTED_EXE.match(exe.rsplit("/", 1)[-1]):
        return "built-in protected"
    if p.uid == 0 and EXPORTER_CMDLINE.search(p.cmdline):
        return "the exporter"
    return None


def eligible(p: ProcessInfo, rule: Rule, ctx: Context) -> bool:
    """Whether a process that joined a group being killed may be signalled too."""
    return (rule.other_users or p.uid == ctx.uid) and protection(p, ctx) is None


def descendants(sample: Sample, group: GroupSample) -> list[ProcessInfo]:
    """Processes outside the group that descend from one of its members (setsid children, say)."""
    inside = {p.pid for p in group.members}
    return [p for p in descendants_of(sample.processes, inside) if p.pid not in inside]


def victim(
    rule: Rule,
    group: GroupSample,
    sample: Sample,
    ctx: Context,
    condition: str,
    value: float,
    limit: float,
    now: float,
    gpu: int | None = None,
    ceiling: float | None = None,
) -> Action:
    """The action for one would-be victim: kill / dry_run, or why it is skipped."""

    def act(kind: str, targets=(), reason: str = "") -> Action:
        return Action(kind, rule, group, condition, value, limit, now, tuple(targets), reason, gpu, ceiling)

    for p in group.members:
        why = protection(p, ctx)
        if why:
            return act("skipped_protected", reason=f"{p.comm}[{p.pid}]: {why}")
    if not rule.other_users:
        for p in group.members:
            if p.uid != ctx.uid:
                return act("skipped_other_user", reason=f"{p.comm}[{p.pid}] belongs to uid {p.uid}")
    extra = [
        p for p in descendants(sample, group) if protection(p, ctx) is None and (rule.other_users or p.uid == ctx.uid)
    ]
    return act("dry_run" if ctx.dry_run else "kill", targets=(*group.members, *extra))


# --- the decision -----------------------------------------------------------------------------


def _cooling(rule: Rule, rs: RuleState, key: str, now: float) -> bool:
    last = rs.last_action.get(key)
    return last is not None and now - last < rule.cooldown


def _held(rule: Rule, rs: RuleState, key: str, now: float) -> bool:
    return now - rs.since.setdefault(key, now) >= rule.for_


def _emit(rule: Rule, rs: RuleState, action: Action, cooldown_key: str, out: list[Action]) -> bool:
    """Record `action`; True when it acts (kill / dry_run). Skips are reported once per cooldown."""
    if action.kind in ("kill", "dry_run"):
        rs.last_action[cooldown_key] = action.at
        out.append(action)
        return True
    note = (action.group_key or cooldown_key, action.kind)
    last = rs.noted.get(note)
    if last is None or action.at - last >= max(rule.cooldown, 1.0):
        rs.noted[note] = action.at
        out.append(action)
    return False


def decide(sample: Sample, rules: Sequence[Rule], state: PolicyState, ctx: Context, full: bool = True) -> list[Action]:
    """Actions for this sample. `full=False`: a partial sample from the fast lane (group limits only)."""
    now = sample.monotonic
    out: list[Action] = []
    busy = set(state.busy)  # groups being killed, and those acted on earlier in this pass (first rule wins)
    for rule in rules:
        rs = state.for_rule(rule.name)
        cond = rule.condition
        if cond in GROUP_LIMITS:
            lim = group_limit(rule)
            seen = set()
            for g in sample.groups:
                if not selects(rule.match, g, ctx.user_name):
                    continue
                seen.add(g.key)
                value = group_value(rule, g)
                if value <= lim:
                    rs.since.pop(g.key, None)
                    continue
                if not _held(rule, rs, g.key, now) or g.key in busy or _cooling(rule, rs, g.key, now):
                    continue
                ceiling = lim * (1 + rule.hard_ceiling) if cond in GROUP_MEMORY else None
                if _emit(rule, rs, victim(rule, g, sample, ctx, cond, value, lim, now, ceiling=ceiling), g.key, out):
                    busy.add(g.key)
            if full:
                for key in [k for k in rs.since if k not in seen]:
                    del rs.since[key]
        elif not full:
            continue
        elif cond == "system_available_below":
            threshold = system_threshold(rule, sample.system.total_bytes)
            avail = sample.system.available_bytes
            if not sample.system.total_bytes or avail >= threshold:
                rs.since.pop("system", None)
                continue
            if not _held(rule, rs, "system", now) or _cooling(rule, rs, "system", now):
                continue
            ceiling = threshold * (1 - rule.hard_ceiling)
            candidates = sorted(
                (g for g in sample.groups if g.key not in busy and selects(rule.match, g, ctx.user_name)),
                key=lambda g: g.memory_bytes(sample.memtype),
                reverse=True,
            )
            _choose(
                rule, rs, candidates, sample, ctx, cond, avail, threshold, now, "system", out, busy, ceiling=ceiling
            )
        elif (pc := rule.memory_pressure_above) is not None:
            reading = sample.pressure if pc.cgroup is None else sample.cgroup_pressure.get(pc.cgroup)
            line = reading.line(pc.kind) if reading is not None else None
            if line is None:  # no PSI here (or the cgroup is gone): nothing to judge
                rs.since.pop("pressure", None)
                continue
            pressure: float | None
            if pc.avg10 is not None:
                pressure, above = line.avg10, pc.avg10
            else:
                assert pc.stall is not None  # the config takes exactly one of avg10, stall
                window = rs.stall.get(pc.source)
                if window is None or window.window != pc.window:
                    window = rs.stall[pc.source] = StallWindow(pc.window)
                pressure, above = window.add(now, line.total_seconds), pc.stall
            if pressure is None or pressure < above or (pc.avg10 is not None and pressure == above):
                rs.since.pop("pressure", None)
                continue
            if not _held(rule, rs, "pressure", now) or _cooling(rule, rs, "pressure", now):
                continue
            selected = (g for g in sample.groups if g.key not in busy and selects(rule.match, g, ctx.user_name))
            candidates = sorted(selected, key=lambda g: g.memory_bytes(sample.memtype), reverse=True)
            _choose(rule, rs, candidates, sample, ctx, cond, pressure, above, now, "pressure", out, busy)
        elif (share := rule.gpu_memory_above) is not None:
            for card in sample.gpus:
                key = f"gpu:{card.index}"
                ratio = card.memory_used_ratio
                if ratio is None or ratio <= share:
                    rs.since.pop(key, None)
                    continue
                if not _held(rule, rs, key, now) or _cooling(rule, rs, key, now):
                    continue
                candidates = sorted(
                    (
                        g
                        for g in sample.groups
                        if g.gpu_memory_bytes.get(card.index, 0) > 0
                        and g.key not in busy
                        and selects(rule.match, g, ctx.user_name)
                    ),
                    key=lambda g: g.gpu_memory_bytes[card.index],
                    reverse=True,
                )
                _choose(rule, rs, candidates, sample, ctx, cond, ratio, share, now, key, out, busy, gpu=card.index)
    return out


def _choose(rule, rs, candidates, sample, ctx, cond, value, limit, now, key, out, busy, gpu=None, ceiling=None) -> None:
    """Victim-choosing conditions: the first eligible candidate, largest first."""
    for g in candidates:
        if _emit(rule, rs, victim(rule, g, sample, ctx, cond, value, limit, now, gpu, ceiling), key, out):
            busy.add(g.key)
            return
    _emit(
        rule,
        rs,
        Action("no_victim", rule, None, cond, value, limit, now, reason="no eligible group", gpu=gpu),
        key,
        out,
    )


# --- the fast lane ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pace:
    """When to read memory again, like earlyoom's adaptive poll: the headroom at twice the recent
    growth rate (at least `floor_rate`), clamped to [`min_period`, interval].

    Growing steadily (at least `predict_min_rate`) and predicted to cross before that: one more read
    just after the predicted crossing (`predict_lag` later, never sooner than `min_spacing`), so the
    act follows the crossing by milliseconds, not by up to a period.
    """

    floor_rate: float  # bytes/s
    min_period: float
    predict_min_rate: float  # bytes/s
    predict_lag: float
    min_spacing: float

    def period(self, headroom: float, rate: float, interval: float) -> float:
        if headroom <= 0:
            return self.min_period
        period = max(self.min_period, min(interval, headroom / max(2 * rate, self.floor_rate)))
        if rate >= self.predict_min_rate:
            period = min(period, max(self.min_spacing, headroom / rate + self.predict_lag))
        return period


GROUP_PACE = Pace(FLOOR_RATE, MIN_PERIOD, PREDICT_MIN_RATE, PREDICT_LAG, MIN_SPACING)


def poll_period(headroom: float, rate: float, interval: float) -> float:
    """Seconds until a group should be re-read (GROUP_PACE)."""
    return GROUP_PACE.period(headroom, rate, interval)
