"""The one kill engine: `enforce` and `run` stop a group of processes through `execute()`.

    first signal to every target (identity-checked; killpg / cgroup.kill when a verified member anchors it)
    grace, split evenly between the signals, with a re-read about every 50 ms:
        new members and children join the targets; all gone -> done; past the hard ceiling -> last signal now
    last signal; confirmed death (up to three rounds, catching members that appeared meanwhile)

What differs between callers is how they re-read (`refresh`) and when they hurry: the enforcer
re-reads the group through its own reader, `run` reaps its children and re-reads its tree.
Nothing here allocates much or opens more than a pidfd per target between the decision and the
first signal; waiting is poll() on pidfds, so it works at any descriptor number. Out of descriptors,
a kill goes on: the watch's pidfds are given up first, a process whose identity cannot be checked
is not signalled by pid (its group still is, through a verified member), and the last signal is
always sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..sample import ProcessInfo
from ..signals import signal_name
from .actuator import RESERVE, Actuator, PidfdWatch

DEATH_TIMEOUT = 10.0  # after the last signal, how long to wait for confirmed death
STEP = 0.05  # re-read period during the grace


@dataclass
class KillOrder:
    """What to stop and how. `pgid` / `cgroup` are whole-group handles used on top of per-process signals."""

    signals: Sequence[int]
    grace: float
    targets: Iterable[ProcessInfo]
    pgid: int | None = None
    cgroup: str | None = None


# refresh() -> (processes that join the targets, whether the hard ceiling is passed)
Refresh = Callable[[], tuple[Iterable[ProcessInfo], bool]]


@dataclass
class KillReport:
    started: float  # monotonic time of the first signal
    targets: dict[tuple[int, int], ProcessInfo]
    signals_sent: list[dict] = field(default_factory=list)
    hard_ceiling: bool = False
    survivors: list[ProcessInfo] = field(default_factory=list)
    gone_at: float | None = None

    @property
    def sent_any(self) -> bool:
        return any(s["sent"] for s in self.signals_sent)

    @property
    def kind(self) -> str:
        """The action it came to: term / kill / ... (the last signal delivered), or why none was."""
        last = next((s["signal"] for s in reversed(self.signals_sent) if s["sent"]), None)
        if last:
            return last[3:].lower()
        return "skipped_identity" if self._mismatch_only else "skipped_gone"

    @property
    def _mismatch_only(self) -> bool:
        return not self.sent_any and any(s["mismatch"] for s in self.signals_sent)

    @property
    def outcome(self) -> str:
        if self.survivors:
            return "survived"
        if self.sent_any:
            return "dead"
        return "identity_mismatch" if self._mismatch_only else "gone"

    def event_fields(self) -> dict:
        """The kill's part of the event record."""
        return {
            "outcome": self.outcome,
            "signals_sent": [s for s in self.signals_sent if s["sent"] or s["mismatch"] or s["denied"]],
            "hard_ceiling": self.hard_ceiling,
            "signalled": [{"pid": p.pid, "comm": p.comm} for p in self.targets.values()][:50],
            "survivors": [p.pid for p in self.survivors],
            "time_to_death_seconds": (
                round(self.gone_at - self.started, 3) if self.gone_at is not None and self.sent_any else None
            ),
        }


def execute(
    actuator: Actuator, order: KillOrder, refresh: Refresh, hurry: Callable[[], bool] = lambda: False
) -> KillReport:
    """Stop the order's targets (and whatever `refresh` adds); returns what happened."""
    kill = _Kill(actuator, order, refresh, hurry)
    try:
        kill.run()
    finally:
        kill.watch.close()
        RESERVE.refill()  # what this kill spent, for the next one
    kill.report.survivors = [p for p in kill.targets.values() if actuator.alive(p)]
    return kill.report


class _Kill:
    """One execute(): its targets (growing as `refresh` finds members), the pidfds it waits on, its report."""

    def __init__(self, actuator: Actuator, order: KillOrder, refresh: Refresh, hurry: Callable[[], bool]):
        self.actuator, self.order, self.refresh, self.hurry = actuator, order, refresh, hurry
        self.targets = {p.identity: p for p in order.targets}
        self.watch = PidfdWatch(actuator)
        self.report = KillReport(time.monotonic(), self.targets)
        self.sigs = list(order.signals)

    def run(self) -> None:
        report = self.report
        self.deliver(self.sigs[0])  # before anything else: the watch's pidfds are opened after the first signal
        self.watch.add(self.targets.values())
        steps = len(self.sigs) - 1
        if not report.signals_sent[0]["sent"] and not report.signals_sent[0]["group"]:
            steps = 0  # nothing verified to signal (gone, or a reused pid): no grace, no second signal
        self.grace(steps)
        if report.gone_at is None and (steps or report.sent_any):
            self.confirm_death()

    def grace(self, steps: int) -> None:
        """The signals after the first, the grace split evenly between them; the last one at once past
        the hard ceiling or when hurried."""
        report = self.report
        i = 1
        while i <= steps:
            self.reread_until(report.started + self.order.grace * i / steps)
            if report.gone_at is not None:
                break
            if report.hard_ceiling or self.hurry():
                i = steps  # straight to the last signal
            self.deliver(self.sigs[i])
            i += 1

    def reread_until(self, deadline: float) -> None:
        """Wait and re-read until `deadline`; sooner when all are gone (gone_at) or the hard ceiling is passed."""
        report = self.report
        while not self.hurry() and (left := deadline - time.monotonic()) > 0:
            self.watch.wait(min(STEP, left))
            joined, over = self.refresh()
            self.take(joined)
            if not self.any_alive():
                report.gone_at = time.monotonic()
                return
            if over and not report.hard_ceiling:
                report.hard_ceiling = True
                return

    def confirm_death(self) -> None:
        for _ in range(3):  # confirm death; catch members that appeared meanwhile
            deadline = time.monotonic() + DEATH_TIMEOUT
            while self.any_alive() and (left := deadline - time.monotonic()) > 0:
                self.watch.wait(min(STEP, left))
            if self.any_alive():
                break  # survived the last signal for DEATH_TIMEOUT: reported, not retried forever
            joined, _ = self.refresh()
            self.take(joined)
            if not self.any_alive():
                break
            self.deliver(self.sigs[-1])
        if not self.any_alive():
            self.report.gone_at = time.monotonic()

    def deliver(self, sig: int) -> None:
        live = [p for p in self.targets.values() if self.actuator.alive(p)]
        d = self.actuator.signal_all(live, sig, self.order.pgid, self.order.cgroup)
        self.report.signals_sent.append(
            {
                "signal": signal_name(sig),
                "at_seconds": round(time.monotonic() - self.report.started, 3),
                "sent": len(d.sent),
                "mismatch": len(d.mismatch),
                "denied": len(d.denied),
                "group": d.group,
            }
        )

    def take(self, procs: Iterable[ProcessInfo]) -> None:
        fresh = [p for p in procs if p.identity not in self.targets]
        for p in fresh:
            self.targets[p.identity] = p
        self.watch.add(fresh)

    def any_alive(self) -> bool:
        return any(self.actuator.alive(p) for p in self.targets.values())
