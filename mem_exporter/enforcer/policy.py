"""Pure decisions: a Sample, the rules and their state in; actions out.

Nothing here touches the OS. `decide()` is called on every full sample and, for the
groups in the fast lane, on partial samples holding just those groups re-read
(`full=False`: only the per-group limit conditions are evaluated then).

Each rule's condition (enforcer/conditions.py) judges it through a `Pass`, which holds what every
condition shares: selection, protection, `for:`, cooldowns, the victim's choice. Cooldown keys are
the conditions' own.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import platforms
from ..config import Matcher, Rule, RuleMatch
from ..grouping import descendants as descendants_of
from ..grouping import user_name as _user_name
from ..pressure import StallWindow
from ..sample import GpuCard, GroupSample, ProcessInfo, Sample
from . import conditions
from .lane import FLOOR_RATE as FLOOR_RATE  # the fast lane's pace, here for older importers
from .lane import MIN_PERIOD as MIN_PERIOD
from .lane import poll_period as poll_period

# Programs never signalled whatever the config says, recognised by what a user cannot forge
# (enforcer/trust.py): a process running as root in our user namespace whose executable, owned
# by root under directories only root may write, has one of these names, or that lives in a
# root-owned cgroup of one of their systemd units. The exporter itself is known by pid (the
# enforcer, its ancestors), never by its command line.
PROTECTED_EXE = re.compile(
    r"^(init|systemd|systemd-[a-z-]+|launchd|sshd|sshd-session|containerd|containerd-shim.*|"
    r"dockerd|docker-proxy|docker-init|runc|crun|conmon|podman|crio|kubelet|kube-proxy|tini|"
    r"dumb-init|mem-exporter)$"
)
PROTECTED_UNIT = re.compile(
    r"(^|/)system\.slice/(ssh|sshd|containerd|docker|kubelet|kube-proxy|crio|podman|systemd-[a-z0-9-]+|"
    r"mem-exporter[a-z0-9-]*)\.service(/|$)"
)


def _not_root(p: ProcessInfo) -> bool | None:
    return False


def _nothing_trusted(p: ProcessInfo) -> tuple[str | None, bool | None]:
    return p.exe, False


def _no_cgroup(p: ProcessInfo) -> tuple[str | None, bool | None]:
    return p.cgroup, False


@dataclass(frozen=True)
class Context:
    """Who the enforcer is, and what it must never touch."""

    uid: int
    pid: int
    pgid: int
    ancestors: frozenset[int] = frozenset()
    started: int | None = None  # the enforcer's start time (ProcessInfo.start_time's unit), where it was read
    protect: tuple[Matcher, ...] = ()
    dry_run: bool = False
    user_name: Callable[[int], str] = _user_name
    builtin: bool = True  # False for `run`: its tree is the user's own command, nothing in it is exempt
    kthreadd: int | None = 2  # the kernel threads' parent; None in a pid namespace of its own (procfs.kthreadd_pid)
    # What trust.Inspector verifies of a process; None: the enforcer may not look.
    is_root: Callable[[ProcessInfo], bool | None] = _not_root  # real and effective uid 0, our user namespace
    inspect_exe: Callable[[ProcessInfo], tuple[str | None, bool | None]] = _nothing_trusted  # (path, root's alone)
    inspect_cgroup: Callable[[ProcessInfo], tuple[str | None, bool | None]] = _no_cgroup  # (path, root's alone)


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
    spared: tuple[ProcessInfo, ...] = ()  # members left alone (protected, or another user's): no group-wide signal

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

    def forget_gone(self, live: set[str], now: float, rules: Sequence[Rule], started: float | None = None) -> None:
        """After a full sample (taken from `started` to `now`), bound the per-group state to the groups
        alive in it (`live`: their keys): an entry goes when its window has passed (it decides nothing
        any more) or its group is gone. Rule-wide entries (system, pressure, a card) stay for their
        window, and so do entries made since the sample began (a group born meanwhile, acted on between
        samples). `since` needs nothing more: a full decide keeps only the groups it saw."""
        started = now if started is None else started
        by_name = {r.name: r for r in rules}
        for name, rs in self.rules.items():
            rule = by_name.get(name)
            if rule is None:
                continue

            def stays(key: str, at: float, window: float, rule: Rule = rule) -> bool:
                return now - at < window and (key in live or at >= started or _rule_wide(rule, key))

            rs.last_action = {k: t for k, t in rs.last_action.items() if stays(k, t, rule.cooldown)}
            rs.noted = {k: t for k, t in rs.noted.items() if stays(k[0], t, max(rule.cooldown, 1.0))}


def _rule_wide(rule: Rule, key: str) -> bool:
    """A cooldown key of the whole rule (`system`, `pressure`, `gpu:N`), not of a group."""
    return conditions.of(rule).rule_wide(key)


# --- selection and limits ---------------------------------------------------------------------

_MEMO: weakref.WeakKeyDictionary[RuleMatch, dict] = weakref.WeakKeyDictionary()
_MEMO_MAX = 100_000


def _memo(match: RuleMatch) -> dict:
    memo = _MEMO.get(match)
    if memo is None or len(memo) > _MEMO_MAX:
        memo = _MEMO[match] = {}
    return memo


def forget_processes(live: set[tuple[int, int]]) -> None:
    """Drop the memoized matches of processes no longer alive (`live`: (pid, start time) of a full sample)."""
    for match in list(_MEMO.keys()):
        memo = _MEMO.get(match)
        if memo is not None:
            _MEMO[match] = {k: v for k, v in memo.items() if (k[0], k[1]) in live}


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
    return conditions.of(rule).group_value(group)


def group_limit(rule: Rule) -> int:
    return int(getattr(rule, rule.condition))


def limits(
    sample: Sample, rules: Sequence[Rule], user_name: Callable[[int], str] = _user_name
) -> list[tuple[Rule, GroupSample, int]]:
    """(rule, group, limit) for every group a group-limit rule watches."""
    out: list[tuple[Rule, GroupSample, int]] = []
    for rule in rules:
        if conditions.of(rule).per_group:
            lim = group_limit(rule)
            out.extend((rule, g, lim) for g in sample.groups if selects(rule.match, g, user_name))
    return out


# --- safety -----------------------------------------------------------------------------------


def protection(p: ProcessInfo, ctx: Context) -> str | None:
    """Why this process must never be signalled, or None."""
    if p.pid == 1:
        return "pid 1"
    if p.pid <= 0 or (ctx.kthreadd is not None and ctx.kthreadd in (p.pid, p.ppid)):
        return "kernel thread"
    if p.pid == ctx.pid:
        return "the enforcer itself"
    if p.pid in ctx.ancestors and (ctx.started is None or p.start_time <= ctx.started):
        return "an ancestor of the enforcer"  # started before it: not a later process that took a dead one's pid
    if p.pgid == ctx.pgid:
        return "the enforcer's process group"
    if ctx.builtin:
        why = builtin_protection(p, ctx)
        if why:
            return why
    for m in ctx.protect:
        if m.matches(p.comm, p.cmdline, p.exe, ctx.user_name(p.uid)):
            cgroup_rx = getattr(m, "cgroup_regex", None)
            if cgroup_rx is None:
                return "protected by config"
            cgroup, owned = ctx.inspect_cgroup(p)
            if owned and cgroup is not None and cgroup_rx.search(cgroup):  # a user's own cgroup proves nothing
                return f"protected by config (cgroup {cgroup})"
    return None


def builtin_protection(p: ProcessInfo, ctx: Context) -> str | None:
    root = ctx.is_root(p)
    if root is None:
        # not ours to inspect (an unprivileged enforcer, another user's process): root's process with a
        # protected name is believed, since such an enforcer could not signal it anyway
        return "built-in protected (unverified)" if p.uid == 0 and PROTECTED_EXE.match(p.comm) else None
    if not root:
        return None
    exe, owned = ctx.inspect_exe(p)
    if owned and exe and PROTECTED_EXE.match(exe.rsplit("/", 1)[-1]):
        return "built-in protected"
    cgroup, owned = ctx.inspect_cgroup(p)
    if owned and cgroup and PROTECTED_UNIT.search(cgroup):
        return f"built-in protected (cgroup {cgroup})"
    return None


def spared_because(p: ProcessInfo, rule: Rule, ctx: Context) -> tuple[str, str] | None:
    """(skip kind, reason) when this rule may not signal the process, None when it may."""
    why = protection(p, ctx)
    if why:
        return "skipped_protected", f"{p.comm}[{p.pid}]: {why}"
    if not rule.other_users and p.uid != ctx.uid:
        return "skipped_other_user", f"{p.comm}[{p.pid}] belongs to uid {p.uid}"
    return None


def eligible(p: ProcessInfo, rule: Rule, ctx: Context) -> bool:
    """Whether a process that joined a group being killed may be signalled too."""
    return spared_because(p, rule, ctx) is None


def descendants(sample: Sample, group: GroupSample) -> list[ProcessInfo]:
    """Processes outside the group that descend from one of its members (setsid children, say)."""
    inside = {p.pid for p in group.members}
    return [p for p in descendants_of(sample.processes, inside) if p.pid not in inside]


@dataclass(frozen=True)
class Split:
    """A group's members: those the rule may signal, and those it must leave alone (and why)."""

    killable: tuple[ProcessInfo, ...]
    spared: tuple[ProcessInfo, ...]
    why: tuple[tuple[str, str], ...]  # (skip kind, reason) per spared member


