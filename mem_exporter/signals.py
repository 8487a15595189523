"""Signal names and numbers on every OS. Windows has no SIGKILL (nor SIGHUP): rules and `run` still name
it, and the portable actuator ends a process with TerminateProcess whatever the number."""

from __future__ import annotations

import signal

SIGKILL: int = getattr(signal, "SIGKILL", 9)
_FALLBACK = {"SIGKILL": 9}


def signal_number(name: str) -> int | None:
    """The number of a signal name such as "SIGTERM", or None where this OS has no such signal."""
    value = getattr(signal, name, None)
    if isinstance(value, signal.Signals):
        return int(value)
    return _FALLBACK.get(name)


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return next((n for n, v in _FALLBACK.items() if v == sig), f"SIG{sig}")
