"""`mem-exporter run` options: flags first, then MEM_EXPORTER_* environment variables, then defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..platforms import native_memtype
from ..records import MB
from ..units import parse_duration, parse_size

EXIT_SETUP = 2  # bad option or environment variable, unwritable log, busy port: the command never ran
EXIT_MEMORY = 137  # killed for memory: 128 + SIGKILL, what a shell shows for a SIGKILL death
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

ENV_THRESHOLD = "MEM_EXPORTER_THRESHOLD"
ENV_INTERVAL = "MEM_EXPORTER_INTERVAL"
ENV_LOG = "MEM_EXPORTER_LOG"
ENV_VERBOSE = "MEM_EXPORTER_VERBOSE"
ENV_SOURCE = "MEM_EXPORTER_SOURCE"
ENV_MEMORY = "MEM_EXPORTER_MEMORY"
ENV_NO_CGROUP = "MEM_EXPORTER_NO_CGROUP"
ENV_CGROUPFS = "MEM_EXPORTER_CGROUPFS"
YES = ("1", "true", "yes", "on")
SOURCES = ("auto", "procfs", "psutil")
MEMTYPES = ("auto", "rss", "footprint", "private")


class SetupError(Exception):
    """A problem found before the command starts: one line on stderr, exit 2."""


@dataclass(frozen=True)
class RunOptions:
    command: tuple[str, ...]
    threshold: int = 800 * MB
    interval: float = 2.0
    grace: float = 5.0
    log: str | None = None
    verbose: bool = False
    notify: bool = False
    listen: str | None = None
    source: str = "auto"  # auto | procfs | psutil: how the tree is read
    memory: str = "rss"  # rss | footprint (macOS) | private (Windows): what the threshold limits
    threshold_text: str = "800"  # the threshold as the user wrote it, for the log and the report
    keep_phase: bool = False  # adopt a phase set before the run started (by a session still alive)
    cgroupfs: str | None = "/sys/fs/cgroup"  # where the command's cgroup is made (Linux); None: no cgroup


def options_from(args, environ: Mapping[str, str] = os.environ) -> RunOptions:
    """Flags first, then MEM_EXPORTER_* environment variables, then defaults; SetupError names the culprit."""
    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise SetupError("no command to run (usage: mem-exporter run [-t 800] -- CMD [ARGS...])")

    def pick(flag, option: str, env: str, parse, default):
        if flag is not None:
            raw, where = flag, option
        elif environ.get(env, "").strip():
            raw, where = environ[env], env
        else:
            return default
        try:
            value = parse(raw)
        except ValueError as e:
            raise SetupError(f"{where}: {e}") from None
        if not value > 0:
            raise SetupError(f"{where}: must be more than 0 (got {raw!r})")
        return value

    threshold = pick(args.threshold, "--threshold", ENV_THRESHOLD, lambda v: parse_size(v, bare_unit=MB), 800 * MB)
    threshold_text = str(args.threshold if args.threshold is not None else environ.get(ENV_THRESHOLD, "") or "800")
    interval = pick(args.interval, "--interval", ENV_INTERVAL, parse_duration, 2.0)
    if interval > 3600:
        raise SetupError(f"--interval: at most 1h (got {interval:g}s)")
    grace = 5.0
    if args.grace is not None:
        try:
            grace = parse_duration(args.grace)
        except ValueError as e:
            raise SetupError(f"--grace: {e}") from None
    _, sep, port = (args.listen or "").rpartition(":")
    if args.listen and not (sep and port.isdigit() and int(port) <= 65535):
        raise SetupError(f"--listen: {args.listen!r} is not HOST:PORT (example: 127.0.0.1:9715)")
    verbose = bool(args.verbose) or environ.get(ENV_VERBOSE, "").strip().lower() in ("1", "true", "yes", "on")
    source = getattr(args, "source", None) or environ.get(ENV_SOURCE, "").strip() or "auto"
    if source not in SOURCES:
        raise SetupError(f"{ENV_SOURCE}: {source!r} is not one of {', '.join(SOURCES)}")
    memory = getattr(args, "memory", None) or environ.get(ENV_MEMORY, "").strip() or "auto"
    if memory not in MEMTYPES:
        raise SetupError(f"{ENV_MEMORY}: {memory!r} is not one of {', '.join(MEMTYPES)}")
    if memory not in ("auto", "rss") and memory != native_memtype():
        where = "--memory" if getattr(args, "memory", None) else ENV_MEMORY
        raise SetupError(f"{where}: {memory} is read on {'macOS' if memory == 'footprint' else 'Windows'} only")
    no_cgroup = getattr(args, "no_cgroup", False) or environ.get(ENV_NO_CGROUP, "").strip().lower() in YES
    return RunOptions(
        command=tuple(command),
        threshold=threshold,
        interval=interval,
        grace=grace,
        log=args.log or environ.get(ENV_LOG) or None,
        verbose=verbose,
        notify=bool(args.notify),
        listen=args.listen,
        source=source,
        memory=native_memtype() if memory == "auto" else memory,
        threshold_text=threshold_text.strip(),
        keep_phase=bool(getattr(args, "keep_phase", False)),
        cgroupfs=None if no_cgroup else environ.get(ENV_CGROUPFS, "").strip() or "/sys/fs/cgroup",
    )
