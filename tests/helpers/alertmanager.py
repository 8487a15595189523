"""A real Alertmanager for tests, and a webhook receiver it (or anything else) can post to.

    with WebhookReceiver() as hook, Alertmanager(tmp_path, hook.url) as am:
        ... push alerts to am.url + "/api/v2/alerts" ...
        alerts = hook.wait_for(lambda body: ..., timeout=20)

Alertmanager runs on 127.0.0.1 with a random port, clustering off (`--cluster.listen-address=`),
a storage path under tmp_path, and a route that sends everything to the webhook with short waits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from helpers.net import free_port
from helpers.tools import ALERTMANAGER


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POSTed JSON body."""

    def __init__(self, path: str = "/hook"):
        self.bodies: list = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._cond:
                    receiver.bodies.append({"path": self.path, "body": body})
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate, timeout: float = 30.0):
        """The first recorded body for which predicate(body) is true; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.bodies:
                    if predicate(item["body"]):
                        return item["body"]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching webhook call within {timeout}s; got {self.bodies!r}")
                self._cond.wait(left)


def alertmanager_config(
    webhook_url: str, group_wait: str = "100ms", group_interval: str = "1s", repeat_interval: str = "1h"
) -> str:
    return f"""route:
  receiver: test-hook
  group_by: ['...']
  group_wait: {group_wait}
  group_interval: {group_interval}
  repeat_interval: {repeat_interval}
receivers:
  - name: test-hook
    webhook_configs:
      - url: '{webhook_url}'
        send_resolved: false
"""


class Alertmanager:
    """`prometheus-alertmanager` as a child process of the test, stopped on exit."""

    def __init__(
        self, tmp_path: Path, webhook_url: str | None = None, config_text: str | None = None, binary: str = ALERTMANAGER
    ):
        self.dir = Path(tmp_path) / f"alertmanager-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "alertmanager.yml").write_text(config_text or alertmanager_config(webhook_url))
        self.log_path = self.dir / "alertmanager.log"
        self.cmd = [
            binary,
            f"--config.file={self.dir / 'alertmanager.yml'}",
            f"--storage.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Alertmanager:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"alertmanager exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"alertmanager not ready within {timeout}s: {self.log()}")

    def alerts(self) -> list:
        with urllib.request.urlopen(self.url + "/api/v2/alerts", timeout=5) as r:
            return json.loads(r.read())

    def post_alerts(self, alerts: list) -> None:
        req = urllib.request.Request(
            self.url + "/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> Alertmanager:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
