"""`run -v`'s live status on a terminal: kept on the last row, with the command's output scrolling above it.

As apt does: the scroll region (DECSTBM) is set to every row but the last, so whatever the command writes
scrolls inside it and never lands on, or is glued to, the status text; each redraw saves the cursor, draws
on the last row and puts the cursor back. `close()` clears that row and gives the whole screen back to
scrolling, and `run` calls it on every way out (its `finally`), before its own closing lines. A resized
terminal gets its region set again at the next redraw. Where that cannot work (stderr is not a terminal,
TERM is unset or `dumb`, a terminal of fewer than 3 rows) the status is a plain line per full sample.
"""

from __future__ import annotations

import os
from typing import TextIO

ESC = "\x1b"
SAVE, RESTORE = ESC + "7", ESC + "8"
RESET_REGION = ESC + "[r"
CLEAR_LINE = ESC + "[2K"


def region(rows: int) -> str:
    return f"{ESC}[1;{rows - 1}r"


def goto_last(rows: int) -> str:
    return f"{ESC}[{rows};1H"


def usable(stream: TextIO, environ=os.environ) -> bool:
    """Whether the status can own the terminal's last row."""
    try:
        return (
            stream.isatty()
            and environ.get("TERM", "dumb") not in ("", "dumb")
            and os.get_terminal_size(stream.fileno()).lines >= 3
        )
    except (OSError, ValueError):
        return False


class StatusLine:
    """The last row of the terminal `stream` is on. Every write swallows OSError: the status never stops a run."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.rows = 0  # the rows the region was set for; 0: not set

    def _size(self) -> tuple[int, int]:
        size = os.get_terminal_size(self.stream.fileno())
        return size.lines, size.columns

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def open(self) -> None:
        """The region, before the command writes anything."""
        try:
            self._write(self._region(self._size()[0]))
        except (OSError, ValueError):
            pass

    def _region(self, rows: int) -> str:
        """What sets the region for `rows` rows, when it is not set for them yet."""
        if rows == self.rows:
            return ""
        out = SAVE + region(rows) + RESTORE
        if not self.rows:  # a new line first, so the row the region gives up is not one the command wrote on
            out = "\n" + out + ESC + "[1A"
        self.rows = rows
        return out

    def draw(self, text: str, colour: str | None = None) -> None:
        """`text` on the last row, cut to the width, in `colour` (an SGR code such as "33") if given."""
        try:
            rows, cols = self._size()
        except (OSError, ValueError):
            return
        if rows < 3:  # shrunk past use: no region until it grows again
            self.close()
            return
        out = self._region(rows)
        text = text[: max(cols - 1, 0)]
        if colour:
            text = f"{ESC}[{colour}m{text}{ESC}[0m"
        self._write(out + SAVE + goto_last(rows) + CLEAR_LINE + text + RESTORE)

    def close(self) -> None:
        """The last row cleared and the whole screen scrolling again; the cursor where the command left it."""
        if not self.rows:
            return
        rows, self.rows = self.rows, 0
        try:
            rows = self._size()[0]
        except (OSError, ValueError):
            pass
        self._write(SAVE + goto_last(rows) + CLEAR_LINE + RESET_REGION + RESTORE)
