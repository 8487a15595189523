"""Nothing the enforcer hands to a sink waits for it: a webhook that never answers and a writer that
never returns leave `send`/`offer` instant, and what does not fit the bounded queue is dropped and counted."""

from __future__ import annotations

import socket
import threading
import time

from helpers.waiting import wait_for

from mem_exporter.config import Notify
from mem_exporter.enforcer.events import Notifier
from mem_exporter.outbox import Outbox, dropped


def event(n: int) -> dict:
    return {"action": "term", "rule": "r", "group": f"g{n}", "memory_bytes": 1, "outcome": "dead"}


def test_a_webhook_that_never_answers_holds_no_caller():
    """A server on 127.0.0.1 that takes connections into its backlog and never reads or answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    try:
        notifier = Notifier(Notify(webhook_url=f"http://127.0.0.1:{silent.getsockname()[1]}/hook"), "test")
        before = dropped()["notify"]
        started = time.monotonic()
        for n in range(300):
            notifier.send(event(n))
        took = time.monotonic() - started
        # one in delivery (stuck on the silent server), at most 100 queued: the rest dropped and counted
        assert dropped()["notify"] - before >= 300 - 100 - 1
        assert took < 1.0, f"300 sends took {took:.2f} s"
    finally:
        silent.close()


def test_a_writer_that_never_returns_holds_no_caller():
    release = threading.Event()
    delivered: list[int] = []

    def stuck(item: int) -> None:  # as a write to a disk that stopped answering
        release.wait()
        delivered.append(item)

    box = Outbox("event_log", stuck, maxsize=10)
    before = dropped()["event_log"]
    started = time.monotonic()
    accepted = [box.offer(n) for n in range(50)]
    assert time.monotonic() - started < 1.0
    assert sum(accepted) <= 11 and dropped()["event_log"] - before == 50 - sum(accepted)
    release.set()  # the sink comes back: what was queued is written, in order
    wait_for(lambda: len(delivered) == sum(accepted), 10, what="the queued items written")
    assert delivered == [n for n, ok in zip(range(50), accepted, strict=True) if ok]
