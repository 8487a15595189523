"""The HTTP server's memory under hostile clients, measured on a real `serve` on 127.0.0.1: headers are read
before authentication, so what one client can make the server hold must be small and bounded."""

from __future__ import annotations

import socket
import time

import pytest
from helpers.net import http_get
from helpers.waiting import wait_for

MiB = 2**20
CLIENTS = 100  # web.max_connections' default: every slot taken
BUDGET = 40 * MiB  # far below the enforcer container's 128 MiB limit


def answers(url: str) -> bool:
    """A 200 for `url`; a busy answer (503 while closed clients still hold their slots) or a refused
    connection is a no for now, to ask again."""
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # what does not fit waits with the client
    return s


@pytest.mark.integration
def test_oversized_headers_get_431(daemon):
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()
    with connect(d.port) as s:
        s.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
            + b"\r\n"
        )
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 431 ")
    with connect(d.port) as s:  # a request under the cap is served as before
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
@pytest.mark.integration
def test_a_hundred_slow_and_oversized_clients_stay_far_below_the_container_limit(daemon):
    d = daemon("serve", "--interval", "0.5s", "--gpu-backend", "none").wait_healthy()
    for _ in range(5):
        d.metrics()
    time.sleep(0.5)
    before = rss_bytes(d.proc.pid)
    held: list[socket.socket] = []
    try:
        # oversized: each offers 2 MiB of header lines (64 000 bytes each, under the old 64 KiB line limit and
        # the 100-line limit) and never ends the head; the server must stop reading long before
        line = b"X-Big: " + b"b" * 63_991 + b"\r\n"
        for _ in range(CLIENTS):
            s = connect(d.port)
            s.setblocking(False)
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        deadline = time.monotonic() + 30
        offered = {id(s): 0 for s in held}
        while time.monotonic() < deadline and any(n < 2 * MiB for n in offered.values()):
            progressed = False
            for s in held:
                if offered[id(s)] >= 2 * MiB:
                    continue
                try:
                    offered[id(s)] += s.send(line)
                    progressed = True
                except BlockingIOError:
                    continue
                except OSError:  # answered and closed: nothing more to offer
                    offered[id(s)] = 2 * MiB
            if not progressed:
                time.sleep(0.05)
        peak_oversized = rss_bytes(d.proc.pid)
        for s in held:
            s.close()
        held.clear()
        # slow: each sends 15 KiB of head, under the cap, then goes quiet holding its slot
        time.sleep(0.5)
        for _ in range(CLIENTS):
            s = connect(d.port)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"s" * 15_000 + b"\r\n")
            held.append(s)
        time.sleep(1.0)
        peak_slow = rss_bytes(d.proc.pid)
        print(
            f"server RSS: before {before / MiB:.1f} MiB, {CLIENTS} oversized clients {peak_oversized / MiB:.1f} MiB, "
            f"{CLIENTS} slow clients {peak_slow / MiB:.1f} MiB"
        )
        assert peak_oversized - before < BUDGET and peak_slow - before < BUDGET
    finally:
        for s in held:
            s.close()
    wait_for(lambda: answers(d.url + "/metrics"), 10, what="a scrape after the flood")  # still serving
