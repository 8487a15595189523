"""The kernel's process events (fork, exec, exit) through the netlink proc connector (Linux).

    conn = ProcConnector.open()          # None where the kernel or our privileges do not allow it
    events, lost = conn.read()           # what arrived since the last read (never blocks)
    conn.close()

A listener learns of every new process the moment it is forked or runs a new program, instead
of listing /proc to find out. It needs CAP_NET_ADMIN in the host's user namespace and the host's
network namespace (root on the host); `open()` says why not otherwise, and the caller keeps its
/proc listing.

Nothing may be missed silently: the socket sets NETLINK_NO_ENOBUFS (an overflow does not leave
the socket in an error state) and a large receive buffer; a rise in the socket's drop count
(/proc/net/netlink), a gap in an event's per-CPU sequence number, a truncated message or any
socket error is reported as `lost`: the caller then rescans /proc in full.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import sys
import time
from typing import NamedTuple

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11  # include/uapi/linux/netlink.h
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
CN_IDX_PROC = 1  # include/uapi/linux/connector.h
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1  # include/uapi/linux/cn_proc.h
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (the socket module lacks it)
RCVBUF = 8 * 1024 * 1024  # a fork storm of ~100 000 events fits between two reads

NONE, FORK, EXEC, EXIT = 0x00000000, 0x00000001, 0x00000002, 0x80000000  # proc_event.what
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
# one whole message, as parse reads it: nlmsghdr (skipped), cn_msg idx, val, seq (ack, len, flags skipped),
# proc_event what, cpu (timestamp skipped), and the first four u32 of its event data
_MSG = struct.Struct("=16xIII8xII8xIIII")


class ProcEvent(NamedTuple):
    """One process event: `pid` is the process (thread group id); thread events are not reported."""

    kind: str  # fork | exec | exit
    pid: int
    parent: int = 0  # fork: the parent process


def _subscribe(op: int, token: int = 0) -> bytes:
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, token, token, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def parse(data: bytes, seqs: dict[int, int]) -> tuple[list[ProcEvent], bool]:
    """The process events in one datagram, and whether any were lost before or in it. `seqs`
    (cpu -> last sequence number seen) is updated: a gap on a CPU means the kernel dropped events."""
    events: list[ProcEvent] = []
    lost = False
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype = _NLMSGHDR.unpack_from(data, off)[:2]
        if length < _NLMSGHDR.size or off + length > len(data):
            return events, True  # truncated
        at, off = off, off + ((length + 3) & ~3)
        if mtype in (NLMSG_ERROR, NLMSG_OVERRUN):
            lost = True
            continue
        if length < _MSG.size:
            continue
        (idx, val, seq, what, cpu, a, b, c, d) = _MSG.unpack_from(data, at)
        if idx != CN_IDX_PROC or val != CN_VAL_PROC:
            continue
        last = seqs.get(cpu)
        if last is not None and seq != (last + 1) & 0xFFFFFFFF:
            lost = True
        seqs[cpu] = seq
        if what == FORK:  # parent pid, parent tgid, child pid, child tgid
            if c == d:  # a new process, not a new thread
                events.append(ProcEvent("fork", d, b))
        elif what == EXEC:  # pid, tgid
            events.append(ProcEvent("exec", b))
        elif what == EXIT and a == b:  # the process (its leader thread), not one of its threads
            events.append(ProcEvent("exit", b))
    return events, lost


def _listen(sock: socket.socket, timeout: float) -> str | None:
    """Subscribe and wait for the kernel's acknowledgement (a PROC_EVENT_NONE with our ack plus one and an
    error code; its sequence number is the kernel's own): None when listening, else why not. Every listener
    gets every acknowledgement, and the kernel sends none to a subscriber outside the host's namespaces: a
    token of our own tells ours from another listener's, which would otherwise pass for ours."""
    token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    sock.send(_subscribe(PROC_CN_MCAST_LISTEN, token))
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        off = 0
        while off + _NLMSGHDR.size + _CN_MSG.size + _EVENT.size + 4 <= len(data):
            length = _NLMSGHDR.unpack_from(data, off)[0]
            body = off + _NLMSGHDR.size
            ack = _CN_MSG.unpack_from(data, body)[3]
            what = _EVENT.unpack_from(data, body + _CN_MSG.size)[0]
            if what == NONE and ack == token + 1:
                err = struct.unpack_from("=I", data, body + _CN_MSG.size + _EVENT.size)[0]
                return None if err == 0 else f"the kernel refused to listen ({os.strerror(err)})"
            if length < _NLMSGHDR.size:
                break
            off += (length + 3) & ~3
    return "no acknowledgement from the proc connector (another namespace, or no connector in the kernel)"


