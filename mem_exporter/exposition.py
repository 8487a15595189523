"""Prometheus exposition: a Collector that renders the latest Sample, and the HTTP server.

A scrape renders what the sampler last produced; it never reads /proc.
"""

from __future__ import annotations

import html
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from . import __version__
from .config import Groups
from .containers import group_ids
from .sample import Sample, SystemMemory
from .webconfig import WebConfig

log = logging.getLogger(__name__)
P = "mem_exporter_"


def _gauge(name: str, doc: str, labels: Iterable[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=list(labels), unit=unit)


def _os_system(m: SystemMemory) -> Iterable[Metric]:
    """What only one OS reports about the whole system: macOS's pressure level, Windows' commit charge."""
    for name, doc, value in (
        (
            "system_memory_pressure_level",
            "macOS memory pressure (kern.memorystatus_vm_pressure_level): 1 normal, 2 warn, 4 critical.",
            m.pressure_level,
        ),
        ("system_commit_bytes", "Windows commit charge: private memory the system has promised.", m.commit_bytes),
        ("system_commit_limit_bytes", "Windows commit limit: RAM plus page files.", m.commit_limit_bytes),
    ):
        if value is not None:
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g


class SampleCollector:
    """Yields fresh metric families from `get_sample()` on every scrape."""

    def __init__(self, get_sample: Callable[[], Sample | None], get_groups_config: Callable[[], Groups]):
        self.get_sample = get_sample
        self.get_groups_config = get_groups_config

    def describe(self) -> list:
        return []  # families depend on the sample; nothing to pre-register

    def collect(self) -> Iterable[Metric]:
        s = self.get_sample()
        if s is None:
            return
        yield from self._system(s)
        yield from self._groups(s)
        yield from self._gpus(s)
        yield from self._self(s)

    def _system(self, s: Sample) -> Iterable[Metric]:
        m = s.system
        for name, doc, value in (
            ("system_memory_total_bytes", "Total usable RAM.", m.total_bytes),
            (
                "system_memory_available_bytes",
                "RAM available for new work without swapping (MemAvailable).",
                m.available_bytes,
            ),
            ("system_memory_used_bytes", "RAM in use: total minus available.", m.used_bytes),
            ("system_memory_free_bytes", "RAM not used at all (MemFree).", m.free_bytes),
            ("system_swap_total_bytes", "Total swap space.", m.swap_total_bytes),
            ("system_swap_used_bytes", "Swap space in use.", m.swap_used_bytes),
            (
                "processes",
                "Processes counted in the last sample (kernel threads and zombies excluded).",
                s.process_count,
            ),
        ):
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g
        if s.cpu_usage_ratio is not None:
            g = _gauge("system_cpu_usage_ratio", "Share of all CPUs busy since the previous sample (0..1).")
            g.add_metric([], s.cpu_usage_ratio)
            yield g
        if s.pressure is not None:
            ratio = _gauge(
                "system_memory_pressure_ratio",
                "Share of wall time tasks stalled on memory (PSI), "
                "some: at least one task, full: all non-idle tasks at once; by averaging window.",
                ["kind", "window"],
            )
            stall = CounterMetricFamily(
                P + "system_memory_pressure_stall_seconds",
                "Time tasks stalled on memory since boot (PSI total).",
                labels=["kind"],
            )
            for kind in ("some", "full"):
                line = s.pressure.line(kind)
                if line is not None:
                    for window in ("avg10", "avg60", "avg300"):
                        ratio.add_metric([kind, window], getattr(line, window))
                    stall.add_metric([kind], line.total_seconds)
            yield from (ratio, stall)
        yield from _os_system(m)
        g = _gauge(
            "skipped_processes",
            "Processes left out of the last sample (or, for permission, read in part), by reason.",
            ["reason"],
        )
        for reason in ("vanished", "zombie", "kernel_thread", "permission"):
            g.add_metric([reason], s.skipped.get(reason, 0))
        yield g
        if s.phase:
            g = _gauge("phase_info", "The current phase of the run, as set by `mem-exporter phase`.", ["phase"])
            g.add_metric([s.phase], 1)
            yield g

    def _groups(self, s: Sample) -> Iterable[Metric]:
        cfg = self.get_groups_config()
        groups = s.exported  # capped once per sample, by the sampler
        mem = _gauge(
            "group_memory_bytes", "Memory summed over a group's processes, by memory type.", ["group", "memtype"]
        )
        count = _gauge("group_processes", "Processes in a group.", ["group"])
        by_container = cfg.by == "container"  # only then: the other layouts keep their label sets
        info_labels = (
            ["group", "kind", "pgid", "leader"]
            + (["container", "pod"] if by_container else [])
            + (["cmdline"] if cfg.cmdline_label else [])
        )
        info = _gauge(
            "group_info",
            "A group's identity: kind (pgid, named, cgroup, container, unit, other), PGID, "
            "leader command, and with groups.by=container the short container ID and pod UID.",
            info_labels,
        )
        vram = _gauge("group_gpu_memory_bytes", "GPU memory used by a group's processes, per card.", ["group", "gpu"])
        gtt = _gauge(
            "group_gpu_gtt_memory_bytes",
            "System memory mapped by a DRM card (GTT) for a group's processes, per card.",
            ["group", "gpu"],
        )
        for g in groups:
            mem.add_metric([g.label, "rss"], g.rss_bytes)
            if g.pss_bytes is not None:
                mem.add_metric([g.label, "pss"], g.pss_bytes)
            if g.swap_bytes is not None:
                mem.add_metric([g.label, "swap"], g.swap_bytes)
            if g.footprint_bytes is not None:
                mem.add_metric([g.label, "footprint"], g.footprint_bytes)
            if g.private_bytes is not None:
                mem.add_metric([g.label, "private"], g.private_bytes)
            count.add_metric([g.label], g.processes)
            leader = next((p for p in g.members if p.pid == g.pgid), g.members[0]) if g.members else None
            values = [g.label, g.kind, str(g.pgid or ""), leader.comm if leader else ""]
            if by_container:
                values += group_ids(leader.cgroup) if leader and g.kind == "container" else ["", ""]
            if cfg.cmdline_label:
                values.append(leader.cmdline[:200] if leader else "")
            info.add_metric(values, 1)
            for idx, used in sorted(g.gpu_memory_bytes.items()):
                vram.add_metric([g.label, str(idx)], used)
            for idx, used in sorted(g.gpu_gtt_memory_bytes.items()):
                gtt.add_metric([g.label, str(idx)], used)
        yield from (mem, count, info, vram)
        if gtt.samples:
            yield gtt

    def _gpus(self, s: Sample) -> Iterable[Metric]:
        if not s.gpus:
            return
        info = _gauge(
            "gpu_info", "A GPU's identity; always 1.", ["gpu", "uuid", "name", "driver_version", "vendor", "pci_bus_id"]
        )
        fields = (
            ("gpu_memory_total_bytes", "Total GPU memory.", "memory_total_bytes"),
            ("gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
            ("gpu_memory_free_bytes", "GPU memory free.", "memory_free_bytes"),
            ("gpu_memory_reserved_bytes", "GPU memory reserved by the driver.", "memory_reserved_bytes"),
            (
                "gpu_utilization_ratio",
                "Share of time a kernel ran on the GPU over the last sample period (0..1).",
                "utilization_ratio",
            ),
            (
                "gpu_memory_utilization_ratio",
                "Share of time GPU memory was read or written (0..1).",
                "memory_utilization_ratio",
            ),
            ("gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
            ("gpu_power_watts", "GPU power draw.", "power_watts"),
            ("gpu_power_limit_watts", "Enforced GPU power limit.", "power_limit_watts"),
            ("gpu_gtt_memory_total_bytes", "System memory a DRM card may map (GTT).", "gtt_memory_total_bytes"),
            ("gpu_gtt_memory_used_bytes", "System memory a DRM card maps now (GTT).", "gtt_memory_used_bytes"),
            (
                "gpu_unreadable_processes",
                "Processes whose GPU use could not be read (other users' descriptors "
                "without privilege): unknown, not zero.",
                "unreadable_processes",
            ),
            ("gpu_performance_state", "Performance state: 0 is the highest, 15 the lowest.", "performance_state"),
            ("gpu_last_xid", "The last XID error code seen on the card (0: none since start).", "last_xid"),
        )
        families = {attr: _gauge(name, doc, ["gpu"]) for name, doc, attr in fields}
        energy = CounterMetricFamily(
            P + "gpu_energy_joules", "Energy used by the GPU since the driver loaded.", labels=["gpu"]
        )
        clock = _gauge("gpu_clock_hertz", "Current GPU clock.", ["gpu", "clock"])
        clock_max = _gauge("gpu_clock_max_hertz", "Highest GPU clock the card supports.", ["gpu", "clock"])
        procs = _gauge("gpu_processes", "Processes using a GPU.", ["gpu"])
        throttle = _gauge(
            "gpu_throttle_active",
            "Whether a clock-event (throttle) reason holds the clocks down now (1) or not (0).",
            ["gpu", "reason"],
        )
        xid = CounterMetricFamily(
            P + "gpu_xid_errors", "XID errors reported by the driver since start.", labels=["gpu"]
        )
        ecc = CounterMetricFamily(
            P + "gpu_ecc_errors", "ECC errors since the driver loaded (volatile counters).", labels=["gpu", "type"]
        )
        mig_used = _gauge("gpu_mig_memory_used_bytes", "Memory used in a MIG GPU instance.", ["gpu", "mig"])
        mig_total = _gauge("gpu_mig_memory_total_bytes", "Memory of a MIG GPU instance.", ["gpu", "mig"])
        for card in s.gpus:
            idx = str(card.index)
            info.add_metric([idx, card.uuid, card.name, card.driver_version, card.vendor, card.pci_bus_id], 1)
            for reason, active in card.throttle_reasons:
                throttle.add_metric([idx, reason], 1 if active else 0)
            if card.xid_errors_total is not None:
                xid.add_metric([idx], card.xid_errors_total)
            for kind, value in (("corrected", card.ecc_corrected_total), ("uncorrected", card.ecc_uncorrected_total)):
                if value is not None:
                    ecc.add_metric([idx, kind], value)
            for m in card.mig:
                if m.memory_used_bytes is not None:
                    mig_used.add_metric([idx, m.mig], m.memory_used_bytes)
                if m.memory_total_bytes is not None:
                    mig_total.add_metric([idx, m.mig], m.memory_total_bytes)
            for attr, fam in families.items():
                value = getattr(card, attr)
                if value is not None:
                    fam.add_metric([idx], value)
            if card.energy_joules is not None:
                energy.add_metric([idx], card.energy_joules)
            for name, cur, top in (
                ("sm", card.clock_sm_hertz, card.clock_sm_max_hertz),
                ("memory", card.clock_memory_hertz, card.clock_memory_max_hertz),
            ):
                if cur is not None:
                    clock.add_metric([idx, name], cur)
                if top is not None:
                    clock_max.add_metric([idx, name], top)
            procs.add_metric([idx], len(card.processes))
        yield info
        yield from (f for f in families.values() if f.samples)
        yield from (f for f in (energy, clock, clock_max, throttle, xid, ecc, mig_used, mig_total) if f.samples)
        yield procs

    def _self(self, s: Sample) -> Iterable[Metric]:
        g = _gauge("sample_duration_seconds", "How long the last sample took.")
        g.add_metric([], s.duration_seconds)
        yield g
        g = _gauge("last_sample_timestamp_seconds", "Unix time of the last sample.")
        g.add_metric([], s.timestamp)
        yield g
        if s.interval_seconds is not None:  # staleness alerts compare the sample age with it
            g = _gauge("sample_interval_seconds", "The configured sampling interval.")
            g.add_metric([], s.interval_seconds)
            yield g
        g = _gauge("source_up", "Whether a data source worked in the last sample (1) or not (0).", ["source"])
        for source, up in sorted(s.sources_up.items()):
            g.add_metric([source], 1 if up else 0)
        yield g
        c = CounterMetricFamily(P + "sample_errors", "Failed reads of a data source since start.", labels=["source"])
        for source in sorted(set(s.sources_up) | set(s.errors_total)):
            c.add_metric([source], s.errors_total.get(source, 0))
        yield c


def build_registry(*collectors) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    registry.register(ProcessCollector(registry=None))
    registry.register(_BuildInfo())
    return registry


class _BuildInfo:
    def collect(self):
        m = InfoMetricFamily(P + "build", "mem-exporter version.")
        m.add_metric([], {"version": __version__})
        yield m


class Exposition:
    """The registry's rendered text, cached until the next sample.

    Rendering happens once per sample in the sampler's thread (`refresh`), so a
    scrape only copies bytes: a flood of scrapes costs no sampling time.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def refresh(self, *_ignored) -> None:
        fresh = {}
        encoder, content_type = choose_encoder("")
        fresh[content_type] = encoder(self.registry)
        self._cache = fresh

    def invalidate(self) -> None:
        self._cache = {}

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        body = self._cache.get(content_type)
        if body is None:
            with self._lock:
                body = encoder(self.registry)
            self._cache = {**self._cache, content_type: body}
        return body, content_type


LANDING = """<!doctype html><html><head><title>mem-exporter</title></head><body>
<h1>mem-exporter {version}</h1>
<p>Per-process-group memory, system RAM and GPU gauges for Prometheus.</p>
<ul><li><a href="/metrics">/metrics</a> - the latest sample</li>
<li><a href="/healthz">/healthz</a> - 200 while samples are fresh</li></ul>
<p>{status}</p></body></html>
"""


MAX_HEADER_BYTES = 16 * 1024  # request line and headers together; a scraper sends a few hundred bytes
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 23\r\n"
    b"Connection: close\r\n\r\nrequest head too large\n"
)


class _HeadTooLarge(Exception):
    pass


class _HeadBudget:
    """The connection's reader while a request head is read: lines come from the real reader, but no more
    than MAX_HEADER_BYTES in all, so a client's headers (read before authentication) pin at most that."""

    def __init__(self, rfile, budget: int):
        self._rfile = rfile
        self._left = budget

    def readline(self, size: int = -1) -> bytes:
        cap = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        line = self._rfile.readline(cap)
        self._left -= len(line)
        if self._left < 0:
            raise _HeadTooLarge()
        return line

    def __getattr__(self, name: str):
        return getattr(self._rfile, name)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms per keep-alive scrape

    def setup(self) -> None:
        # a slow or idle client is dropped, never waited on for ever (what a `timeout` class attribute would do,
        # per server instead of per class)
        self.request.settimeout(self.server.client_timeout)
        self.web = self.server.web  # one web config for the whole connection, even across a reload
        super().setup()

    def handle_one_request(self) -> None:
        # the budget stands in for the stream, which the parser reads only through readline
        real, self.rfile = self.rfile, _HeadBudget(self.rfile, MAX_HEADER_BYTES)  # type: ignore[assignment]
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self.close_connection = True
            try:
                self.wfile.write(_TOO_LARGE)
                self.wfile.flush()
            except OSError:
                pass
        finally:
            self.rfile = real

    def do_GET(self) -> None:
        if not self.web.authorized(self.headers.get("Authorization")):
            self._send(
                401, "text/plain; charset=utf-8", b"Unauthorized\n", {"WWW-Authenticate": 'Basic realm="mem-exporter"'}
            )
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.exposition.render(self.headers.get("Accept", ""))
            self._send(200, content_type, body)
        elif path in ("/healthz", "/-/healthy"):
            ok, text = self.server.health()
            self._send(200 if ok else 503, "text/plain; charset=utf-8", (text + "\n").encode())
        elif path == "/":
            _, text = self.server.health()
            page = LANDING.format(version=__version__, status=html.escape(text))
            self._send(200, "text/html; charset=utf-8", page.encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics\n")

    def _send(self, code: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.web.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # keep access logs out of the daemon's log
        log.debug("%s %s", self.address_string(), fmt % args)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\ntoo many clients\n"
)
_NOT_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)


class MetricsServer(ThreadingHTTPServer):
    """One thread per connection, apart from sampling and enforcement: a flood or a slow client costs
    those nothing. Open connections are capped (`max_connections`; the rest get 503 at once) and
    each is dropped after `client_timeout` seconds of silence. TLS and basic auth come from `web`,
    which a reload may replace; the TLS handshake runs in the connection's thread, not the accept loop."""

    daemon_threads = True  # stopping never waits for a client, however slow
    # A restart may bind at once over the old socket's TIME_WAIT. Not on Windows: there SO_REUSEADDR lets a
    # second process bind a port that is in use (a second exporter, or another user's program, would take
    # scrapes silently); the port is claimed exclusively instead (server_bind).
    allow_reuse_address = os.name != "nt"
    request_queue_size = 128  # listen backlog: 50 scrapers connecting at once must not wait for SYN retries

    def server_bind(self) -> None:
        exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)  # Windows only
        if exclusive is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        super().server_bind()

    def __init__(
        self,
        listen: str,
        exposition: Exposition,
        health: Callable[[], tuple[bool, str]],
        web: WebConfig | None = None,
        max_connections: int = 100,
        client_timeout: float = 10.0,
    ):
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, int(port)), _Handler)
        self.exposition = exposition
        self.health = health
        self.web = web or WebConfig()
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_refusal_log = 0.0
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # what server_address holds, typed as text here
        return f"{'https' if self.web.tls else 'http'}://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # --- connections (the accept loop runs process_request; a thread per connection the rest) ---
    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        ctx = self.web.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.client_timeout)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake record: say so, as Go's servers do
                request.sendall(_NOT_TLS)
                return
            conn = ctx.wrap_socket(request, server_side=True)  # the handshake, under the timeout
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(conn, client_address)  # the handler, on the TLS connection
        finally:
            conn.close()

    def _refuse(self, request) -> None:
        """Beyond max_connections: a 503 without blocking the accept loop (TLS clients just see a close)."""
        self.refused += 1
        if not self.web.tls:
            try:
                request.setblocking(False)  # never wait on this client (MSG_DONTWAIT, but on every OS)
                request.send(_BUSY)
            except OSError:
                pass
        self.shutdown_request(request)
        now = time.monotonic()
        if now - self._last_refusal_log > 60:
            self._last_refusal_log = now
            log.warning(
                "HTTP: %d open connections, the most allowed (web.max_connections); refusing more (%d refused so far)",
                self.max_connections,
                self.refused,
            )

    def handle_error(self, request, client_address) -> None:  # a client gone mid-response is no error of ours
        log.debug("HTTP connection from %s failed", client_address[0], exc_info=True)


def sample_health(
    get_sample: Callable[[], Sample | None], interval: Callable[[], float]
) -> Callable[[], tuple[bool, str]]:
    def health() -> tuple[bool, str]:
        s = get_sample()
        if s is None:
            return False, "no sample yet"
        age = time.time() - s.timestamp
        fresh = age <= max(3 * interval(), 10.0)
        state = "ok" if fresh else "stale"
        return fresh, f"{state}: last sample {age:.1f}s ago, {s.process_count} processes, {len(s.groups)} groups"

    return health
