"""The current phase of a run (Idle, Model-Loading, ...): a one-line state file.

`mem-exporter phase NAME` replaces the file atomically; every sampler on the host
that watches the same path picks the name up on its next tick. The sampler lstats
the file each tick and reads it only when it changed, so watching costs one lstat.

The phase reaches an unauthenticated endpoint (`mem_exporter_phase_info`), so a reader
trusts only what its own user or root wrote: it opens with O_NOFOLLOW|O_NONBLOCK (a
symlink or a FIFO someone planted is never followed, never waited on) and accepts
only a small regular file owned by its uid or root. Anything else is ignored, with
one warning.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MEM_EXPORTER_PHASE_FILE"
MAX_LENGTH = 64
MAX_FILE_BYTES = 4096  # a phase file is one short line: anything bigger is not one
ROOT_DIR = Path("/run/mem-exporter")
_VALID = re.compile(r"^[^\x00-\x1f\x7f]+$")  # any printable text: it becomes a label value
SUGGESTED = ("Idle", "Model-Loading", "Model-Active", "Full-Processing")


def _uid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def default_path() -> Path:
    """$MEM_EXPORTER_PHASE_FILE, else $XDG_RUNTIME_DIR/mem-exporter/phase; without XDG_RUNTIME_DIR:
    /run/mem-exporter/phase for root, a private directory of the user's otherwise (the state directory on
    Linux, the OS's runtime directory through platformdirs on macOS and Windows)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "mem-exporter" / "phase"
    if _uid() == 0:
        return ROOT_DIR / "phase"
    if sys.platform in ("darwin", "win32"):
        import platformdirs

        return platformdirs.user_runtime_path("mem-exporter", appauthor=False) / "phase"
    from .runlog import state_dir

    return state_dir() / "phase"


def resolve(path: str | os.PathLike | None) -> Path:
    return Path(path) if path else default_path()


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_LENGTH or not _VALID.match(name):
        raise ValueError(f"a phase name is 1 to {MAX_LENGTH} printable characters, got {name!r}")
    return name


def _private_dir(directory: Path) -> None:
    """Create the directory (0700, parents too); refuse one that someone else owns or others may write."""
    from .records import make_private_dirs

    make_private_dirs(directory)
    st = directory.stat()
    uid = _uid()
    if uid is not None and st.st_uid not in (uid, 0):
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}; set --phase-file or ${ENV}")
    if uid is not None and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(f"{directory} may be written by others; set --phase-file or ${ENV}")


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


class NotAPhaseFile(OSError):
    """Something is at the phase path that this reader will not trust: `str()` says what."""


def read_phase(path: Path) -> str | None:
    """The phase in `path`, None when there is none. NotAPhaseFile for a symlink, a FIFO, a device, a big
    file, or a file of another user: never followed, never blocking, never read past MAX_FILE_BYTES."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise NotAPhaseFile("a symbolic link (not followed)") from None
        except FileNotFoundError:
            return None
        raise
    try:
        st = os.fstat(fd)
        uid = _uid()
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise NotAPhaseFile("not a regular file")
        if uid is not None and st.st_uid not in (uid, 0):
            raise NotAPhaseFile(f"owned by uid {st.st_uid}, neither this user nor root")
        if st.st_size > MAX_FILE_BYTES:
            raise NotAPhaseFile(f"{st.st_size} bytes, more than a phase file holds")
        data = os.read(fd, MAX_FILE_BYTES)
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace").strip()
    line = text.splitlines()[0] if text else ""
    return line[:MAX_LENGTH] or None


class PhaseWatcher:
    """What a sampler calls each tick: the phase, re-read only when the file changed."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self._stamp: tuple | None = None
        self._warned: str | None = None
        self.phase: str | None = None

    def read(self) -> str | None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            self._stamp, self.phase = None, None
            return None
        except OSError:
            return self.phase  # unreadable for a moment: keep the last known phase
        # the inode changes on every atomic replace, which catches two writes within one mtime tick
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size, st.st_mode)
        if stamp != self._stamp:
            try:
                self.phase = read_phase(self.path)
            except NotAPhaseFile as e:
                self.phase = None
                if self._warned != str(e):  # once, not every tick
                    self._warned = str(e)
                    log.warning("phase file %s ignored: %s", self.path, e)
            except OSError:
                return self.phase
            self._stamp = stamp
        return self.phase
