"""Which supervisor `run` gets: the POSIX one on Linux and macOS (posix.py), the polling one elsewhere.

Apart from the interface (supervisor.py) and both implementations, which import only the interface.
"""

from __future__ import annotations

import os

from .supervisor import PollingSupervisor, Supervisor


def make_supervisor() -> Supervisor:
    """The POSIX supervisor on Linux and macOS (posix.py); the polling one elsewhere (Windows)."""
    if os.name == "posix":
        from .posix import PosixSupervisor  # POSIX only: not imported on Windows

        return PosixSupervisor()
    return PollingSupervisor()
