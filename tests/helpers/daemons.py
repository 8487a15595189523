"""mem-exporter as a child of the test: a daemon serving HTTP, `serve` with session logs, `run` until its kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers.net import free_port, http_get
from helpers.paths import ROOT
from helpers.waiting import wait_for

RUN = [sys.executable, "-m", "mem_exporter", "run"]


class Daemon:
    """`python -m mem_exporter ARGS --listen 127.0.0.1:PORT` as a child, stopped at the end of the test."""

    def __init__(self, *args: str, cwd=None, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()  # a restart passes the old port: Prometheus keeps scraping it
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(cwd or ".") / f"daemon-{self.port}.log", "w+") if cwd else subprocess.DEVNULL
        command = [sys.executable, "-m", "mem_exporter", *args, "--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_healthy(self, timeout: float = 15.0) -> Daemon:
        def healthy():
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}: {self.output()}"
            try:
                return http_get(self.url + "/healthz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout, what="the daemon's /healthz")
        return self

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200
        return body

    def output(self) -> str:
        if self.log is subprocess.DEVNULL:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# a fake 12 GB card with models taking turns on it; the path is from the repository root, where daemons run
ROTATING_GPUS = "fake:tests/fixtures/gpu/rotating-12gb.yaml"


def serve_logging(daemon: Callable[..., Daemon], logs: Path, phase_file: Path, *extra: str) -> Daemon:
    """A healthy `serve` from the `daemon` fixture: a sample every 0.2 s, the rotating fake card, session logs
    written to `logs`, the phase read from `phase_file`; `extra` are more of serve's options."""
    options = ["--interval", "0.2s", "--gpu-backend", ROTATING_GPUS, "--log-dir", str(logs)]
    return daemon("serve", *options, "--phase-file", str(phase_file), *extra).wait_healthy()


def run_to_the_kill(
    log: Path, options: list[str], command: list[str], runner: list[str] = RUN, env: dict | None = None
) -> list[dict]:
    """`RUNNER OPTIONS -l LOG -- COMMAND` (RUNNER: `python -m mem_exporter run` unless given) from the repository
    root, in a session of its own; it must end with 137 within 60 s, its command killed. Returns the log's records.
    A run still going then is stopped with its process group, the one this call started."""
    proc = subprocess.Popen(
        [*runner, *options, "-l", str(log), "--", *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 137, stderr
    return [json.loads(line) for line in log.read_text().splitlines()]
