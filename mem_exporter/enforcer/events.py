"""Events: one JSON line per action, and notifications sent from a worker thread.

Nothing here blocks the kill path: the event line, its summary on stderr and each notification
are queued (bounded, outbox.py); daemon threads write and post them, and what a full queue
cannot take is dropped and counted (mem_exporter_enforcer_events_dropped_total{sink}).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from ..logfile import DEFAULT_EVENT_KEEP, DEFAULT_EVENT_MAX_BYTES, LogFile, shared_log
from ..outbox import Outbox
from ..records import QUIET_ACTIONS

log = logging.getLogger(__name__)

ALERTNAME = "MemExporterEnforcerKill"
TIMEOUT = 3.0


def _append(item: tuple[LogFile, dict]) -> None:
    file, event = item
    file.write(event)
    file.sync(background=True)


_EVENT_FILES = Outbox("event_log", _append)  # one writer thread for every event log of the process


class EventLog:
    """The enforcer's event log: one JSON line per event (also logged as a one-line summary), in a file
    capped at `max_bytes` with `keep` rotated ones. `write()` only queues: the line is written, and
    fsynced, on the outbox's thread, so neither a slow disk nor a FIFO nobody reads holds the caller.
    Every EventLog of one path in a process shares one file (a reload makes a new EventLog)."""

    def __init__(self, path: str | None, max_bytes: int = DEFAULT_EVENT_MAX_BYTES, keep: int = DEFAULT_EVENT_KEEP):
        self.path = path
        self._file: LogFile | None = None
        if path:
            try:
                self._file = shared_log(path, max_bytes, keep)
            except OSError as e:  # the daemon runs on; the summary lines still reach its log
                log.error("cannot write event log %s: %s", path, e.strerror or e)

    def write(self, event: dict) -> None:
        level = logging.INFO if event["action"] in QUIET_ACTIONS else logging.WARNING
        log.log(
            level,
            "enforcer %s: rule=%s group=%s pgid=%s memory=%s outcome=%s%s",
            event["action"],
            event["rule"],
            event.get("group"),
            event.get("pgid"),
            event.get("memory_bytes"),
            event.get("outcome"),
            f" reason={event['reason']}"
            if event.get("reason")
            else f" would_signal={[p['pid'] for p in event['would_signal']]}"
            if "would_signal" in event
            else "",
        )
        if self._file is not None:
            _EVENT_FILES.offer((self._file, event))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting `timeout` at most), then fsync; the file stays open while another
        EventLog of the same path uses it."""
        if self._file is not None and _EVENT_FILES.flush(timeout):
            self._file.sync()


def alertmanager_payload(event: dict, instance: str) -> list[dict]:
    starts = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    mib = (event.get("memory_bytes") or 0) / 2**20
    return [
        {
            "labels": {
                "alertname": ALERTNAME,
                "rule": event["rule"],
                "group": event.get("group") or "",
                "instance": instance,
                "severity": "critical",
            },
            "annotations": {
                "summary": f"mem-exporter enforcer killed {event.get('group')} (rule {event['rule']})",
                "description": (
                    f"{event['condition']}: {event.get('value')} over limit {event.get('limit')}; group held "
                    f"{mib:.0f} MiB in {event.get('processes')} processes; outcome {event.get('outcome')}"
                ),
            },
            "startsAt": starts.isoformat(),
            "endsAt": (starts + timedelta(minutes=5)).isoformat(),
        }
    ]


def _post_json(url: str, body: Any) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body, default=str).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        r.read()


# Windows: a balloon from the notification area through PowerShell (every edition has it); `msg` where not
_BALLOON = (
    "Add-Type -AssemblyName System.Windows.Forms; $n = New-Object System.Windows.Forms.NotifyIcon; "
    "$n.Icon = [System.Drawing.SystemIcons]::Warning; $n.Visible = $true; "
    "$n.ShowBalloonTip(10000, $env:MEM_EXPORTER_TITLE, $env:MEM_EXPORTER_BODY, 'Warning'); "
    "Start-Sleep -Seconds 10; $n.Dispose()"
)


def desktop_command(platform: str, which, title: str, body: str) -> list[str] | None:
    """The command that shows a desktop notification on this OS, or None where there is none.
    On Windows the texts travel in environment variables (see Notifier._desktop), never inside the script."""
    if platform == "darwin" and which("osascript"):
        return ["osascript", "-e", f"display notification {json.dumps(body)} with title {json.dumps(title)}"]
    if platform == "win32":
        if which("powershell"):
            return ["powershell", "-NoProfile", "-NonInteractive", "-Command", _BALLOON]
        if which("msg"):
            return ["msg", "*", "/TIME:30", f"{title}: {body}"]
        return None
    if which("notify-send"):
        return ["notify-send", "-u", "critical", "-a", "mem-exporter", title, body]
    return None


class Notifier:
    def __init__(self, notify, instance: str | None = None):
        self.notify = notify
        self.instance = instance or socket.gethostname()
        self._outbox = Outbox("notify", self._deliver, maxsize=100)
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        n = self.notify
        return bool(n.alertmanager_url or n.webhook_url or n.desktop)

    def send(self, event: dict) -> None:
        """Queue a kill (or dry-run) event; returns at once (dropped and counted when the queue is full)."""
        if not self.enabled:
            return
        if not self._outbox.offer((self.notify, event)):
            log.warning("notification queue full; dropped the event for %s", event.get("group"))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for queued notifications: used when stopping."""
        self._outbox.flush(timeout)

    def _deliver(self, item: tuple) -> None:
        notify, event = item
        channels = (("alertmanager", self._alertmanager), ("webhook", self._webhook), ("desktop", self._desktop))
        for name, fn in channels:
            try:
                if fn(notify, event):
                    self.sent += 1
            except Exception as e:  # never let a notification failure reach the enforcer
                self.failed += 1
                log.warning("%s notification failed: %s", name, e)

    def _alertmanager(self, notify, event: dict) -> bool:
        if not notify.alertmanager_url or event["action"] == "dry_run":
            return False
        _post_json(notify.alertmanager_url.rstrip("/") + "/api/v2/alerts", alertmanager_payload(event, self.instance))
        return True

    def _webhook(self, notify, event: dict) -> bool:
        if not notify.webhook_url:
            return False
        _post_json(notify.webhook_url, event)
        return True

    def _desktop(self, notify, event: dict) -> bool:
        if not notify.desktop:
            return False
        verb = "would kill" if event["action"] == "dry_run" else "killed"
        title = f"mem-exporter {verb} {event.get('group')}"
        mib = (event.get("memory_bytes") or 0) / 2**20
        body = f"rule {event['rule']}: {mib:.0f} MiB, outcome {event.get('outcome')}"
        cmd = desktop_command(sys.platform, shutil.which, title, body)
        if cmd is None:
            return False
        env = {**os.environ, "MEM_EXPORTER_TITLE": title, "MEM_EXPORTER_BODY": body}
        # the balloon stays up for its 10 s; nothing waits for it
        subprocess.run(
            cmd,
            timeout=TIMEOUT if cmd[0] != "powershell" else 15,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return True
