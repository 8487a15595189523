"""Memory pressure (PSI) at the edge: parsing `pressure/memory` files and waiting for a stall.

A PSI file (`/proc/pressure/memory` for the host, `memory.pressure` in a cgroup v2 directory) reads

    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

avg* are percentages of wall time in which some (or all non-idle) tasks stalled on memory; total is
the stall time in microseconds since boot. `parse_pressure` returns them as ratios and seconds.

`PressureWatch` waits for one condition. Where the kernel accepts a PSI trigger (a line
"some 150000 1000000" written to the file opened O_RDWR|O_NONBLOCK), the wait is a `poll()` for
POLLPRI on that descriptor: no reads at all until the kernel says the stall happened. Where it
refuses (EINVAL on kernels built without triggers, or with PSI disabled; EPERM for an unprivileged
user on some kernels), the watch falls back to reading the file every `period` and comparing the
total's growth over the window (or avg10) with the threshold. `poll()` is used, never `select()`:
a descriptor above 1024 must not break the enforcer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import time
from collections import deque
from dataclasses import dataclass

from .sample import MemoryPressure, PressureLine, Sample

log = logging.getLogger(__name__)

# The kernel's limits for a trigger window (kernel/sched/psi.c): 500 ms .. 10 s.
MIN_WINDOW = 0.5
MAX_WINDOW = 10.0
FALLBACK_PERIOD = 0.1  # seconds between reads when the kernel refuses a trigger


def _line(fields: list[bytes]) -> PressureLine:
    values = dict(f.split(b"=", 1) for f in fields)
    return PressureLine(
        avg10=float(values[b"avg10"]) / 100,
        avg60=float(values[b"avg60"]) / 100,
        avg300=float(values[b"avg300"]) / 100,
        total_seconds=int(values[b"total"]) / 1e6,
    )


def parse_pressure(data: bytes) -> MemoryPressure:
    """The readings of a PSI file; ValueError when it is not one."""
    lines: dict[bytes, PressureLine] = {}
    for raw in data.splitlines():
        parts = raw.split()
        if parts and parts[0] in (b"some", b"full"):
            try:
                lines[parts[0]] = _line(parts[1:])
            except (KeyError, ValueError):
                raise ValueError(f"not a PSI line: {raw[:80]!r}") from None
    if b"some" not in lines:
        raise ValueError("no 'some' line: not a PSI file")
    return MemoryPressure(some=lines[b"some"], full=lines.get(b"full"))


def read_pressure(path: str) -> MemoryPressure | None:
    """The readings of `path`, or None where it does not exist or cannot be read (no PSI, psi=0)."""
    try:
        with open(path, "rb") as f:
            return parse_pressure(f.read())
    except (OSError, ValueError):
        return None


def host_pressure_path(procfs: str = "/proc") -> str:
    return os.path.join(procfs, "pressure", "memory")


def cgroup_pressure_path(cgroup: str, cgroupfs: str = "/sys/fs/cgroup") -> str:
    """`memory.pressure` of a cgroup v2 directory: an absolute path as given, else under the cgroup mount
    (on a hybrid v1/v2 host the v2 tree is usually at `<cgroupfs>/unified`)."""
    if os.path.isabs(cgroup) and os.path.exists(os.path.join(cgroup, "memory.pressure")):
        return os.path.join(cgroup, "memory.pressure")
    rel = cgroup.strip("/")
    for base in (cgroupfs, os.path.join(cgroupfs, "unified")):
        path = os.path.join(base, rel, "memory.pressure")
        if os.path.exists(path):
            return path
    return os.path.join(cgroupfs, rel, "memory.pressure")


class StallWindow:
    """Stall seconds per `window`, from successive (monotonic, total) readings of one PSI line.

    The estimate spans from the newest reading at least `window` old to now, scaled to the window, so
    it is the stall of the last window when readings come often, and the average rate otherwise.
    None until two readings span some time.
    """

    def __init__(self, window: float):
        self.window = window
        self._readings: deque[tuple[float, float]] = deque()

    def add(self, now: float, total_seconds: float) -> float | None:
        r = self._readings
        if r and total_seconds < r[-1][1]:  # a counter reset (the cgroup was recreated): start over
            r.clear()
        r.append((now, total_seconds))
        while len(r) > 2 and r[1][0] <= now - self.window:
            r.popleft()
        then, before = r[0]
        if now <= then:
            return None
        return (total_seconds - before) * self.window / max(self.window, now - then)


@dataclass(frozen=True)
class Threshold:
    """What a watch waits for: a stall of `stall` seconds within `window`, or avg10 above `avg10`."""

    kind: str = "some"  # some | full
    stall: float | None = None
    window: float = 1.0
    avg10: float | None = None


class PressureWatch:
    """Wait until memory pressure in one PSI file crosses a threshold.

        watch = PressureWatch("/proc/pressure/memory", Threshold("some", stall=0.15, window=1.0))
        if watch.wait(timeout=2.0): ...     # True: the threshold was crossed (kernel trigger or fallback read)
        watch.mode                         # "trigger" | "fallback"
        watch.close()

    `trigger=False` skips the kernel trigger (fixture files, where a write would change the file).
    """

    def __init__(self, path: str, threshold: Threshold, trigger: bool = True, period: float = FALLBACK_PERIOD):
        self.path = path
        self.threshold = threshold
        self.period = period
        self.mode = "fallback"
        self.refused: str | None = None  # why the kernel trigger is not used
        self.reads = 0
        self.last: MemoryPressure | None = None
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._window = StallWindow(threshold.window)
        if threshold.stall is None:
            self.refused = "avg10 thresholds are read, not triggered"
        elif not trigger:
            self.refused = "trigger disabled"
        else:
            self._open_trigger(threshold.stall)
        if self.mode == "fallback":
            log.info("memory pressure on %s: reading every %.0f ms (%s)", path, period * 1000, self.refused)

    def _open_trigger(self, stall: float) -> None:
        t = self.threshold
        line = f"{t.kind} {int(stall * 1e6)} {int(t.window * 1e6)}".encode() + b"\0"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self.refused = f"cannot open {self.path}: {os.strerror(e.errno or 0)}"
            return
        try:
            os.write(fd, line)
        except OSError as e:
            os.close(fd)
            self.refused = f"the kernel refused a trigger: {errno.errorcode.get(e.errno or 0, e.errno)}"
            return
        self._fd, self._poll = fd, select.poll()
        self._poll.register(fd, select.POLLPRI)
        self.mode = "trigger"
        log.info("memory pressure on %s: kernel trigger %s", self.path, line[:-1].decode())

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds; True as soon as the threshold is crossed."""
        if self._poll is not None:
            try:
                events = self._poll.poll(max(0, int(timeout * 1000)))
            except InterruptedError:
                return False
            for _, ev in events:
                if ev & select.POLLERR:  # the file went away (its cgroup was removed): read from now on
                    self._drop_trigger("the trigger's file went away")
                    return False
                if ev & select.POLLPRI:
                    return True
            return False
        deadline = time.monotonic() + timeout
        while True:
            if self.crossed():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.period, left))

    def crossed(self) -> bool:
        """Read the file once and compare with the threshold (the fallback's step)."""
        p = read_pressure(self.path)
        self.reads += 1
        if p is None:
            return False
        self.last = p
        line = p.some if self.threshold.kind == "some" else p.full
        if line is None:
            return False
        if self.threshold.avg10 is not None:
            return line.avg10 > self.threshold.avg10
        stall = self._window.add(time.monotonic(), line.total_seconds)
        return stall is not None and self.threshold.stall is not None and stall >= self.threshold.stall

    def _drop_trigger(self, why: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._poll = None
        self.mode, self.refused = "fallback", why

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._poll = None


class PressureWatches:
    """One `PressureWatch` per `memory_pressure_above` rule of a config, waited on together: the enforcer
    thread's wake-up between full samples.

        watches = PressureWatches.from_config(config)
        if watches and watches.wait(0.5):                      # kernel triggers in one poll(), or reads
            fresh = watches.refresh(latest_sample)             # the latest Sample with PSI read now
            decide(fresh, [r for r in rules if r.condition == "memory_pressure_above"], state, ctx)

    Pass only the pressure rules to `decide` with a refreshed sample: its groups are as old as the last walk.
    """

    def __init__(
        self,
        watches: list[PressureWatch],
        procfs: str = "/proc",
        cgroupfs: str = "/sys/fs/cgroup",
        cgroups: tuple[str, ...] = (),
    ):
        self.watches = watches
        self.procfs, self.cgroupfs, self.cgroups = procfs, cgroupfs, cgroups
        self._poll: select.poll | None = None
        armed = [w._fd for w in watches if w._fd is not None]
        if armed:  # no poll() on Windows
            poll = self._poll = select.poll()
            for fd in armed:
                poll.register(fd, select.POLLPRI)

    @classmethod
    def from_config(cls, config, trigger: bool = True) -> PressureWatches:
        paths = config.paths
        watches, cgroups = [], []
        for rule in config.enforcer.rules:
            c = rule.memory_pressure_above
            if c is None:
                continue
            if c.cgroup is not None and c.cgroup not in cgroups:
                cgroups.append(c.cgroup)
            path = (
                host_pressure_path(paths.procfs) if c.cgroup is None else cgroup_pressure_path(c.cgroup, paths.cgroupfs)
            )
            if os.path.exists(path):
                watches.append(PressureWatch(path, Threshold(c.kind, c.stall, c.window, c.avg10), trigger=trigger))
        return cls(watches, paths.procfs, paths.cgroupfs, tuple(cgroups))

    def __bool__(self) -> bool:
        return bool(self.watches)

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout`; True as soon as any watch's threshold is crossed."""
        reading = [w for w in self.watches if w.mode == "fallback"]
        deadline = time.monotonic() + timeout
        while True:
            if any(w.crossed() for w in reading):
                return True
            left = deadline - time.monotonic()
            step = left if not reading else min(left, min(w.period for w in reading))
            if step <= 0:
                return False
            if self._poll is not None and any(w.mode == "trigger" for w in self.watches):
                for fd, ev in self._poll.poll(int(step * 1000)):
                    if ev & select.POLLPRI:
                        return True
                    if ev & select.POLLERR:  # the cgroup went away: that watch reads from now on
                        self._poll.unregister(fd)
                        w = next(w for w in self.watches if w._fd == fd)
                        w._drop_trigger("the trigger's file went away")
                        reading.append(w)
            else:
                time.sleep(step)

    def refresh(self, sample: Sample) -> Sample:
        """`sample` with the host's and the watched cgroups' PSI read now, and now as its time."""
        cgroups = {}
        for key in self.cgroups:
            reading = read_pressure(cgroup_pressure_path(key, self.cgroupfs))
            if reading is not None:
                cgroups[key] = reading
        return dataclasses.replace(
            sample,
            monotonic=time.monotonic(),
            cgroup_pressure=cgroups,
            pressure=read_pressure(host_pressure_path(self.procfs)),
        )

    def close(self) -> None:
        for w in self.watches:
            w.close()
