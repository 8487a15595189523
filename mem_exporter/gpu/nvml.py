"""NVIDIA cards through NVML (the `nvidia-ml-py` bindings; this is the only module that imports `pynvml`).

How errors are handled, from the smallest to the largest:
- A value the card, driver or our permissions do not offer (NotSupported, NoPermission,
  FunctionNotFound, ...) becomes None: that series is absent, the rest of the card is read.
  NotSupported and FunctionNotFound are remembered per card, so the call is not repeated each tick.
- Any other NVML error on one card (GPUIsLost, Unknown, ...) leaves that card out of the reading,
  counts one error and puts the card on an exponential backoff (1 s, 2 s, 4 s ... capped at
  `retry_max`). The retry re-initialises NVML. Other cards keep being read every tick.
- NVML as a whole failing (init, device count, driver unloaded mid-run) leaves every card out,
  counts one error per attempt and backs off the same way.
- NVML absent (no library, no driver loaded): up False, no error counted, one log line; it is
  probed again on the same backoff so a driver loaded later is picked up.

Health, read each tick where the card offers it (else absent): clock-event (throttle) reasons, the
performance state, volatile ECC error counts (since the driver loaded; only where ECC is on), memory
per MIG GPU instance (where MIG is on), and XID errors: one NVML event set, each card registered once
per init for critical XID events, drained without blocking (timeout 0) at every read. XID counts are
kept per card UUID across re-inits; they count events seen since this source started.

A tick that skips a card (or the whole source) because its backoff has not run out calls no NVML
function and counts no error: `sample_errors_total{source="gpu"}` counts real failed attempts,
and `source_up{source="gpu"}` stays 0 until a retry succeeds.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from ..sample import GpuCard, GpuMigInstance, GpuProcess
from .source import GpuReading

# NVML's clocks-event (throttle) reason bits, by the names of mem_exporter_gpu_throttle_active{reason}
THROTTLE_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}
XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
MAX_EVENTS = 1000  # per read: a storm of events never holds the sampler up
RETRY_MIN = 1.0  # seconds before the first retry; doubled on each failure up to retry_max
_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE read as an unsigned long long

# "This value is not offered here": the series is left out and the card stays.
_MISSING = (
    "NotSupported",
    "NoPermission",
    "FunctionNotFound",
    "NotFound",
    "NoData",
    "InvalidArgument",
    "ArgumentVersionMismatch",
    "Deprecated",
)
# These do not change until NVML is re-initialised, so the call is skipped afterwards.
_UNSUPPORTED = ("NotSupported", "FunctionNotFound")
# NVML itself is not there (no library, no driver): the source is down, nothing is broken.
_ABSENT = ("LibraryNotFound", "DriverNotLoaded")
# NVML as a whole broke, not one card: every card is dropped and NVML re-initialised.
_SOURCE_WIDE = _ABSENT + ("Uninitialized", "LibRmVersionMismatch")


def _classes(nv: Any, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    return tuple(c for n in names if (c := getattr(nv, "NVMLError_" + n, None)) is not None)


def _text(value: Any) -> str | None:
    # Older bindings return C strings as bytes.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else value * factor


LINUX_LIBRARY = "libnvidia-ml.so.1"  # the name the bindings load on Linux


class NvmlLibraryMissing(ImportError):
    """No NVML library on this host: NVML is absent, as the bindings' LibraryNotFound says."""


def load_pynvml() -> Any:
    """The `pynvml` module, imported on first use: only hosts that use NVML need the bindings."""
    import pynvml

    return pynvml


