"""The current phase of a run (Idle, Model-Loading, ...): a one-line state file.

`mem-exporter phase NAME` replaces the file atomically; every sampler on the host
that watches the same path picks the name up on its next tick. The sampler lstats
the file each tick and reads it only when it changed, so watching costs one lstat.

The phase reaches an unauthenticated endpoint (`mem_exporter_phase_info`), so a reader
trusts only what its own user or root wrote: it opens with O_NOFOLLOW|O_NONBLOCK (a
symlink or a FIFO someone planted is never followed, never waited on) and accepts
only a small regular file owned by its uid or root. Anything else is ignored, with
one warning.

A phase carries who set it and when: a second line `set t=UNIX pid=PID sid=SID sid_start=TICKS uid=UID`
(readers that know only the first line still read the name). `run` uses it to adopt only a phase of
the present: one set after it started, or by a session that is still alive when asked to.

Writing walks the path from / one directory at a time (openat with O_NOFOLLOW): every directory on
the way must belong to root or the caller, and a symlink on the way is followed only when root or the
caller owns it. So root's `phase --phase-file` never writes through a directory another user controls.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
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


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
MAX_LINKS = 40  # symlinks followed on one path, as the kernel's own limit


def _trusted(st: os.stat_result, uid: int | None) -> bool:
    return uid is None or st.st_uid in (uid, 0)


def _open_parent(directory: Path) -> int:
    """A descriptor of `directory`, reached from / one component at a time without following a symlink
    that someone else owns; missing directories are made 0700. Every directory on the way belongs to
    root or the caller (PermissionError otherwise); the last one may not be writable by others unless
    sticky. Without openat (Windows) the checks are made on the path."""
    uid = _uid()
    if os.open not in getattr(os, "supports_dir_fd", set()):
        from .logfile import make_private_dirs

        make_private_dirs(directory)
        return -1
    todo = list(reversed(Path(os.path.abspath(directory)).parts[1:]))
    fd = os.open("/", _DIR_FLAGS)
    where, links = Path("/"), 0
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":  # lexically, as a path without symlinks reads (abspath already folded them)
                where = where.parent
                new = os.open(str(where), _DIR_FLAGS)
            else:
                try:
                    st = os.lstat(part, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    st = os.lstat(part, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    if not _trusted(st, uid):
                        raise PermissionError(
                            f"{where / part} is a symbolic link of uid {st.st_uid}, neither root nor this user; "
                            "not followed"
                        )
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(where / part))
                    target = Path(os.readlink(part, dir_fd=fd))
                    if target.is_absolute():
                        os.close(fd)
                        fd, where = os.open("/", _DIR_FLAGS), Path("/")
                    todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
                    continue
                new = os.open(part, _DIR_FLAGS, dir_fd=fd)
                where = where / part
            os.close(fd)
            fd = new
            st = os.fstat(fd)
            if not _trusted(st, uid):
                raise PermissionError(f"{where} belongs to uid {st.st_uid}; set --phase-file or ${ENV}")
        st = os.fstat(fd)
        if uid is not None and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PermissionError(f"{where} may be written by others; set --phase-file or ${ENV}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Setter:
    """Who set a phase and when: the setter's pid, its session (the leader's pid and start time), its uid."""

    t: float
    pid: int | None = None
    sid: int | None = None
    sid_start: int | None = None
    uid: int | None = None

    def line(self) -> str:
        fields = {"t": f"{self.t:.3f}", "pid": self.pid, "sid": self.sid, "sid_start": self.sid_start, "uid": self.uid}
        return "set " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)

    @classmethod
    def parse(cls, line: str) -> Setter | None:
        if not line.startswith("set "):
            return None
        kv = dict(item.split("=", 1) for item in line[4:].split() if "=" in item)
        try:
            ints = {k: int(kv[k]) for k in ("pid", "sid", "sid_start", "uid") if k in kv}
            return cls(t=float(kv["t"]), **ints)
        except (KeyError, ValueError):
            return None

    def session_alive(self, procfs: str = "/proc") -> bool | None:
        """Whether the setter's session leader still runs (same pid, same start time); None: cannot tell."""
        if self.sid is None or self.sid_start is None:
            return None
        start = _start_time(self.sid, procfs)
        if start is None:
            return False if os.path.isdir(procfs + "/self") else None
        return start == self.sid_start


