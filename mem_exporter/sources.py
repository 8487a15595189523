"""Which process source reads: procfs where there is one (facilities.procfs_at), psutil elsewhere.

The readers implement reader.Reader; the names are facilities.SOURCES. Kept apart from the interface
and from both readers, so neither imports the other or this.
"""

from __future__ import annotations

from .config import Config
from .facilities import procfs_at
from .reader import Reader


def resolve_source(config: Config) -> str:
    """`source: auto` is procfs where the configured procfs root exists (a fixture tree counts), psutil elsewhere."""
    if config.source != "auto":
        return config.source
    return "procfs" if procfs_at(config.paths.procfs) else "psutil"


def make_reader(config: Config) -> tuple[str, Reader]:
    """(the source's name, a reader of it) for this config."""
    needs_exe = (
        any(g.match.needs_exe for g in config.groups.named)
        or any(r.match.needs_exe for r in config.enforcer.rules)
        or any(m.needs_exe for m in config.enforcer.protect)
    )
    pss, cgroup = config.memory == "pss", config.groups.by in ("cgroup", "container")
    reader: Reader
    if resolve_source(config) == "procfs":  # each reader's module imported only where it reads
        from .procfs import ProcfsReader

        reader = ProcfsReader(config.paths.procfs, pss=pss, exe=needs_exe, cgroup=cgroup)
        return "procfs", reader
    from .psutil_source import PsutilReader

    reader = PsutilReader(pss=pss, exe=needs_exe, cgroup=cgroup)
    return "psutil", reader
