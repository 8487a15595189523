"""Bounded queues between the enforcer and everything that may block: stderr, the event log file, webhooks.

A pipe nobody reads, Docker's blocking log driver, a terminal stopped with Ctrl-S, a FIFO or a
stuck disk make a write wait forever. The enforcer never writes itself: it offers the item to an
`Outbox`, which returns at once, and a daemon thread of the outbox does the writing. A full queue
drops the item and counts it per sink (`dropped()`; exported as
mem_exporter_enforcer_events_dropped_total{sink}).

    install_stderr_logging(level, fmt)   # every log record goes through the "stderr" outbox
    box = Outbox("event_log", write)     # box.offer(item) -> False when dropped
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

SINKS = ("stderr", "event_log", "notify")  # each has a series from the start, 0 until something is dropped
QUEUE_SIZE = 1000
EXIT_FLUSH = 2.0  # seconds given at exit to write what is queued (never more: stderr may be blocked)

_dropped: Counter[str] = Counter()
_dropped_lock = threading.Lock()


def count_drop(sink: str) -> None:
    with _dropped_lock:
        _dropped[sink] += 1


def dropped() -> dict[str, int]:
    """Items dropped so far, by sink (every sink in SINKS is there)."""
    with _dropped_lock:
        return {s: _dropped.get(s, 0) for s in sorted(set(SINKS) | set(_dropped))}


class Outbox:
    """One bounded queue and one daemon thread that hands each item to `deliver`, in order."""

    def __init__(self, sink: str, deliver: Callable[[Any], None], maxsize: int = QUEUE_SIZE):
        self.sink = sink
        self._deliver = deliver
        self._q: queue.Queue = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def offer(self, item: Any) -> bool:
        """Queue `item`; never blocks. False (and counted) when the queue is full."""
        self._ensure_thread()
        try:
            self._q.put_nowait((False, item))
            return True
        except queue.Full:
            count_drop(self.sink)
            return False

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` for what is queued now to be delivered; True when it was."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._q.put((True, done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name=f"outbox-{self.sink}", daemon=True)
                t.start()
                self._thread = t

    def _run(self) -> None:
        while True:
            marker, item = self._q.get()
            if marker:
                item.set()
                continue
            try:
                self._deliver(item)
            except Exception:  # noqa: S110 - a failing sink must not end the thread; it has no one to tell
                pass


class OutboxHandler(logging.Handler):
    """A logging handler that formats the record in the caller's thread and leaves the writing to an
    Outbox: logging never blocks, whoever logs (the enforcer, a kill, the sampler)."""

    def __init__(self, stream: IO[str], sink: str = "stderr", maxsize: int = QUEUE_SIZE):
        super().__init__()
        self.stream = stream
        try:  # straight to the descriptor: a write blocked there holds no lock of Python's stderr object
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        self.outbox = Outbox(sink, self._write, maxsize)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outbox.offer(self.format(record))
        except Exception:
            self.handleError(record)

    def _write(self, line: str) -> None:
        if self._fd is None:
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        data = (line + "\n").encode(errors="replace")
        while data:
            data = data[os.write(self._fd, data) :]


def install_stderr_logging(level: int, fmt: str) -> OutboxHandler | None:
    """Like logging.basicConfig (nothing when the root logger has handlers already), but stderr is
    written through an outbox; at exit, what is queued gets EXIT_FLUSH seconds to reach it."""
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = OutboxHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    atexit.register(handler.outbox.flush, EXIT_FLUSH)
    return handler