class ProcConnector:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._seqs: dict[int, int] = {}
        self._inode = os.fstat(sock.fileno()).st_ino
        self._dropped = self._drops() or 0
        self.lost_total = 0  # reads that reported loss (each asks for a full rescan)

    @classmethod
    def open(cls, procfs: str = "/proc", ack_timeout: float = 1.0, rcvbuf: int = RCVBUF) -> ProcConnector | None:
        """A listening connector, or None (logged, with why) where this host or process cannot have one:
        not Linux, not root, no connector in the kernel, or outside the host's namespaces (the kernel then
        ignores the subscription; events would carry the host's pids anyway). Only for the host's own
        /proc: a procfs root elsewhere (a fixture tree, a host's /proc mounted in a container) lists."""
        why = unavailable() if os.path.realpath(procfs) == "/proc" else f"{procfs} is not this host's /proc"
        sock = None
        if why is None and sys.platform == "linux":
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
                sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.bind((0, CN_IDX_PROC))
                why = _listen(sock, ack_timeout)
            except (OSError, AttributeError) as e:
                why = f"the proc connector is unavailable ({getattr(e, 'strerror', None) or e})"
        if why is not None:
            if sock is not None:
                sock.close()
            log.info("process events: %s; new processes are found by listing %s", why, procfs)
            return None
        assert sock is not None
        sock.setblocking(False)
        log.info("process events: listening on the netlink proc connector")
        return cls(sock)

    def _drops(self) -> int | None:
        """The kernel's count of messages dropped on this socket (/proc/net/netlink), None where unreadable."""
        try:
            with open("/proc/net/netlink", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        inode = str(self._inode).encode()
        for line in lines[1:]:
            fields = line.split()
            if len(fields) >= 10 and fields[9] == inode:
                return int(fields[8])
        return None

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> tuple[list[ProcEvent], bool]:
        """Every event queued since the last read, and whether any were lost (then rescan in full).
        Never blocks. After loss the stream goes on: later events are good, only a gap is missing."""
        events: list[ProcEvent] = []
        lost = received = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                lost = True
                if e.errno == errno.ENOBUFS:
                    continue  # the queue overflowed; what follows is good
                break
            received = True
            got, gap = parse(data, self._seqs)
            events += got
            lost = lost or gap
        # a gap shows only once a later event arrives on the same CPU; the socket's drop count at once
        # (a queue that overflowed had something in it: with nothing received there is nothing to check)
        if received and not lost:
            drops = self._drops()
            lost, self._dropped = drops is not None and drops > self._dropped, drops or self._dropped
        if lost:
            self.lost_total += 1
        return events, lost

    def close(self) -> None:
        try:
            self._sock.send(_subscribe(PROC_CN_MCAST_IGNORE))
        except OSError:
            pass
        self._sock.close()


def unavailable() -> str | None:
    """Why this process cannot listen to process events here before trying, or None when it may try (the
    kernel's acknowledgement of the subscription settles the rest: it ignores other namespaces)."""
    if sys.platform != "linux":
        return "process events are Linux's"
    if os.geteuid() != 0:
        return "not root"
    return None