def _start_time(pid: int, procfs: str = "/proc") -> int | None:
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_setter() -> Setter:
    sid = os.getsid(0) if hasattr(os, "getsid") else None
    return Setter(
        t=time.time(),
        pid=os.getpid(),
        sid=sid,
        sid_start=_start_time(sid) if sid is not None else None,
        uid=_uid(),
    )


def write_phase(path: Path, name: str | None) -> None:
    """Set the phase (write a temporary file, then rename over the old one), or clear it with None.
    The directory is reached as _open_parent says, and the file is written and renamed inside it."""
    text = None if name is None else f"{check_name(name)}\n{this_setter().line()}\n"
    dir_fd = _open_parent(path.parent) if text is not None or os.path.lexists(path.parent) else -1
    at = {"dir_fd": dir_fd} if dir_fd >= 0 else {}
    base = path.name if dir_fd >= 0 else str(path)
    try:
        if text is None:
            try:
                os.unlink(base, **at)
            except FileNotFoundError:
                pass
            return
        tmp = f".phase-{os.getpid()}-{time.monotonic_ns()}"
        tmp_path = tmp if dir_fd >= 0 else str(path.parent / tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp_path, flags, 0o644, **at)
        try:
            if hasattr(os, "fchmod"):  # whatever the umask: readable by an exporter running as another user
                os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if dir_fd >= 0:
                os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.replace(tmp_path, base)
        except BaseException:
            os.unlink(tmp_path, **at)
            raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


class NotAPhaseFile(OSError):
    """Something is at the phase path that this reader will not trust: `str()` says what."""


def read_phase(path: Path) -> str | None:
    """The phase in `path`, None when there is none. NotAPhaseFile for a symlink, a FIFO, a device, a big
    file, or a file of another user: never followed, never blocking, never read past MAX_FILE_BYTES."""
    return read_phase_info(path)[0]


def read_phase_info(path: Path) -> tuple[str | None, Setter | None]:
    """The phase and who set it (None for a file without the `set` line: its modification time stands in)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise NotAPhaseFile("a symbolic link (not followed)") from None
        except FileNotFoundError:
            return None, None
        raise
    try:
        st = os.fstat(fd)
        uid = _uid()
        if stat.S_ISDIR(st.st_mode):
            return None, None
        if not stat.S_ISREG(st.st_mode):
            raise NotAPhaseFile("not a regular file")
        if uid is not None and st.st_uid not in (uid, 0):
            raise NotAPhaseFile(f"owned by uid {st.st_uid}, neither this user nor root")
        if st.st_size > MAX_FILE_BYTES:
            raise NotAPhaseFile(f"{st.st_size} bytes, more than a phase file holds")
        data = os.read(fd, MAX_FILE_BYTES)
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").strip().splitlines() or [""]
    name = lines[0].strip()[:MAX_LENGTH] or None
    setter = Setter.parse(lines[1].strip()) if len(lines) > 1 else None
    return name, setter or (Setter(t=st.st_mtime) if name else None)


class PhaseWatcher:
    """What a sampler calls each tick: the phase, re-read only when the file changed."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self._stamp: tuple | None = None
        self._warned: str | None = None
        self.phase: str | None = None
        self.setter: Setter | None = None  # who set the current phase, and when

    def read(self) -> str | None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            self._stamp, self.phase, self.setter = None, None, None
            return None
        except OSError:
            return self.phase  # unreadable for a moment: keep the last known phase
        # the inode changes on every atomic replace, which catches two writes within one mtime tick
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size, st.st_mode)
        if stamp != self._stamp:
            try:
                self.phase, self.setter = read_phase_info(self.path)
            except NotAPhaseFile as e:
                self.phase, self.setter = None, None
                if self._warned != str(e):  # once, not every tick
                    self._warned = str(e)
                    log.warning("phase file %s ignored: %s", self.path, e)
            except OSError:
                return self.phase
            self._stamp = stamp
        return self.phase
