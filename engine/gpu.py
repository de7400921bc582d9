"""NVML collector: per-GPU utilization, memory, power, temperature, ECC, XID events and NVLink traffic.

Torch-free; the daemon runs one for its own node and a rank may run one for its node and
send the samples in its reports (``report["gpus"]``). The NVML module is injectable so
tests drive it with recorded values. Without a driver the collector is "down" with a
reason from a small fixed set (``REASONS``) and reports no per-GPU values.

    sampler = GpuCollector().start()   # never raises
    snap = sampler.sample()            # {"up": 0|1, "reason": ..., "node": ..., "devices": [...]}
    sampler.close()
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# Bounded label values for milepost_gpu_collector_up{reason}.
REASONS = (
    "ok",
    "nvml_not_installed",
    "library_not_found",
    "driver_not_loaded",
    "no_permission",
    "no_devices",
    "error",
)
_KIB = 1024


def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


class GpuCollector:
    """Samples every GPU of this node through NVML; an event thread counts XID errors."""

    def __init__(
        self,
        nvml: Any = None,
        *,
        node: str | None = None,
        xid_events: bool = True,
        event_wait_ms: int = 500,
        min_interval_s: float = 1.0,
    ) -> None:
        self._nvml = nvml
        self.node = node or socket.gethostname()
        self.xid_events, self.event_wait_ms = xid_events, event_wait_ms
        self.min_interval_s = min_interval_s
        self.up, self.reason = False, "error"
        self.errors = 0  # NVML calls that failed after a successful init
        self._handles: list[Any] = []
        self._xid: dict[tuple[int, int], int] = {}  # (gpu index, xid) -> count
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> GpuCollector:
        """Initialises NVML; on any failure the collector is down with a reason. Never raises."""
        try:
            nvml = self._nvml if self._nvml is not None else _import_nvml()
        except ImportError:
            self.reason = "nvml_not_installed"
            return self
        self._nvml = nvml
        try:
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as e:
            self.reason = self._classify(e)
            log.info("NVML unavailable on %s: %s (%s)", self.node, self.reason, e)
            return self
        if not self._handles:
            self.reason = "no_devices"
            return self
        self.up, self.reason = True, "ok"
        if self.xid_events:
            self._start_event_thread()
        return self

    def sample_every(self, interval_s: float) -> GpuCollector:
        """Samples from a thread of its own; ``latest()`` then never touches NVML (for ranks)."""
        if not self.up:
            return self

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self._last_at = 0.0
                self.sample()

        self.sample()
        threading.Thread(target=loop, name="milepost-nvml-sample", daemon=True).start()
        return self

    def latest(self) -> dict[str, Any]:
        """The newest snapshot without sampling (a fresh one if there is none yet)."""
        return self._last if self._last is not None else self.sample()

    @property
    def events_running(self) -> bool:
        """Whether the XID event thread is alive (False where NVML has no events for any GPU)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.event_wait_ms / 1000 + 1)
        if self.up:
            with contextlib.suppress(Exception):  # shutting down: nothing left to tell
                self._nvml.nvmlShutdown()
            self.up = False

    def _classify(self, e: BaseException) -> str:
        nvml = self._nvml
        code = getattr(e, "value", None)
        names = {
            "NVML_ERROR_LIBRARY_NOT_FOUND": "library_not_found",
            "NVML_ERROR_DRIVER_NOT_LOADED": "driver_not_loaded",
            "NVML_ERROR_NO_PERMISSION": "no_permission",
        }
        for const, reason in names.items():
            if code is not None and code == getattr(nvml, const, object()):
                return reason
        return "error"

    # -- XID events -----------------------------------------------------------
    def _start_event_thread(self) -> None:
        nvml = self._nvml
        try:
            evset = nvml.nvmlEventSetCreate()
        except Exception as e:
            log.info("NVML events unavailable: %s", e)
            return
        registered = 0
        for h in self._handles:
            try:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, evset)
                registered += 1
            except Exception as e:  # e.g. NotSupported on some boards: the others still count
                log.info("NVML: no XID events for a device: %s", e)
        if not registered:
            self._free(evset)
            return
        self._thread = threading.Thread(
            target=self._event_loop, args=(evset,), name="milepost-nvml-xid", daemon=True
        )
        self._thread.start()

    def _free(self, evset: Any) -> None:
        with contextlib.suppress(Exception):  # best effort
            self._nvml.nvmlEventSetFree(evset)

    def _event_loop(self, evset: Any) -> None:
        nvml = self._nvml
        timeout_code = getattr(nvml, "NVML_ERROR_TIMEOUT", 10)
        failures = 0
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(evset, self.event_wait_ms)
            except Exception as e:
                if getattr(e, "value", None) == timeout_code:
                    continue
                failures += 1
                if failures >= 10:  # a broken event set: stop trying, sampling goes on
                    log.warning("NVML event thread stopping after repeated errors: %s", e)
                    break
                self._stop.wait(1.0)
                continue
            if int(data.eventType) & int(nvml.nvmlEventTypeXidCriticalError):
                self.record_xid(self._index_of(data.device), int(data.eventData))
        self._free(evset)

    def _index_of(self, handle: Any) -> int:
        try:
            return int(self._nvml.nvmlDeviceGetIndex(handle))
        except Exception:
            return -1

    def record_xid(self, index: int, xid: int) -> None:
        with self._lock:
            self._xid[(index, xid)] = self._xid.get((index, xid), 0) + 1

    # -- sampling -------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """A snapshot of every GPU (cached for ``min_interval_s``); cheap when down."""
        now = time.monotonic()
        if self._last is not None and now - self._last_at < self.min_interval_s:
            return self._last
        snap: dict[str, Any] = {
            "up": 1 if self.up else 0,
            "reason": self.reason,
            "node": self.node,
            "devices": [],
        }
        if self.up:
            snap["devices"] = [self._device(i, h) for i, h in enumerate(self._handles)]
        self._last, self._last_at = snap, now
        return snap

    def _call(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, fn)(*args)
        except Exception:
            self.errors += 1
            return None

    def _device(self, index: int, h: Any) -> dict[str, Any]:
        nvml = self._nvml
        d: dict[str, Any] = {"index": index}
        uuid = self._call("nvmlDeviceGetUUID", h)
        if uuid is not None:
            d["uuid"] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        name = self._call("nvmlDeviceGetName", h)
        if name is not None:
            d["name"] = name.decode() if isinstance(name, bytes) else str(name)
        util = self._call("nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            d["utilization"] = float(util.gpu) / 100.0
        mem = self._call("nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            d["memory_used_bytes"], d["memory_total_bytes"] = int(mem.used), int(mem.total)
        power = self._call("nvmlDeviceGetPowerUsage", h)
        if power is not None:
            d["power_watts"] = float(power) / 1000.0  # NVML reports milliwatts
        temp = self._call("nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU)
        if temp is not None:
            d["temperature_celsius"] = float(temp)
        ecc: dict[str, int] = {}
        for kind, const in (
            ("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            # Not supported on boards without ECC: a quiet absence, not an error.
            try:
                ecc[kind] = int(nvml.nvmlDeviceGetTotalEccErrors(h, const, nvml.NVML_AGGREGATE_ECC))
            except Exception:
                continue
        if ecc:
            d["ecc_errors"] = ecc
        d.update(self._nvlink(h))
        with self._lock:
            xids = {str(x): n for (i, x), n in self._xid.items() if i == index}
        d["xid_errors"] = xids
        return d

    def _nvlink(self, h: Any) -> dict[str, int]:
        """Cumulative NVLink data bytes (all links) from the throughput fields, where supported."""
        nvml = self._nvml
        try:
            tx_id = nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
            rx_id = nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
            # scopeId UINT_MAX asks for the sum over all links.
            values = nvml.nvmlDeviceGetFieldValues(h, [(tx_id, 0xFFFFFFFF), (rx_id, 0xFFFFFFFF)])
        except Exception:
            return {}
        out: dict[str, int] = {}
        for key, v in zip(("nvlink_tx_bytes", "nvlink_rx_bytes"), values, strict=False):
            if int(getattr(v, "nvmlReturn", 1)) != 0:
                continue
            out[key] = int(_field_value(nvml, v)) * _KIB
        return out


def _field_value(nvml: Any, v: Any) -> float:
    """The number in an nvmlFieldValue_t, read through the union member its valueType names."""
    members = {
        getattr(nvml, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }
    return float(getattr(v.value, members.get(int(v.valueType), "ullVal")))
