"""The long-running daemon behind `serve` and `enforce`: sampler, consumers, HTTP, signals, reload."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .config import Config, ConfigError, load_config
from .exposition import Exposition, SampleCollector, build_registry
from .http_server import MetricsServer, sample_health
from .sampler import Sampler, SamplingLoop, quiet_gc
from .signals import signal_number
from .webconfig import load_web_config

log = logging.getLogger(__name__)


class Service:
    def __init__(
        self,
        config_path: str | None,
        overrides: dict[str, Any] | None = None,
        enforce: bool = False,
        phase_file: str | None = None,
        session_log=None,
    ):
        self.config_path = config_path
        self.overrides = overrides or {}
        self.config: Config = load_config(config_path, self.overrides)  # ConfigError goes to the caller
        web = load_web_config(self.config.web.config_file)  # so does WebConfigError (a ConfigError)
        self.enforce = enforce
        self._stop = threading.Event()
        self._reload = threading.Event()
        from .gpu import open_gpu_source

        self.gpu = open_gpu_source(self.config.gpu.backend, self.config.gpu.retry_max, log=log, paths=self.config.paths)
        from .phase import PhaseWatcher

        # `mem-exporter phase NAME` reaches this daemon
        self.sampler = Sampler(self.config, gpu=self.gpu, phase_watcher=PhaseWatcher(phase_file))
        self.loop = SamplingLoop(self.sampler)
        collectors: list = [SampleCollector(lambda: self.loop.latest, lambda: self.config.groups)]
        self.enforcer = None
        self.protection = None
        if enforce or self.config.enforcer.enabled:
            from .enforcer import Enforcer

            # only `--dry-run` holds across reloads; the file's `dry_run` follows the file
            # `enforce` reads every process only as often as its rules need; `serve` exports them each
            # interval, and a session log (--log-dir) records them each interval
            lean = enforce and session_log is None
            self.enforcer = Enforcer(self.config, dry_run=bool(self.overrides.get("enforcer.dry_run")), lean=lean)
            self.loop.consumers.append(self.enforcer.on_sample)
            if lean:
                self.loop.walk_period = self.enforcer.walk_period
                # between walks the groups the limits watch are exported as the lane last read them, so a
                # group's gauges and its limit (the alerts' join) stay fresh together
                self.sampler.fresh_groups = self.enforcer.watched_groups
            collectors.append(self.enforcer.collector)
            from .selfprotect import SelfProtection, SelfProtectionCollector

            self.protection = SelfProtection.from_config(self.config.enforcer)  # applied in start(); never plain serve
            collectors.append(SelfProtectionCollector(self.protection))
        self.session_log = session_log  # a sessionlog.SessionLog, or None
        if session_log is not None:
            if self.enforcer is not None:
                session_log.limits = lambda: self.enforcer.current_limits()
            self.loop.consumers.append(session_log.on_sample)
        self.exposition = Exposition(build_registry(*collectors))
        self.loop.consumers.append(self.exposition.refresh)  # last: after the enforcer has acted on the sample
        if self.enforcer is not None:  # a kill between samples shows in the next scrape, not one interval later
            self.enforcer.listeners.append(lambda _event: self.exposition.invalidate())
        self.server = MetricsServer(
            self.config.listen,
            self.exposition,
            sample_health(lambda: self.loop.latest, lambda: self.config.interval),
            web,
            self.config.web.max_connections,
            self.config.web.timeout,
        )

    def start(self) -> Service:
        quiet_gc()
        if self.protection is not None:  # after the heap is trimmed: less to lock
            self.protection.apply()
        self.loop.start()
        self.server.start()
        log.info(
            "serving %s/metrics (interval %.3gs, groups by %s%s)",
            self.server.url,
            self.config.interval,
            self.config.groups.by,
            ", enforcer on" if self.enforcer else "",
        )
        return self

    def reload(self) -> bool:
        """Re-read the config; a bad one is reported and the running one stays in force."""
        try:
            new = load_config(self.config_path, self.overrides)
        except Exception as e:  # ConfigError, or whatever else reading it raised: the daemon runs on
            problems = e.problems if isinstance(e, ConfigError) else [f"{self.config_path}: {type(e).__name__}: {e}"]
            for problem in problems:
                log.error("reload rejected, keeping the running config: %s", problem)
            self.reload_web(self.config.web.config_file)
            return False
        self.reload_web(new.web.config_file)
        self.server.client_timeout = new.web.timeout
        if new.web.max_connections != self.config.web.max_connections:
            log.warning("web.max_connections changes on restart only")
        if new.listen != self.config.listen:
            log.warning("listen address changes need a restart; still serving %s", self.config.listen)
        if new.gpu != self.config.gpu:
            log.warning("gpu settings change on restart only")
        self.config = new
        self.sampler.configure(new)
        if self.enforcer is not None:
            self.enforcer.configure(new)
        self.loop.wake()
        log.info("config reloaded from %s", self.config_path or "defaults")
        return True

    def reload_web(self, path: str | None) -> bool:
        """Re-read the web config (certificates, users); a bad one is reported and the running one stays."""
        try:
            web = load_web_config(path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("web config rejected, keeping the running one: %s", problem)
            return False
        self.server.web = web
        return True

    def install_signal_handlers(self) -> None:
        # Windows has no SIGHUP (no reload by signal there: restart the service) and stops on Ctrl-Break too
        actions = {
            "SIGTERM": self._stop.set,
            "SIGINT": self._stop.set,
            "SIGBREAK": self._stop.set,
            "SIGHUP": self._reload.set,
        }
        for name, action in actions.items():
            sig = signal_number(name)  # None where this OS has no such signal
            if sig is not None:
                signal.signal(sig, lambda *_, act=action: act())

    def run_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(0.2)
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception as e:  # a config that validated but could not be applied: the daemon runs on
                    log.error("reload failed, running on: %s: %s", type(e).__name__, e)
        self.stop()

    def stop(self) -> None:
        log.info("stopping")
        if self.enforcer is not None:
            self.enforcer.stop()  # waits for a kill in progress to finish
        self.loop.stop()
        if self.session_log is not None:
            self.session_log.close()
        self.server.stop()
        self.gpu.close()
