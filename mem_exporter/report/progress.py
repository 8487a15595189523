"""A one-line progress bar on stderr, only where someone watches (a TTY) or asked for it.

Hand-rolled: twenty lines do what the report needs, without another dependency.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done = max(total, 1), label, 0.0
        self._last = 0.0

    def update(self, amount: float) -> None:
        self.done += amount
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        share = min(1.0, self.done / self.total)
        self.stream.write(f"\r{self.label} [{'#' * int(share * 30):<30}] {share:4.0%}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.done < self.total:  # sizes are estimates: finish the bar anyway
                self.done = self.total
                self._draw()
            self.stream.write("\n")
            self.stream.flush()
