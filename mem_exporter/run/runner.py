"""The Runner: `run`'s one loop on the main thread, over a Sampler that reads only the command's tree.

Each pass asks the supervisor for the command's exit, then reads the tree: once per interval (every
YOUNG_EVERY while the run is young) a full sample from the Sampler over a TreeReader (tree.py), in
between the tree's members alone, every 50 to 100 ms near the limit. Each reading is the tree as one
group; the peak and the growth rate follow every reading, and the consumers (the log, `--listen`'s
exposition, the status line, the limit check) take it in turn, as `serve`'s and `enforce`'s take each
Sample. Stopping the tree goes through the enforcer's kill engine (kill.execute).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .. import platforms
from ..cgroups import Request
from ..config import Groups, Notify, Rule, load_config
from ..enforcer.actuator import own_context
from ..enforcer.actuators import make_actuator
from ..enforcer.events import Notifier
from ..enforcer.kill import KillOrder, execute
from ..enforcer.lane import Growth
from ..enforcer.metrics import EnforcerCollector, EnforcerState, Tally
from ..enforcer.policy import Action, poll_period, protection
from ..naming import program_name
from ..phase import PhaseWatcher
from ..reader import Reader
from ..records import MB, exit_record, make_event, mb, peak_record, run_sample_record, session_header
from ..runlog import RunLog, resolve_path
from ..sample import GroupSample, ProcessInfo, Sample, SystemMemory
from ..sampler import Sampler
from ..signals import SIGKILL, signal_name
from ..zones import zone_for
from .adopt import PhaseAdopter
from .options import (
    EXIT_MEMORY,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_SETUP,
    RunOptions,
    SetupError,
    options_from,
)
from .statusline import StatusLine, usable
from .supervisor import Supervisor
from .supervisors import make_supervisor
from .tree import TreeReader, tree_group

if TYPE_CHECKING:
    from ..exposition import Exposition
    from ..http_server import MetricsServer

log = logging.getLogger(__name__)

RULE = "run"  # the rule label of the limit metric and of the events
HARD_CEILING = 0.10  # during the grace period, this far over the limit gets SIGKILL at once
# the cgroup's kernel limit is the hard ceiling, with at least this much over the limit: the kernel also
# charges what RSS does not count (page tables, kernel stacks), and must not beat `run` to a small limit
KERNEL_SLACK = 16 * 2**20
SETTLE = 0.5  # when the command exits, what it leaves gets this long to exit by itself before SIGTERM
TREE_EVERY = 0.5  # the tree's few files are re-read at least this often, whatever the full interval
FAST_LOG_EVERY = 0.5  # fast readings in the caution zone are logged at most this often (full samples always)
TTY_STATUS_EVERY = 0.2
YOUNG_SECONDS = 5.0  # a young run is fully sampled every YOUNG_EVERY: a 3 s test suite gets a dozen samples
YOUNG_EVERY = 0.25
COLOURS = {"safe": "32", "caution": "33", "critical": "31"}  # green, yellow, red

MEMORY_WORDS = {"rss": "memory", "footprint": "memory footprint", "private": "private commit"}
CONDITIONS = {"signal": "signal", "exited": "command_exited", "error": "error"}  # and memory: max_<memtype>


def processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


@dataclasses.dataclass(frozen=True)
class Reading:
    """One reading of the tree, as each consumer gets it: the tree as one group, and the full sample it
    came with (None for a fast reading: the tree's members alone, between full ones)."""

    group: GroupSample
    sample: Sample | None

    @property
    def full(self) -> bool:
        return self.sample is not None


class Peak:
    """The highest reading of the tree, members and all, and when and in which phase it was read."""

    def __init__(self) -> None:
        self.bytes = 0
        self.group: GroupSample | None = None
        self.t = 0.0
        self.phase: str | None = None

    def observe(self, group: GroupSample, used: int, phase: str | None) -> None:
        if used > self.bytes or self.group is None:
            self.bytes, self.group, self.t, self.phase = used, group, time.time(), phase


class Runner:
    def __init__(self, opts: RunOptions, environ: Mapping[str, str] = os.environ, supervisor: Supervisor | None = None):
        self.opts = opts
        self.supervisor = supervisor if supervisor is not None else make_supervisor()
        self.name = program_name(opts.command)  # `bash -c "bun test"` is `bun`
        self.started = time.time()
        self.log_path = resolve_path(opts.log, self.name, self.started, os.getpid(), environ)
        self.config = load_config(None, {"interval": opts.interval, "source": opts.source})
        self.tree: TreeReader | None = None  # the Sampler's reader: the tree under the wrapper, as tree.py reads it
        # `mem-exporter phase NAME` marks samples
        self.sampler = Sampler(
            self.config, phase_watcher=PhaseWatcher(), scope=self._scoped, host_load=bool(opts.listen)
        )
        self.actuator = make_actuator(self.config)
        # nothing in the user's own tree is exempt, not even a member that joined the wrapper's process group
        self.ctx = dataclasses.replace(
            own_context(self.config.paths.procfs, builtin=False, reader=self.reader), pgid=-1
        )  # ancestors read through the tree's reader, which asks the source it narrows
        self.rule = Rule(name=RULE, max_rss=opts.threshold, grace=opts.grace, hard_ceiling=HARD_CEILING)
        self.memtype = opts.memory  # rss | footprint | private: the number the threshold limits
        self.group: GroupSample | None = None
        self.breach: GroupSample | None = None
        self.system: SystemMemory | None = None
        self.latest: Sample | None = None
        self.phase: str | None = None
        self.adopter = PhaseAdopter(self.started, opts.keep_phase, self.config.paths.procfs)
        self.peak = Peak()
        self._last_flush = 0.0
        self._t0 = time.monotonic()  # when the command started: a young run is sampled faster
        self.tally = Tally()
        self.cmd_pid = 0
        self.cmd_status: int | None = None
        self.kernel_kills = 0  # processes the kernel killed at the cgroup's limit (the backstop)
        self.cgroup_peak: int | None = None  # the kernel's high-water mark of the cgroup's usage
        self.signalled: int | None = None
        self.stopping = False
        self.hurry = False
        self.log: RunLog | None = None
        self.server: MetricsServer | None = None
        self.exposition: Exposition | None = None
        self.growth = Growth()
        self._last_logged = 0.0
        self._last_status = -1e9
        self._line: StatusLine | None = None  # -v on a terminal that can keep a last row
        self._serving = False
        # what each reading goes through, in this order (the limit check last: it sees what was logged)
        self.consumers: list[Callable[[Reading], None]] = [self._log, self._expose, self._status, self._check_limit]

    def _scoped(self, reader: Reader) -> Reader:
        """The Sampler's reader narrowed to the tree under the wrapper (this process)."""
        self.tree = TreeReader(reader, self.config.paths.procfs, os.getpid())
        return self.tree

    @property
    def reader(self) -> TreeReader:
        """The tree's reader, made with the Sampler."""
        if self.tree is None:
            raise RuntimeError("the Sampler makes the tree's reader")
        return self.tree

    @property
    def members(self) -> dict[int, ProcessInfo]:
        """The tree as last read."""
        return self.reader.members

    @property
    def run_log(self) -> RunLog:
        """The log, open from the start of run() on."""
        if self.log is None:
            raise RuntimeError("the run log opens in run()")
        return self.log

    # --- the whole run ----------------------------------------------------------------------
    def run(self) -> int:
        self._open_outputs()  # SetupError: nothing has started yet
        if self.opts.verbose and usable(sys.stderr):
            self._line = StatusLine(sys.stderr)
            self._line.open()  # before the command writes its first line
        try:
            self.cmd_pid = self.supervisor.start(self.opts.command, self._on_signal, self._cgroup_request())
        except OSError as e:
            status = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_NOT_EXECUTABLE
            if self._line is not None:
                self._line.close()
            print(f"mem-exporter: {self.opts.command[0]}: {e.strerror or e}", file=sys.stderr)
            self._write_header()
            self._finish_log("not_started", status, None)
            return status
        self._write_header()
        self._t0 = time.monotonic()
        if self.server is not None:
            self.server.start()
            self._serving = True
        cause = "error"
        try:
            cause = self._watch()
        finally:  # whatever happened, no process of the tree outlives the wrapper
            first = self.signalled if cause == "signal" and self.signalled is not None else signal.SIGTERM
            event = self._terminate(first, cause)
            self._reap()
            cgroup = self.supervisor.cgroup
            self.kernel_kills = cgroup.oom_kills() if cgroup else 0  # before restore() removes the cgroup
            self.cgroup_peak = cgroup.peak() if cgroup else None
            self.supervisor.restore()
            status = self._exit_status(cause, event)
            if self._line is not None:  # the terminal scrolls whole again before anything else is said
                self._line.close()
            self._report(cause, event, status)
            self._finish_log(cause, status, event)
        return status

    @property
    def kernel_limit(self) -> int:
        return int(self.opts.threshold + max(self.opts.threshold * HARD_CEILING, KERNEL_SLACK))

    def _cgroup_request(self) -> Request | None:
        """A cgroup of the command's own, its kernel limit the hard ceiling: a backstop should `run` stall."""
        if self.opts.cgroupfs is None or not platforms.PLATFORM.startswith("linux"):
            return None
        name = f"mem-exporter-run-{os.getpid()}"
        return Request(name, self.kernel_limit, self.opts.cgroupfs, self.config.paths.procfs)

    def _killed(self, event: dict | None) -> bool:
        """The whole tree confirmed dead after a kill: by our signals, or by the kernel at the cgroup's limit."""
        if event is None:
            return self.kernel_kills > 0
        return event["outcome"] == "dead" or (event["outcome"] == "gone" and self.kernel_kills > 0)

    def _exit_status(self, cause: str, event: dict | None) -> int:
        if cause == "memory":  # 137 only for a kill that happened: the whole tree confirmed dead
            return EXIT_MEMORY if self._killed(event) else 1
        if cause == "signal" and self.signalled is not None:
            return 128 + self.signalled
        if self.cmd_status is None:
            return 1
        return self.cmd_status

    # --- set-up -----------------------------------------------------------------------------
    def _open_outputs(self) -> None:
        if self.opts.listen:  # first: a busy port must not leave an empty log behind
            from ..exposition import Exposition, SampleCollector, build_registry
            from ..http_server import MetricsServer, sample_health

            groups = Groups(min_memory=0)  # the tree is the one group: never folded into "other"
            exposition = self.exposition = Exposition(
                build_registry(SampleCollector(lambda: self.latest, lambda: groups), EnforcerCollector(self.snapshot))
            )
            try:
                self.server = MetricsServer(
                    self.opts.listen, exposition, sample_health(lambda: self.latest, lambda: self.opts.interval)
                )
            except (OSError, ValueError) as e:
                raise SetupError(f"cannot listen on {self.opts.listen}: {getattr(e, 'strerror', None) or e}") from None
        try:
            self.log = RunLog(self.log_path)
        except OSError as e:
            if self.server is not None:
                self.server.server_close()
            raise SetupError(f"cannot write the log {self.log_path}: {e.strerror or e}") from None

    def _on_signal(self, signum: int) -> None:
        """A forwarded signal (SIGINT, SIGTERM, SIGHUP, SIGBREAK), called by the supervisor's handler."""
        if self.stopping or self.signalled:
            self.hurry = True  # a second Ctrl-C, or a signal while stopping: SIGKILL without waiting
        else:
            self.signalled = signum

    def _write_header(self) -> None:
        self.run_log.write(
            session_header(
                self.name,
                self.started,
                command=list(self.opts.command),
                command_pid=self.cmd_pid or None,
                threshold_bytes=self.opts.threshold,
                threshold_mb=mb(self.opts.threshold),
                threshold_text=self.opts.threshold_text,
                interval=self.opts.interval,
                grace=self.opts.grace,
                memtype=self.memtype,
                terminal=self.supervisor.tty is not None,
                subreaper=self.supervisor.subreaper,
                cgroup=self.supervisor.cgroup.describe() if self.supervisor.cgroup else None,
                cgroup_note=self.supervisor.cgroup_note or None,
            )
        )
        self.run_log.flush()
        if self.opts.verbose and self.supervisor.cgroup_note:
            print(f"mem-exporter: {self.supervisor.cgroup_note}", file=sys.stderr)

    # --- watching ---------------------------------------------------------------------------
    def _watch(self) -> str:
        next_full = 0.0
        while True:
            self._reap()
            if self.signalled:
                return "signal"
            if self.cmd_status is not None:
                return "memory" if self._kernel_breach() else "exited"
            now = time.monotonic()
            full = now >= next_full
            if full:
                next_full = now + self._full_every(now)
            group = self._read(full)
            if self.breach is not None:
                return "memory"
            used = group.memory_bytes(self.memtype)
            period = min(
                TREE_EVERY,
                poll_period(self.opts.threshold - used, self.growth.rate(RULE), self.opts.interval),
            )
            self.supervisor.sleep(min(next_full, time.monotonic() + period) - time.monotonic())

    def _full_every(self, now: float) -> float:
        """The interval; YOUNG_EVERY while the run is young, when the tree is read through child links (a
        few reads of the tree's own files; never a walk of the host)."""
        young = not self.reader.lists_host and now - self._t0 < YOUNG_SECONDS
        return min(YOUNG_EVERY, self.opts.interval) if young else self.opts.interval

    def _kernel_breach(self) -> bool:
        """Whether the cgroup's kernel limit ended the command (its OOM killer, when `run` was too slow or
        stopped): a kill for memory like `run`'s own, the cgroup's high-water mark its measure."""
        cgroup = self.supervisor.cgroup
        if not cgroup or not cgroup.oom_kills():
            return False
        group = self.group or self._read(False, record=False)
        used = max(group.rss_bytes, cgroup.peak() or 0)
        self.breach = dataclasses.replace(group, rss_bytes=used)
        self.peak.bytes = max(self.peak.bytes, used)
        return True

    def _read(self, full: bool, record: bool = True) -> GroupSample:
        """Re-read the tree, `full` once per interval (a sample: system memory too); the peak and the
        growth follow every reading, the consumers take those that are `record`ed."""
        sample = self._sample() if full else None
        if sample is None:
            self._read_members()
        group = tree_group(self.members.values(), self.cmd_pid, self.name, self.memtype)
        self.group = group
        used = group.memory_bytes(self.memtype)
        self.peak.observe(group, used, self.phase)
        self.growth.observe(RULE, used, time.monotonic())
        if record:
            reading = Reading(group, sample)
            for consume in self.consumers:
                consume(reading)
        return group

    def _sample(self) -> Sample:
        """A full sample of the tree: a walk of the host where the tree is found from full listings."""
        sample = self.sampler.tick() if self.reader.lists_host else self.sampler.read()
        if all(sample.sources_up.values()):  # a failed read keeps the last tree and system memory
            self.system = sample.system
        self._adopt_phase()
        return sample

    def _read_members(self) -> None:
        """The tree alone, between full samples."""
        try:
            self.reader.read_members()
        except OSError as e:
            log.debug("reading the tree failed: %s", e)
            self.sampler.errors_total[self.sampler.source_name] += 1

    def _adopt_phase(self) -> None:
        """The phase file's phase, if it is one of this run's present (adopt.py); said once on stderr."""
        watcher = self.sampler.phase_watcher
        if watcher is None:
            return
        phase = self.adopter.adopt(watcher.phase, watcher.setter)
        if phase is not None and phase != self.phase:
            self._say(f"phase {phase} ({self.adopter.describe(watcher.setter)})")
        self.phase = phase

    def _say(self, line: str) -> None:
        try:
            if self._line is not None:
                self._line.close()  # the region is set again at the next redraw
            sys.stderr.write(f"mem-exporter: {line}\n")
            sys.stderr.flush()
        except OSError:
            pass

    # --- the consumers of each reading ------------------------------------------------------
    def _log(self, reading: Reading) -> None:
        """A line per full reading; from the caution zone on, fast readings too (every one past the limit)."""
        now, full, group = time.monotonic(), reading.full, reading.group
        share = group.memory_bytes(self.memtype) / self.opts.threshold
        if (
            full
            or share > 1
            or (zone_for("limit", share, self.config.zones) != "safe" and now - self._last_logged >= FAST_LOG_EVERY)
        ):
            self._last_logged = now
            self.run_log.write(
                run_sample_record(
                    group,
                    self.opts.threshold,
                    time.time(),
                    self.system,
                    fast=not full,
                    phase=self.phase,
                    memtype=self.memtype,
                )
            )
        if full and now - self._last_flush >= min(self.opts.interval, 1.0):
            self._last_flush = now
            self.run_log.flush()  # about once per interval (a young run samples faster): `tail -f` follows

    def _expose(self, reading: Reading) -> None:
        """What `--listen` serves: each full sample, the tree as its one group."""
        if reading.sample is None or self.exposition is None:
            return
        group = reading.group
        self.latest = dataclasses.replace(
            reading.sample, groups=(group,), exported=(group,), phase=self.phase, memtype=self.memtype
        )
        self.exposition.refresh()

    def _status(self, reading: Reading) -> None:
        if not self.opts.verbose:
            return
        now = time.monotonic()
        if self._line is not None and now - self._last_status < TTY_STATUS_EVERY:
            return
        if self._line is None and (not reading.full or now - self._last_status < self.opts.interval * 0.9):
            return  # plain lines: one per interval, a young run's faster samples aside
        self._last_status = now
        group = reading.group
        used = group.memory_bytes(self.memtype)
        share = used / self.opts.threshold
        text = (
            f"mem-exporter: {used / MB:.1f} MB of {self.opts.threshold / MB:g} MB ({share:.0%}), "
            f"peak {self.peak.bytes / MB:.1f} MB, {processes(group.processes)}"
        )
        if self.phase:
            text += f", phase {self.phase}"
        if self._line is not None:
            colour = None if os.environ.get("NO_COLOR") else COLOURS[zone_for("limit", share, self.config.zones)]
            self._line.draw(text, colour)
            return
        try:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except OSError:
            pass

    def _check_limit(self, reading: Reading) -> None:
        """The tree past the limit while it is watched: the reading that ends the watch."""
        if not self.stopping and reading.group.memory_bytes(self.memtype) > self.opts.threshold:
            self.breach = reading.group

    def _reap(self) -> None:
        """Let the supervisor collect exited children; keep the command's status once it has one."""
        status = self.supervisor.reap()
        if status is not None:
            self.cmd_status = status

    # --- stopping the tree --------------------------------------------------------------------
    def _terminate(self, first: int, cause: str) -> dict | None:
        """First signal to the whole tree, the grace period with re-reads, SIGKILL to whoever is left,
        confirmed death (the kill engine). The event, or None when nothing of the tree was left to stop."""
        self.stopping = True
        group = self.breach or self._read(False, record=False)  # forks since the last reading count too
        act = self.actuator
        cgroup = self.supervisor.cgroup
        charge = cgroup.charge() if cgroup else None  # the cgroup's own count, beside summed RSS (docs/run.md)

        def signallable() -> list[ProcessInfo]:
            return [p for p in self.members.values() if protection(p, self.ctx) is None]

        targets = signallable()
        if targets and cause == "exited":  # processes already on their way out (Ctrl-C reached the whole group)
            act.wait_gone(targets, SETTLE)
            self._reap()
            targets = [p for p in targets if act.alive(p)]
        if not targets:
            self.supervisor.sweep()
            return None
        ceiling = self.opts.threshold * (1 + HARD_CEILING)

        def refresh() -> tuple[list[ProcessInfo], bool]:
            self._reap()
            current = self._read(False)
            return signallable(), cause == "memory" and current.memory_bytes(self.memtype) > ceiling

        # killpg reaches forks not read yet; never when the group holds a process we must not signal
        spare = any(p.pgid == self.cmd_pid and protection(p, self.ctx) for p in self.members.values())
        order = KillOrder(
            signals=[first, SIGKILL], grace=self.opts.grace, targets=targets, pgid=None if spare else self.cmd_pid
        )
        report = execute(act, order, refresh, hurry=lambda: self.hurry)
        swept = self.supervisor.sweep()  # the cgroup: what the tree's signals did not reach
        self._reap()
        action = Action(
            kind=report.kind,
            rule=self.rule,
            group=group,
            condition=f"max_{self.memtype}" if cause == "memory" else CONDITIONS[cause],
            value=group.memory_bytes(self.memtype),
            limit=self.opts.threshold,
            at=report.started,
            targets=tuple(report.targets.values()),
            ceiling=ceiling if cause == "memory" else None,
        )
        event = make_event(
            action,
            time.time(),
            5,
            self.memtype,
            type="event",
            cause=cause,
            signal=signal_name(first),
            **report.event_fields(),
            ceiling=ceiling if cause == "memory" else None,
            peak_bytes=self.peak.bytes,
            cgroup_charge_bytes=charge,
        )
        if swept:
            event["survivors"] = sorted({*event["survivors"], *swept})
            event["outcome"] = "survived"
        if cause == "memory":
            self.tally.count(event, time.time())
        return event

    def snapshot(self) -> EnforcerState:
        """The run's limit and kills, under the enforcer's metric families."""
        return EnforcerState(
            rules=(RULE,),
            kills=dict(self.tally.kills),
            actions=dict(self.tally.actions),
            limits=((RULE, self.name, self.memtype, self.opts.threshold),),
            last_kill=dict(self.tally.last_kill),
            last_time_to_death=dict(self.tally.last_time_to_death),
        )

    # --- the end ------------------------------------------------------------------------------
    def _report(self, cause: str, event: dict | None, status: int) -> None:
        lines = []
        limit = f"{self.opts.threshold / MB:g} MB"
        command = " ".join(self.opts.command)
        g = self.breach
        if cause == "memory" and g is not None:
            verb = "killed" if self._killed(event) else "could not kill"
            lines.append(
                f"{verb} `{command}` ({processes(g.processes)}): {MEMORY_WORDS[self.memtype]} "
                f"{g.memory_bytes(self.memtype) / MB:.1f} MB passed the "
                f"limit of {limit} (peak {self.peak.bytes / MB:.1f} MB); exit status {status}"
            )
            top = ", ".join(f"{p.comm}[{p.pid}] {p.memory_bytes(self.memtype) / MB:.1f} MB" for p in g.top(5))
            lines.append(f"largest: {top}")
        elif cause == "signal" and event and self.signalled is not None:
            lines.append(
                f"got {signal_name(self.signalled)}: stopped `{command}` ({processes(len(event['signalled']))})"
            )
        elif cause == "exited" and event:
            lines.append(f"`{command}` exited; stopped {processes(len(event['signalled']))} it left running")
        if self.kernel_kills:
            lines.append(
                f"the kernel killed {processes(self.kernel_kills)} at the cgroup's limit of "
                f"{self.kernel_limit / MB:g} MB"
            )
        if event and event["survivors"]:
            lines.append(f"warning: still alive after SIGKILL: {' '.join(map(str, event['survivors']))}")
        if lines or self.opts.verbose:
            if cause != "memory":
                lines.append(f"peak {self.peak.bytes / MB:.1f} MB of {limit}")
            lines.append(f"log: {self.log_path}" if self.run_log.kept else "log: none (-l /dev/null)")
        try:
            for line in lines:
                sys.stderr.write(f"mem-exporter: {line}\n")
            sys.stderr.flush()
        except OSError:
            pass
        if event and cause == "memory" and self.opts.notify:
            notifier = Notifier(Notify(desktop=True))
            notifier.send(event)
            notifier.flush(3.0)

    def _finish_log(self, cause: str, status: int, event: dict | None) -> None:
        if self.peak.group is not None:  # the moment of the peak, with its members, whatever was logged
            self.run_log.write(
                peak_record(
                    self.peak.group,
                    self.opts.threshold,
                    self.peak.t,
                    self.system,
                    phase=self.peak.phase,
                    memtype=self.memtype,
                )
            )
        if event is not None:
            self.run_log.write(event)
        now = time.time()
        self.run_log.write(
            exit_record(
                now,
                self.started,
                cause,
                status,
                command_status=self.cmd_status,
                peak_bytes=self.peak.bytes,
                peak_mb=mb(self.peak.bytes),
                threshold_bytes=self.opts.threshold,
                command=list(self.opts.command),
                **self.adopter.log_fields(),
                kernel_oom_kills=self.kernel_kills,
                cgroup_peak_bytes=self.cgroup_peak,
            )
        )
        self.run_log.close()
        if self.server is not None and self._serving:
            self.server.stop()
        elif self.server is not None:
            self.server.server_close()


def main(args, environ: Mapping[str, str] = os.environ, supervisor: Supervisor | None = None) -> int:
    """`mem-exporter run`; the OS's supervisor (make_supervisor) unless one is given (tests force polling)."""
    try:
        runner = Runner(options_from(args, environ), environ, supervisor)
        return runner.run()
    except SetupError as e:
        print(f"mem-exporter run: {e}", file=sys.stderr)
        return EXIT_SETUP
