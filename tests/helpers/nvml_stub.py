"""An in-memory stand-in for the `pynvml` module, for tests and benchmarks of `NvmlSource`.

It speaks NVML's raw units (MHz, milliwatts, millijoules, percent) and raises the real
`pynvml.NVMLError_*` classes, built from codes exactly as the bindings do, so the source under
test sees what a driver would give it. Every call is recorded in `calls`.

    stub = StubNvml([StubCard()])
    stub.fail("nvmlInit", stub.NVML_ERROR_LIBRARY_NOT_FOUND)    # module-wide
    stub.cards[0].fail("nvmlDeviceGetPowerUsage", stub.NVML_ERROR_NOT_SUPPORTED)
    stub.cards[0].lost = True                                   # every call on it: GPU is lost
    NvmlSource(nvml=stub)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from mem_exporter.gpu.nvml import load_pynvml

GIB = 1024**3
MIB = 1024**2


@dataclass
class StubCard:
    uuid: str | bytes = "GPU-5a1c2d3e-0000-4000-8000-000000000000"
    name: str | bytes = "NVIDIA GeForce RTX 3060"
    memory_total: int = 12 * GIB
    memory_used: int = 5 * GIB  # as NVML v2 reports it: without the reserved part
    memory_reserved: int = 300 * MIB
    gpu_util: int = 87  # percent
    memory_util: int = 41
    temperature: int = 66  # celsius
    power_mw: int = 185_500
    power_limit_mw: int = 170_000
    energy_mj: int = 123_456_789
    clock_sm_mhz: int = 1_980
    clock_mem_mhz: int = 7_501
    clock_sm_max_mhz: int = 2_100
    clock_mem_max_mhz: int = 7_501
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes or None)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    pci_bus_id: str = "00000000:41:00.0"
    throttle: int = 0  # active clocks-event reason bits
    throttle_supported: int = 0x1FF
    pstate: int = 2
    ecc: bool | None = None  # None: no ECC on this card (NotSupported); False: off; True: on
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    mig: list[tuple[int, int, int]] | None = None  # MIG on: (GPU instance ID, used, total) per MIG device
    errors: dict[str, int] = field(default_factory=dict)  # function name -> NVML error code
    lost: bool = False  # every call on this card fails with GPU is lost

    def fail(self, function: str, code: int | None) -> None:
        if code is None:
            self.errors.pop(function, None)
        else:
            self.errors[function] = code


class StubNvml:
    # Copied from the real bindings in __init__ (every NVMLError* class and NVML_ERROR_* code comes along);
    # declared here for the type checker: these are the ones the stub itself uses.
    NVMLError: type[Exception]
    NVML_ERROR_GPU_IS_LOST: int
    NVML_ERROR_UNINITIALIZED: int
    NVML_ERROR_INVALID_ARGUMENT: int
    NVML_ERROR_NOT_SUPPORTED: int
    NVML_ERROR_NOT_FOUND: int
    NVML_ERROR_TIMEOUT: int
    NVML_VOLATILE_ECC: int
    NVML_MEMORY_ERROR_TYPE_CORRECTED: int
    nvmlEventTypeXidCriticalError: int

    def __init__(self, cards: list[StubCard] | None = None, driver: str | bytes = "550.54.15", memory_v2: bool = True):
        real = load_pynvml()
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_ERROR_")):
                setattr(self, name, getattr(real, name))
        self.NVML_TEMPERATURE_GPU = real.NVML_TEMPERATURE_GPU
        self.NVML_CLOCK_SM = real.NVML_CLOCK_SM
        self.NVML_CLOCK_MEM = real.NVML_CLOCK_MEM
        for name in (
            "nvmlEventTypeXidCriticalError",
            "NVML_MEMORY_ERROR_TYPE_CORRECTED",
            "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
            "NVML_VOLATILE_ECC",
            "NVML_DEVICE_MIG_ENABLE",
        ):
            setattr(self, name, getattr(real, name))
        self.event_sets: list[list] = []  # per created set: the cards registered in it
        self.pending: list[tuple[StubCard, int]] = []  # XID events not yet waited for: (card, xid)
        if memory_v2:  # bindings older than 11.510 have no v2 memory call
            self.nvmlMemory_v2 = real.nvmlMemory_v2
        self.cards = list(cards if cards is not None else [StubCard()])
        self.driver = driver
        self.errors: dict[str, int] = {}
        self.calls: list[str] = []
        self.initialised = 0

    def fail(self, function: str, code: int | None) -> None:
        if code is None:
            self.errors.pop(function, None)
        else:
            self.errors[function] = code

    def _enter(self, function: str, card: StubCard | None = None) -> None:
        self.calls.append(function)
        code = self.errors.get(function)
        if code is None and card is not None:
            code = self.NVML_ERROR_GPU_IS_LOST if card.lost else card.errors.get(function)
        if code is not None:
            raise self.NVMLError(code)  # the real bindings map the code to its subclass

    # -- the pynvml functions NvmlSource uses --

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        if not self.initialised:
            raise self.NVMLError(self.NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def _ready(self, function: str, card: StubCard | None = None) -> None:
        self._enter(function, card)
        if not self.initialised:
            raise self.NVMLError(self.NVML_ERROR_UNINITIALIZED)

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._ready("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._ready("nvmlDeviceGetCount")
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> StubCard:
        if not 0 <= index < len(self.cards):
            self._ready("nvmlDeviceGetHandleByIndex")
            raise self.NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        self._ready("nvmlDeviceGetHandleByIndex", self.cards[index])
        return self.cards[index]

    def nvmlDeviceGetUUID(self, card: StubCard) -> str | bytes:
        self._ready("nvmlDeviceGetUUID", card)
        return card.uuid

    def nvmlDeviceGetName(self, card: StubCard) -> str | bytes:
        self._ready("nvmlDeviceGetName", card)
        return card.name

    def nvmlDeviceGetMemoryInfo(self, card: StubCard, version: int | None = None) -> Any:
        if isinstance(card, SimpleNamespace):  # a MIG device handle
            self._ready("nvmlDeviceGetMemoryInfo")
            return SimpleNamespace(total=card.total, used=card.used, free=card.total - card.used)
        if not version:
            self._ready("nvmlDeviceGetMemoryInfo", card)
            used = card.memory_used + card.memory_reserved  # v1 counts the reserved part as used
            return SimpleNamespace(total=card.memory_total, used=used, free=card.memory_total - used)
        self._ready("nvmlDeviceGetMemoryInfo_v2", card)
        return SimpleNamespace(
            version=version,
            total=card.memory_total,
            reserved=card.memory_reserved,
            used=card.memory_used,
            free=card.memory_total - card.memory_used - card.memory_reserved,
        )

    def nvmlDeviceGetUtilizationRates(self, card: StubCard) -> Any:
        self._ready("nvmlDeviceGetUtilizationRates", card)
        return SimpleNamespace(gpu=card.gpu_util, memory=card.memory_util)

    def nvmlDeviceGetTemperature(self, card: StubCard, sensor: int) -> int:
        self._ready("nvmlDeviceGetTemperature", card)
        if sensor != self.NVML_TEMPERATURE_GPU:
            raise self.NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return card.temperature

    def nvmlDeviceGetPowerUsage(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetPowerUsage", card)
        return card.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetEnforcedPowerLimit", card)
        return card.power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetTotalEnergyConsumption", card)
        return card.energy_mj

    def nvmlDeviceGetClockInfo(self, card: StubCard, clock: int) -> int:
        self._ready("nvmlDeviceGetClockInfo", card)
        return card.clock_sm_mhz if clock == self.NVML_CLOCK_SM else card.clock_mem_mhz

    def nvmlDeviceGetMaxClockInfo(self, card: StubCard, clock: int) -> int:
        self._ready("nvmlDeviceGetMaxClockInfo", card)
        return card.clock_sm_max_mhz if clock == self.NVML_CLOCK_SM else card.clock_mem_max_mhz

    def nvmlDeviceGetComputeRunningProcesses(self, card: StubCard) -> list[Any]:
        self._ready("nvmlDeviceGetComputeRunningProcesses", card)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in card.compute]

    # -- health --

    def xid(self, card: StubCard, code: int) -> None:
        """The driver reports XID `code` on `card`."""
        self.pending.append((card, code))

    def nvmlDeviceGetPciInfo(self, card: StubCard) -> Any:
        self._ready("nvmlDeviceGetPciInfo", card)
        return SimpleNamespace(busId=card.pci_bus_id.encode())

    def nvmlDeviceGetCurrentClocksEventReasons(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetCurrentClocksEventReasons", card)
        return card.throttle

    def nvmlDeviceGetSupportedClocksEventReasons(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetSupportedClocksEventReasons", card)
        return card.throttle_supported

    def nvmlDeviceGetPerformanceState(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetPerformanceState", card)
        return card.pstate

    def nvmlDeviceGetEccMode(self, card: StubCard) -> list[int]:
        self._ready("nvmlDeviceGetEccMode", card)
        if card.ecc is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return [int(card.ecc), int(card.ecc)]

    def nvmlDeviceGetTotalEccErrors(self, card: StubCard, error_type: int, counter_type: int) -> int:
        self._ready("nvmlDeviceGetTotalEccErrors", card)
        if counter_type != self.NVML_VOLATILE_ECC:
            raise self.NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return card.ecc_corrected if error_type == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else card.ecc_uncorrected

    def nvmlDeviceGetMigMode(self, card: StubCard) -> list[int]:
        self._ready("nvmlDeviceGetMigMode", card)
        if card.mig is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, card: StubCard) -> int:
        self._ready("nvmlDeviceGetMaxMigDeviceCount", card)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, card: StubCard, index: int) -> Any:
        self._ready("nvmlDeviceGetMigDeviceHandleByIndex", card)
        if card.mig is None or index >= len(card.mig):
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        gi, used, total = card.mig[index]
        return SimpleNamespace(gi=gi, used=used, total=total)

    def nvmlDeviceGetGpuInstanceId(self, mig: Any) -> int:
        self._ready("nvmlDeviceGetGpuInstanceId")
        return mig.gi

    def nvmlEventSetCreate(self) -> list:
        self._ready("nvmlEventSetCreate")
        self.event_sets.append([])
        return self.event_sets[-1]

    def nvmlDeviceRegisterEvents(self, card: StubCard, types: int, event_set: list) -> None:
        self._ready("nvmlDeviceRegisterEvents", card)
        event_set.append(card)

    def nvmlEventSetWait_v2(self, event_set: list, timeout_ms: int) -> Any:
        self._ready("nvmlEventSetWait_v2")
        for i, (card, code) in enumerate(self.pending):
            if any(c is card for c in event_set):
                del self.pending[i]
                return SimpleNamespace(device=card, eventType=self.nvmlEventTypeXidCriticalError, eventData=code)
        raise self.NVMLError(self.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: list) -> None:
        self._enter("nvmlEventSetFree")
        event_set.clear()

    def nvmlDeviceGetGraphicsRunningProcesses(self, card: StubCard) -> list[Any]:
        self._ready("nvmlDeviceGetGraphicsRunningProcesses", card)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in card.graphics]