def require_library() -> None:
    """On Linux, NvmlLibraryMissing unless the NVML library loads: a host without an NVIDIA driver (most
    laptops) then never imports the bindings, about 1 MiB of the exporter's memory."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(LINUX_LIBRARY)
        except OSError as e:
            raise NvmlLibraryMissing(str(e)) from None


class _Backoff:
    def __init__(self, cap: float):
        self.cap = cap
        self.delay = 0.0
        self.until = -math.inf

    def ready(self, now: float) -> bool:
        return now >= self.until

    def fail(self, now: float) -> float:
        self.delay = min(self.cap, max(RETRY_MIN, self.delay * 2))
        self.until = now + self.delay
        return self.delay

    def reset(self) -> None:
        self.delay, self.until = 0.0, -math.inf


@dataclass
class _Card:
    index: int
    handle: Any
    uuid: str
    name: str
    clock_sm_max_hertz: float | None
    clock_memory_max_hertz: float | None
    unsupported: set[str] = field(default_factory=set)
    memory_v2: bool = True
    pci_bus_id: str = ""
    throttle_supported: int | None = None  # bit mask; None: NVML does not say, all reasons are shown
    ecc: bool = False  # ECC is on (counters are read only then)
    xid: bool = False  # registered for XID events


class NvmlSource:
    name = "nvml"

    def __init__(
        self,
        retry_max: float = 60.0,
        log: logging.Logger | None = None,
        absent_level: int = logging.INFO,
        nvml: Any = None,
    ):
        """`nvml` is the `pynvml` module or a stand-in for it (tests); imported on first use when None."""
        self._nv: Any = None
        if nvml is not None:
            self._bind(nvml)
        self._log = log or logging.getLogger("mem_exporter.gpu")
        self._absent_level = absent_level
        self._retry_max = retry_max
        self._initialised = False
        self._cards: dict[int, _Card] | None = None  # None until NVML is up
        self._count: int | None = None
        self._driver = ""
        self._backoff = _Backoff(retry_max)  # whole source
        self._lost: dict[int, _Backoff] = {}  # card index -> its backoff
        self._problem: str | None = None  # the last problem logged, so it is logged once
        self._pending: str | None = None  # an error met by start(), counted by the first read
        self._announced = False
        self._events: Any = None  # the NVML event set for XID errors
        self._xid: dict[str, list[int]] = {}  # card uuid -> [XID events seen, last XID]

    def _bind(self, nv: Any) -> None:
        self._nv = nv
        self._missing = _classes(nv, _MISSING)
        self._unsupported = _classes(nv, _UNSUPPORTED)
        self._absent = _classes(nv, _ABSENT)
        self._wide = _classes(nv, _SOURCE_WIDE)

    @property
    def card_count(self) -> int | None:
        """Cards NVML saw at its last successful init; None before one."""
        return self._count

    # -- the GpuSource protocol --

    def start(self, now: float) -> GpuReading:
        """Try NVML now (instead of at the first read) so a missing driver is logged at start."""
        reading = self.read(now)
        self._pending = reading.error
        return reading

    def read(self, now: float) -> GpuReading:
        errors: list[str] = [self._pending] if self._pending else []
        self._pending = None
        try:
            cards = self._read(now, errors)
        except Exception as e:  # never raise into the sampler
            failed = self._source_failed(e, now)
            return GpuReading((), False, "; ".join(errors + [failed] if failed else errors) or None)
        up = self._cards is not None and not self._lost
        if up and (self._problem is not None or not self._announced):
            self._log.info("GPU: NVML up: %d card(s), driver %s", len(cards), self._driver or "?")
            self._problem, self._announced = None, True
        return GpuReading(tuple(cards), up, "; ".join(errors) or None)

    def close(self) -> None:
        self._shutdown()
        self._cards = None

    # -- reading --

    def _read(self, now: float, errors: list[str]) -> list[GpuCard]:
        if self._cards is None:
            if not self._backoff.ready(now):
                return []
            self._start(now, errors)
        elif any(b.ready(now) for b in self._lost.values()):
            self._shutdown()  # a lost card is due: re-initialise NVML, then read it again
            self._start(now, errors)
        assert self._cards is not None
        out = []
        drained = False
        for index, card in self._cards.items():
            lost = self._lost.get(index)
            if lost is not None and not lost.ready(now):
                continue  # still backing off: no NVML call for this card
            if not drained:  # before the first card read: a tick that reads no card calls nothing
                self._drain_events()
                drained = True
            try:
                out.append(self._read_card(card))
            except self._wide:
                raise
            except self._nv.NVMLError as e:
                errors.append(self._card_failed(index, card.uuid, e, now))
                continue
            if lost is not None:
                del self._lost[index]
                self._log.info("GPU: gpu %d (%s) is back", index, card.uuid)
        return out

    def _start(self, now: float, errors: list[str]) -> None:
        if self._nv is None:
            require_library()
            self._bind(load_pynvml())
        nv = self._nv
        nv.nvmlInit()
        self._initialised = True
        self._driver = _text(self._query(None, "nvmlSystemGetDriverVersion")) or ""
        count = nv.nvmlDeviceGetCount()
        cards: dict[int, _Card] = {}
        for i in range(count):
            try:
                cards[i] = self._open_card(i)
            except self._wide:
                raise
            except nv.NVMLError as e:
                errors.append(self._card_failed(i, None, e, now))
        self._register_events(cards)
        if self._count is not None and count != self._count:
            self._log.warning("GPU: NVML now sees %d card(s), was %d", count, self._count)
        for i in [i for i in self._lost if i >= count]:
            del self._lost[i]  # that card is gone from the bus; nothing left to retry
        self._cards, self._count = cards, count
        self._backoff.reset()

    def _open_card(self, index: int) -> _Card:
        nv = self._nv
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        card = _Card(index, handle, "", "", None, None)
        card.uuid = _text(self._query(card, "nvmlDeviceGetUUID", handle)) or f"gpu-{index}"
        card.name = _text(self._query(card, "nvmlDeviceGetName", handle)) or ""
        # Max clocks are a property of the board: read once per init.
        sm_clock, mem_clock = getattr(nv, "NVML_CLOCK_SM", 1), getattr(nv, "NVML_CLOCK_MEM", 2)
        card.clock_sm_max_hertz = _scaled(
            self._query(card, "nvmlDeviceGetMaxClockInfo", handle, sm_clock, key="max_sm"), 1e6
        )
        card.clock_memory_max_hertz = _scaled(
            self._query(card, "nvmlDeviceGetMaxClockInfo", handle, mem_clock, key="max_mem"), 1e6
        )
        pci = self._query(card, "nvmlDeviceGetPciInfo", handle)
        card.pci_bus_id = _bus_id(_text(getattr(pci, "busId", None)) or "")
        card.throttle_supported = self._first(
            card, handle, "nvmlDeviceGetSupportedClocksEventReasons", "nvmlDeviceGetSupportedClocksThrottleReasons"
        )
        ecc = self._query(card, "nvmlDeviceGetEccMode", handle)  # (current, pending); pending needs a reboot
        card.ecc = bool(ecc and ecc[0])
        return card

    def _first(self, card: _Card, handle: Any, *functions: str) -> Any:
        """The first of `functions` that answers (NVML renamed some calls; bindings have one or both)."""
        for fn in functions:
            value = self._query(card, fn, handle)
            if value is not None:
                return value
        return None

    # -- XID events --

    def _register_events(self, cards: dict[int, _Card]) -> None:
        nv = self._nv
        try:
            self._events = nv.nvmlEventSetCreate()
        except (AttributeError,) + self._missing:
            self._events = None
            return
        for card in cards.values():
            try:
                nv.nvmlDeviceRegisterEvents(
                    card.handle, getattr(nv, "nvmlEventTypeXidCriticalError", XID_EVENT), self._events
                )
            except self._missing:
                continue  # this card gives no XID events: its series stay absent
            card.xid = True
            self._xid.setdefault(card.uuid, [0, 0])

    def _drain_events(self) -> None:
        """Every XID event waiting, without blocking; a card that NVML names by handle is found by UUID."""
        if self._events is None:
            return
        nv = self._nv
        wait = getattr(nv, "nvmlEventSetWait_v2", None) or nv.nvmlEventSetWait
        timeout = getattr(nv, "NVMLError_Timeout", None)
        for _ in range(MAX_EVENTS):
            try:
                event = wait(self._events, 0)
            except self._missing:
                return
            except self._wide:
                raise
            except nv.NVMLError as e:
                if timeout is not None and isinstance(e, timeout):
                    return  # nothing more waiting
                self._log.warning(
                    "GPU: reading XID events failed (%s); not read again until NVML restarts", _describe(e)
                )
                self._events = None
                return
            if not event.eventType & XID_EVENT:
                continue
            try:
                uuid = _text(nv.nvmlDeviceGetUUID(event.device)) or ""
            except nv.NVMLError:
                uuid = ""  # the card is failing too; its own read will tell
            seen = self._xid.setdefault(uuid, [0, 0])
            seen[0] += 1
            seen[1] = int(event.eventData)
            self._log.warning("GPU: %s: XID %d", uuid, seen[1])

    def _read_card(self, card: _Card) -> GpuCard:
        nv, h = self._nv, card.handle
        total, used, free, reserved = self._memory(card)
        util = self._query(card, "nvmlDeviceGetUtilizationRates", h)
        return GpuCard(
            index=card.index,
            uuid=card.uuid,
            name=card.name,
            driver_version=self._driver,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=free,
            memory_reserved_bytes=reserved,
            utilization_ratio=None if util is None else util.gpu / 100.0,
            memory_utilization_ratio=None if util is None else util.memory / 100.0,
            temperature_celsius=_scaled(
                self._query(card, "nvmlDeviceGetTemperature", h, getattr(nv, "NVML_TEMPERATURE_GPU", 0)), 1.0
            ),
            power_watts=_scaled(self._query(card, "nvmlDeviceGetPowerUsage", h), 1e-3),  # mW
            power_limit_watts=_scaled(self._query(card, "nvmlDeviceGetEnforcedPowerLimit", h), 1e-3),  # mW
            energy_joules=_scaled(self._query(card, "nvmlDeviceGetTotalEnergyConsumption", h), 1e-3),  # mJ
            clock_sm_hertz=_scaled(
                self._query(card, "nvmlDeviceGetClockInfo", h, getattr(nv, "NVML_CLOCK_SM", 1), key="sm"), 1e6
            ),  # MHz
            clock_memory_hertz=_scaled(
                self._query(card, "nvmlDeviceGetClockInfo", h, getattr(nv, "NVML_CLOCK_MEM", 2), key="mem"), 1e6
            ),
            clock_sm_max_hertz=card.clock_sm_max_hertz,
            clock_memory_max_hertz=card.clock_memory_max_hertz,
            processes=self._processes(card),
            vendor="nvidia",
            pci_bus_id=card.pci_bus_id,
            **self._health(card),
        )

    def _health(self, card: _Card) -> dict[str, Any]:
        nv, h = self._nv, card.handle
        out: dict[str, Any] = {}
        mask = self._first(
            card, h, "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        if mask is not None:
            supported = card.throttle_supported
            out["throttle_reasons"] = tuple(
                (name, bool(mask & bit))
                for name, bit in THROTTLE_REASONS.items()
                if supported is None or supported & bit
            )
        pstate = self._query(card, "nvmlDeviceGetPerformanceState", h)
        if pstate is not None and 0 <= pstate <= 15:  # 32: unknown
            out["performance_state"] = int(pstate)
        if card.ecc:
            volatile = getattr(nv, "NVML_VOLATILE_ECC", 0)
            for kind, code in (
                ("corrected", getattr(nv, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0)),
                ("uncorrected", getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1)),
            ):
                value = self._query(card, "nvmlDeviceGetTotalEccErrors", h, code, volatile, key=f"ecc_{kind}")
                if value is not None:
                    out[f"ecc_{kind}_total"] = int(value)
        if card.xid:
            out["xid_errors_total"], out["last_xid"] = self._xid.get(card.uuid, (0, 0))
        out["mig"] = self._mig(card)
        return out

    def _mig(self, card: _Card) -> tuple[GpuMigInstance, ...]:
        nv, h = self._nv, card.handle
        mode = self._query(card, "nvmlDeviceGetMigMode", h)  # (current, pending)
        if not mode or mode[0] != getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1):
            return ()
        found: dict[str, GpuMigInstance] = {}
        for i in range(self._query(card, "nvmlDeviceGetMaxMigDeviceCount", h) or 0):
            mig = self._query(card, "nvmlDeviceGetMigDeviceHandleByIndex", h, i, key="mig_handle")
            if mig is None:
                continue  # an empty slot
            gi = self._query(card, "nvmlDeviceGetGpuInstanceId", mig, key="mig_gi")
            memory = self._query(card, "nvmlDeviceGetMemoryInfo", mig, key="mig_memory")
            if gi is None or str(gi) in found:
                continue  # compute instances of one GPU instance share its memory: once per instance
            found[str(gi)] = GpuMigInstance(
                str(gi), None if memory is None else int(memory.used), None if memory is None else int(memory.total)
            )
        return tuple(sorted(found.values(), key=lambda m: int(m.mig)))

    def _memory(self, card: _Card) -> tuple[int | None, int | None, int | None, int | None]:
        # v2 splits out the memory the driver reserves; its `used` excludes it (as nvidia-smi shows).
        version = getattr(self._nv, "nvmlMemory_v2", None)
        if card.memory_v2 and version is not None:
            try:
                m = self._nv.nvmlDeviceGetMemoryInfo(card.handle, version=version)
                return int(m.total), int(m.used), int(m.free), int(m.reserved)
            except (TypeError, AttributeError) + self._missing:
                card.memory_v2 = False  # old bindings or driver: v1 from now on
        m = self._query(card, "nvmlDeviceGetMemoryInfo", card.handle)
        if m is None:
            return None, None, None, None
        return int(m.total), int(m.used), int(m.free), None

    def _processes(self, card: _Card) -> tuple[GpuProcess, ...]:
        # A process using both compute and graphics is listed twice by NVML with the same memory;
        # keep one entry per pid so per-group sums do not count it twice.
        found: dict[int, GpuProcess] = {}
        for kind in ("graphics", "compute"):  # compute last: it names the entry
            fn = f"nvmlDeviceGet{kind.capitalize()}RunningProcesses"
            for p in self._query(card, fn, card.handle) or ():
                used = getattr(p, "usedGpuMemory", None)
                if used is not None and used >= _NOT_AVAILABLE:
                    used = None
                pid = int(p.pid)
                prev = found.get(pid)
                if prev is not None and prev.gpu_memory_bytes is not None:
                    used = max(prev.gpu_memory_bytes, used or 0)
                found[pid] = GpuProcess(pid, None if used is None else int(used), kind)
        return tuple(sorted(found.values(), key=lambda p: p.pid))

    def _query(self, card: _Card | None, fn: str, *args: Any, key: str | None = None) -> Any:
        """`fn(*args)`, or None where the value is not offered; other NVML errors propagate."""
        key = key or fn
        if card is not None and key in card.unsupported:
            return None
        func = getattr(self._nv, fn, None)
        if func is None:  # bindings older than the call
            if card is not None:
                card.unsupported.add(key)
            return None
        try:
            return func(*args)
        except self._missing as e:
            if card is not None and isinstance(e, self._unsupported):
                card.unsupported.add(key)
            return None

    # -- failures --

    def _card_failed(self, index: int, uuid: str | None, e: BaseException, now: float) -> str:
        backoff = self._lost.setdefault(index, _Backoff(self._retry_max))
        first = backoff.delay == 0
        delay = backoff.fail(now)
        what = f"gpu {index}" + (f" ({uuid})" if uuid else "")
        message = f"{what}: {_describe(e)}; retrying in {delay:g}s"
        self._log.log(logging.WARNING if first else logging.DEBUG, "GPU: %s", message)
        return message

    def _source_failed(self, e: BaseException, now: float) -> str | None:
        """Drops every card and backs off; the error to count, None where NVML is simply absent."""
        self._shutdown()
        self._cards = None
        self._lost.clear()  # every card is retried with the source
        delay = self._backoff.fail(now)
        absent = isinstance(e, ImportError) or (self._nv is not None and isinstance(e, self._absent))
        if absent:
            problem = f"NVML not available ({_describe(e)})"
            self._note(
                problem,
                self._absent_level,
                f'GPU: {problem}: no NVIDIA GPU metrics, source_up{{source="gpu"}} is 0; '
                "set gpu.backend: none if this host has no NVIDIA GPU",
            )
            return None
        message = f"NVML failed: {_describe(e)}; retrying in {delay:g}s"
        nvml_error = self._nv is not None and isinstance(e, getattr(self._nv, "NVMLError", ()))
        self._note(f"NVML failed ({_describe(e)})", logging.WARNING, f"GPU: {message}", exc_info=not nvml_error)
        return message

    def _note(self, problem: str, level: int, message: str, exc_info: bool = False) -> None:
        # Each distinct problem is logged once; repeats go to debug.
        if problem != self._problem:
            self._problem = problem
            self._log.log(level, "%s", message, exc_info=exc_info)
        else:
            self._log.debug("%s", message)

    def _shutdown(self) -> None:
        if self._events is not None:
            try:
                self._nv.nvmlEventSetFree(self._events)
            except Exception:  # NVML already broken; the set goes with it
                pass
            self._events = None
        if self._initialised:
            self._initialised = False
            try:
                self._nv.nvmlShutdown()
            except Exception:  # already broken; the next init tells
                pass


def _bus_id(text: str) -> str:
    """NVML's "00000000:41:00.0" as sysfs writes it: "0000:41:00.0"."""
    domain, sep, rest = text.lower().partition(":")
    return f"{domain[-4:]}{sep}{rest}" if sep else text


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    text = str(e)
    return f"{name}: {text}" if text and text != name else name