def split(group: GroupSample, rule: Rule, ctx: Context) -> Split:
    killable, spared, why = [], [], []
    for p in group.members:
        s = spared_because(p, rule, ctx)
        if s is None:
            killable.append(p)
        else:
            spared.append(p)
            why.append(s)
    return Split(tuple(killable), tuple(spared), tuple(why))


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
    members: Split | None = None,
) -> Action:
    """The action for one would-be victim: kill / dry_run of the members the rule may signal (protection
    spares processes, never their group), or why it is skipped when there is none."""
    parts = members or split(group, rule, ctx)

    def act(kind: str, targets=(), reason: str = "") -> Action:
        return Action(
            kind, rule, group, condition, value, limit, now, tuple(targets), reason, gpu, ceiling, parts.spared
        )

    if not parts.killable and parts.why:
        kind, reason = next((w for w in parts.why if w[0] == "skipped_protected"), parts.why[0])
        return act(kind, reason=reason)
    extra = [p for p in descendants(sample, group) if eligible(p, rule, ctx)]
    reason = "spared " + "; ".join(r for _, r in parts.why[:5]) if parts.why else ""
    return act("dry_run" if ctx.dry_run else "kill", targets=(*parts.killable, *extra), reason=reason)


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


@dataclass
class Pass:
    """One `decide()`: the sample the conditions judge, and what they share (selection, `for:` and
    cooldowns, the victim's choice, the actions so far, the groups taken)."""

    sample: Sample
    ctx: Context
    full: bool
    busy: set[str]  # groups being killed, and those acted on earlier in this pass (first rule wins)
    out: list[Action] = field(default_factory=list)

    @property
    def now(self) -> float:
        return self.sample.monotonic

    def selected(self, rule: Rule) -> Iterator[GroupSample]:
        """The sample's groups the rule's `match` selects."""
        return (g for g in self.sample.groups if selects(rule.match, g, self.ctx.user_name))

    def ready(self, rule: Rule, rs: RuleState, key: str) -> bool:
        """The condition holds under `key`: whether it has held for `for:` and the key is not cooling down."""
        return _held(rule, rs, key, self.now) and not _cooling(rule, rs, key, self.now)

    def emit(self, rule: Rule, rs: RuleState, action: Action, cooldown_key: str) -> bool:
        return _emit(rule, rs, action, cooldown_key, self.out)

    def victim(
        self, rule: Rule, group: GroupSample, condition: str, value: float, limit: float, ceiling: float | None = None
    ) -> Action:
        return victim(rule, group, self.sample, self.ctx, condition, value, limit, self.now, ceiling=ceiling)

    def largest_first(self, rule: Rule) -> list[GroupSample]:
        """The groups a victim-choosing rule may pick from, largest first (`choose` then weighs what it may kill)."""
        free = (g for g in self.selected(rule) if g.key not in self.busy)
        memtype = weighed_memtype(self.sample)
        return sorted(free, key=lambda g: g.memory_bytes(memtype), reverse=True)

    def choose(
        self,
        rule: Rule,
        rs: RuleState,
        candidates: Iterable[GroupSample],
        condition: str,
        value: float,
        limit: float,
        key: str,
        card: GpuCard | None = None,
        ceiling: float | None = None,
    ) -> None:
        """Victim-choosing conditions: the group whose killable members hold the most, since a protected
        member's memory is not freed by killing its group; a group with nothing the rule may signal is
        passed over. `candidates` come largest first by their whole memory, so the search ends at the
        first group whose whole memory cannot beat the best killable share found."""
        sample, ctx, now = self.sample, self.ctx, self.now
        total, each = _weights(sample, card)
        gpu = None if card is None else card.index

        def act(g: GroupSample, parts: Split) -> bool:
            return self.emit(
                rule, rs, victim(rule, g, sample, ctx, condition, value, limit, now, gpu, ceiling, parts), key
            )

        best: tuple[int, GroupSample, Split] | None = None
        for g in candidates:
            if best is not None and total(g) <= best[0]:
                break
            parts = split(g, rule, ctx)
            if not parts.killable:
                act(g, parts)
                continue
            freed = sum(map(each, parts.killable))
            if best is None or freed > best[0]:
                best = (freed, g, parts)
        if best is not None and act(best[1], best[2]):
            self.busy.add(best[1].key)
            return
        none = Action("no_victim", rule, None, condition, value, limit, now, reason="no eligible group", gpu=gpu)
        self.emit(rule, rs, none, key)


