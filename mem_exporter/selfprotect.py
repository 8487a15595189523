"""The enforcer protects itself, like earlyoom and oomd: memory locked, a low oom_score_adj.

Applied by `enforce`, and by `serve` only when the config enables the enforcer; a plain
exporter stays an ordinary process. Both steps fail softly: one log line says what is
missing, and the gauges `mem_exporter_enforcer_memory_locked` and
`mem_exporter_enforcer_oom_score_adj` show what holds.

- `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: the enforcer's pages stay in RAM, so its
  decision and kill path never wait on swap-in under the very pressure it is there to relieve.
  MCL_ONFAULT (Linux >= 4.4) locks pages as they are touched instead of populating every mapping
  (thread stacks, arenas reserved but never used); without it, plain MCL_CURRENT|MCL_FUTURE.
  Tried only with CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK: under a finite limit, MCL_FUTURE
  would make the enforcer's own allocations fail once the limit is reached.
- `/proc/self/oom_score_adj` (-1000..1000, default -900): the kernel's OOM killer picks others
  first. Raising it is always allowed; lowering it needs CAP_SYS_RESOURCE. A lower negative value
  set by a privileged parent (kubelet, systemd) is kept.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import sys
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4  # <sys/mman.h> on Linux
CAP_IPC_LOCK, CAP_SYS_RESOURCE = 14, 24  # <linux/capability.h>


def effective_capabilities(procfs: str = "/proc") -> int | None:
    """The CapEff bit mask of this process, None where it cannot be read (not Linux)."""
    try:
        with open(f"{procfs}/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def has_capability(cap: int, procfs: str = "/proc") -> bool:
    caps = effective_capabilities(procfs)
    return caps is not None and bool(caps >> cap & 1)


def _mlockall(flags: int) -> int:
    """0, or the errno of libc's mlockall(flags)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.mlockall(ctypes.c_int(flags)) == 0 else ctypes.get_errno()


def should_write_oom_score_adj(current: int | None, asked: int) -> bool:
    """Write unless a privileged parent already set a lower, negative value (kubelet gives a Guaranteed pod's
    containers -997, systemd's OOMScoreAdjust= may go lower): raising it would only weaken the protection,
    and an unprivileged write also pins the floor there for good."""
    return current is None or current >= 0 or asked <= current


@dataclass
class SelfProtection:
    """What was asked and what holds; `apply()` once, at start, after the heap is trimmed."""

    mlock: bool = True
    oom_score_adj: int | None = -900
    procfs: str = "/proc"
    memory_locked: bool = False
    oom_score_adj_now: int | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, enforcer_config, procfs: str = "/proc") -> SelfProtection:
        return cls(mlock=enforcer_config.mlock, oom_score_adj=enforcer_config.oom_score_adj, procfs=procfs)

    def apply(self) -> SelfProtection:
        if self.mlock:
            self._lock_memory()
        if self.oom_score_adj is not None:
            self._set_oom_score_adj(self.oom_score_adj)
        else:
            self.oom_score_adj_now = self._read_oom_score_adj()
        return self

    def _refuse(self, text: str) -> None:
        self.problems.append(text)
        log.warning("self-protection: %s", text)

    def _lock_memory(self) -> None:
        if not sys.platform.startswith("linux"):
            self._refuse("memory not locked: mlockall is used on Linux only")
            return
        import resource  # Unix only

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if not has_capability(CAP_IPC_LOCK, self.procfs) and soft != resource.RLIM_INFINITY:
            self._refuse(
                f"memory not locked: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {soft} bytes "
                "(add the capability, or set the memlock ulimit to unlimited)"
            )
            return
        err = _mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
        if err == errno.EINVAL:  # a kernel before 4.4: no MCL_ONFAULT
            err = _mlockall(MCL_CURRENT | MCL_FUTURE)
        if err:
            self._refuse(f"memory not locked: mlockall failed with {errno.errorcode.get(err, err)}")
            return
        self.memory_locked = True
        log.info("self-protection: memory locked (mlockall)")

    def _read_oom_score_adj(self) -> int | None:
        try:
            with open(f"{self.procfs}/self/oom_score_adj") as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _set_oom_score_adj(self, value: int) -> None:
        path = f"{self.procfs}/self/oom_score_adj"
        current = self._read_oom_score_adj()
        if not should_write_oom_score_adj(current, value):
            self.oom_score_adj_now = current
            log.info("self-protection: oom_score_adj stays %s, already below the %d asked for", current, value)
            return
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except PermissionError:
            self._refuse(
                f"oom_score_adj not set to {value}: lowering it needs CAP_SYS_RESOURCE "
                f"(it stays {self._read_oom_score_adj()})"
            )
        except OSError as e:
            self._refuse(f"oom_score_adj not set to {value}: {path}: {e.strerror or e}")
        self.oom_score_adj_now = self._read_oom_score_adj()
        if self.oom_score_adj_now == value:
            log.info("self-protection: oom_score_adj %d", value)


class SelfProtectionCollector:
    """`mem_exporter_enforcer_memory_locked` (0/1) and `mem_exporter_enforcer_oom_score_adj`."""

    def __init__(self, protection: SelfProtection):
        self.protection = protection

    def describe(self) -> list:
        return []

    def collect(self):
        p = self.protection
        locked = GaugeMetricFamily(
            "mem_exporter_enforcer_memory_locked", "1 when the enforcer's memory is locked in RAM (mlockall), else 0."
        )
        locked.add_metric([], 1 if p.memory_locked else 0)
        yield locked
        if p.oom_score_adj_now is not None:
            adj = GaugeMetricFamily(
                "mem_exporter_enforcer_oom_score_adj",
                "The enforcer's oom_score_adj (-1000..1000; lower: the kernel OOM killer spares it).",
            )
            adj.add_metric([], p.oom_score_adj_now)
            yield adj
