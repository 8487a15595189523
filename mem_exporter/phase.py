"""The current phase of a run (Idle, Model-Loading, ...): a one-line state file.

`mem-exporter phase NAME` replaces the file atomically; every sampler on the host
that watches the same path picks the name up on its next tick. The sampler stats
the file each tick and reads it only when it changed, so watching costs one stat.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

ENV = "MEM_EXPORTER_PHASE_FILE"
MAX_LENGTH = 64
_VALID = re.compile(r"^[^\x00-\x1f\x7f]+$")  # any printable text: it becomes a label value
SUGGESTED = ("Idle", "Model-Loading", "Model-Active", "Full-Processing")


def default_path() -> Path:
    """$MEM_EXPORTER_PHASE_FILE, else $XDG_RUNTIME_DIR/mem-exporter/phase, else /tmp/mem-exporter-UID/phase."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "mem-exporter" / "phase"
    return Path(tempfile.gettempdir()) / f"mem-exporter-{os.getuid()}" / "phase"


def resolve(path: str | os.PathLike | None) -> Path:
    return Path(path) if path else default_path()


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_LENGTH or not _VALID.match(name):
        raise ValueError(f"a phase name is 1 to {MAX_LENGTH} printable characters, got {name!r}")
    return name


def _private_dir(directory: Path) -> None:
    """Create the directory for this user only; refuse one in a shared place owned by someone else."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.lstat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid() and directory.parent == Path(tempfile.gettempdir()):
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}; set --phase-file or ${ENV}")


def write_phase(path: Path, name: str | None) -> None:
    """Set the phase (write a temporary file, then rename over the old one), or clear it with None."""
    if name is None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    name = check_name(name)
    _private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".phase-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
        os.chmod(tmp, 0o644)  # readable by an exporter running as another user, when the path is shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_phase(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:MAX_LENGTH] or None


class PhaseWatcher:
    """What a sampler calls each tick: the phase, re-read only when the file changed."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self._stamp: tuple | None = None
        self.phase: str | None = None

    def read(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self.phase = None, None
            return None
        except OSError:
            return self.phase  # unreadable for a moment: keep the last known phase
        # the inode changes on every atomic replace, which catches two writes within one mtime tick
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp != self._stamp:
            try:
                self.phase = read_phase(self.path)
            except OSError:
                return self.phase
            self._stamp = stamp
        return self.phase