def decide(sample: Sample, rules: Sequence[Rule], state: PolicyState, ctx: Context, full: bool = True) -> list[Action]:
    """Actions for this sample. `full=False`: a partial sample from the fast lane (group limits only)."""
    judging = Pass(sample, ctx, full, set(state.busy))
    for rule in rules:
        rs = state.for_rule(rule.name)
        cond = conditions.of(rule)
        if full or cond.per_group:
            cond.decide(rule, rs, judging)
    return judging.out


def _weights(sample: Sample, card: GpuCard | None) -> tuple[Callable[[GroupSample], int], Callable[[ProcessInfo], int]]:
    """What a victim-choosing rule weighs: a group's whole memory (or VRAM on `card`), and one process's."""
    if card is not None:
        on_card = {q.pid: q.gpu_memory_bytes or 0 for q in card.processes}
        return (lambda g: g.gpu_memory_bytes.get(card.index, 0)), (lambda p: on_card.get(p.pid, 0))
    memtype = weighed_memtype(sample)
    if memtype == "rss":  # the common case, kept to plain attribute reads
        return (lambda g: g.rss_bytes), (lambda p: p.rss_bytes)
    return (lambda g: g.memory_bytes(memtype)), (lambda p: p.memory_bytes(memtype))


def weighed_memtype(sample: Sample) -> str:
    """The memory a victim is chosen by: PSS where the config reads it, else the number this OS shows its
    users (macOS footprint, Windows private commit: a hog's compressed or committed memory is not in
    its RSS), else RSS. Each falls back to RSS where it was not read."""
    return "pss" if sample.memtype == "pss" else platforms.native_memtype()
