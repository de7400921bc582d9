"""NVML collector: recorded NVML answers through a fake nvidia-ml-py module, and the no-GPU path.

This machine has no GPU and no NVIDIA driver: the no-GPU test runs the real nvidia-ml-py
here. The per-GPU tests drive the collector with NVML answers in NVML's raw units
(tests/unit/data/nvml_h100x2.json) through a module with nvidia-ml-py's names.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from milepost.daemon.gpu_metrics import GpuMetrics
from milepost.daemon.metrics import RunMetrics
from milepost.engine import gpu as gpu_mod
from milepost.engine.contract.wire import Report
from milepost.engine.gpu import REASONS, GpuCollector

pytestmark = pytest.mark.timeout(60)

RECORDED = json.loads((Path(__file__).parent / "data" / "nvml_h100x2.json").read_text())


class FakeNVML:
    """The parts of nvidia-ml-py the collector uses, answering with recorded values."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_AGGREGATE_ECC = 1
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
    nvmlEventTypeXidCriticalError = 0x8

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, recorded: dict[str, Any], *, init_error: int | None = None) -> None:
        self.devices = recorded["devices"]
        self.init_error = init_error
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.shut_down = False

    def _err(self, code: int) -> Exception:
        return self.NVMLError(code)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self._err(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return str(self.devices[h]["uuid"])

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return str(self.devices[h]["name"]).encode()  # older bindings return bytes

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(**self.devices[h]["utilization"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(**self.devices[h]["memory"])

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return int(self.devices[h]["power_mw"])

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return int(self.devices[h]["temperature_c"])

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        ecc = self.devices[h]["ecc_aggregate"]
        if ecc is None:
            raise self._err(self.NVML_ERROR_NOT_SUPPORTED)
        assert counter == self.NVML_AGGREGATE_ECC
        return int(ecc["corrected" if kind == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else "uncorrected"])

    def nvmlDeviceGetFieldValues(self, h: int, fields: list[tuple[int, int]]) -> list[Any]:
        kib = self.devices[h]["nvlink_kib"]
        if kib is None:
            raise self._err(self.NVML_ERROR_NOT_SUPPORTED)
        out = []
        for field_id, scope in fields:
            assert scope == 0xFFFFFFFF  # all links
            v = kib["tx" if field_id == self.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX else "rx"]
            out.append(SimpleNamespace(nvmlReturn=0, valueType=3, value=SimpleNamespace(ullVal=v)))
        return out

    def nvmlEventSetCreate(self) -> str:
        return "evset"

    def nvmlDeviceRegisterEvents(self, h: int, types: int, evset: str) -> None:
        assert types == self.nvmlEventTypeXidCriticalError and evset == "evset"

    def nvmlEventSetWait_v2(self, evset: str, timeout_ms: int) -> Any:
        try:
            index, xid = self.events.get(timeout=min(timeout_ms, 20) / 1000)
        except queue.Empty:
            raise self._err(self.NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(device=index, eventType=self.nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, evset: str) -> None:
        pass


def test_samples_recorded_values_in_base_units() -> None:
    nvml = FakeNVML(RECORDED)
    c = GpuCollector(nvml, node="gpu-node-1", min_interval_s=0.0).start()
    try:
        snap = c.sample()
    finally:
        c.close()
    assert (snap["up"], snap["reason"], snap["node"]) == (1, "ok", "gpu-node-1")
    d0, d1 = snap["devices"]
    assert d0["uuid"].startswith("GPU-5f3c") and d0["name"] == "NVIDIA H100 80GB HBM3"
    assert d0["utilization"] == pytest.approx(0.87)
    assert (d0["memory_used_bytes"], d0["memory_total_bytes"]) == (61203283968, 85520809984)
    assert d0["power_watts"] == pytest.approx(612.417)
    assert d0["temperature_celsius"] == 61.0
    assert d0["ecc_errors"] == {"corrected": 3, "uncorrected": 0}
    assert (d0["nvlink_tx_bytes"], d0["nvlink_rx_bytes"]) == (9437184 * 1024, 9961472 * 1024)
    # Device 1 has no ECC and no NVLink: the keys are absent, nothing failed.
    assert "ecc_errors" not in d1 and "nvlink_tx_bytes" not in d1 and c.errors == 0
    assert nvml.shut_down


def test_xid_events_are_counted_by_the_event_thread() -> None:
    nvml = FakeNVML(RECORDED)
    c = GpuCollector(nvml, node="n", event_wait_ms=20, min_interval_s=0.0).start()
    try:
        for index, xid in RECORDED["xid_events"]:
            nvml.events.put((index, xid))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not nvml.events.empty():
            time.sleep(0.01)
        time.sleep(0.05)
        d0, d1 = c.sample()["devices"]
    finally:
        c.close()
    assert d0["xid_errors"] == {"79": 2} and d1["xid_errors"] == {"48": 1}
    assert c._thread is not None and not c._thread.is_alive()


def test_recorded_values_become_per_gpu_series() -> None:
    c = GpuCollector(FakeNVML(RECORDED), node="gpu-node-1", xid_events=False, min_interval_s=0.0).start()
    c.record_xid(0, 79)
    m = RunMetrics(run_info=lambda: {"id": "r"}, gpu=GpuMetrics(c))

    def v(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"run_id": "r", "node": "gpu-node-1", **labels})

    assert v("milepost_gpu_collector_up", reason="ok") == 1
    assert v("milepost_gpu_devices") == 2
    assert v("milepost_gpu_utilization_ratio", gpu="1") == pytest.approx(0.12)
    assert v("milepost_gpu_memory_used_bytes", gpu="0") == 61203283968
    assert v("milepost_gpu_power_watts", gpu="0") == pytest.approx(612.417)
    assert v("milepost_gpu_temperature_celsius", gpu="1") == 38
    assert v("milepost_gpu_ecc_errors_total", gpu="0", type="corrected") == 3
    assert v("milepost_gpu_xid_errors_total", gpu="0", xid="79") == 1
    assert v("milepost_gpu_nvlink_transmit_bytes_total", gpu="0") == 9437184 * 1024
    assert v("milepost_gpu_ecc_errors_total", gpu="1", type="corrected") is None
    c.close()


def test_no_gpu_here_collector_is_down_with_a_reason_and_no_per_gpu_series() -> None:
    """The real nvidia-ml-py on this GPU-less machine: no driver library."""
    c = GpuCollector().start()
    snap = c.sample()
    assert snap["up"] == 0 and snap["devices"] == []
    assert snap["reason"] in ("library_not_found", "driver_not_loaded"), snap
    m = RunMetrics(run_info=lambda: {"id": "r"}, gpu=GpuMetrics(c))
    families = {f.name: f.samples for f in m.registry.collect() if f.name.startswith("milepost_gpu_")}
    (up,) = families.pop("milepost_gpu_collector_up")
    assert up.value == 0 and up.labels["reason"] == snap["reason"]
    (count,) = families.pop("milepost_gpu_devices")
    assert count.value == 0
    assert all(not samples for samples in families.values()), families  # no per-GPU series
    c.close()


@pytest.mark.parametrize(
    ("init_error", "reason"),
    [
        (FakeNVML.NVML_ERROR_LIBRARY_NOT_FOUND, "library_not_found"),
        (FakeNVML.NVML_ERROR_DRIVER_NOT_LOADED, "driver_not_loaded"),
        (FakeNVML.NVML_ERROR_NO_PERMISSION, "no_permission"),
        (999, "error"),
    ],
)
def test_init_failures_map_to_bounded_reasons(init_error: int, reason: str) -> None:
    c = GpuCollector(FakeNVML(RECORDED, init_error=init_error)).start()
    assert (c.up, c.reason) == (False, reason) and reason in REASONS
    assert c.sample()["devices"] == []


def test_no_devices_and_no_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    c = GpuCollector(FakeNVML({"devices": []})).start()
    assert (c.up, c.reason) == (False, "no_devices")

    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(gpu_mod, "_import_nvml", missing)
    assert GpuCollector().start().reason == "nvml_not_installed"


def test_rank_samples_ride_reports_one_source_per_node() -> None:
    """A rank's snapshot passes the ingest schema and becomes its node's series; a second
    rank on that node does not take over, and the daemon's own node is never from reports."""
    c = GpuCollector(FakeNVML(RECORDED), node="gpu-node-2", xid_events=False).start()
    snap = c.sample()
    local = GpuCollector(FakeNVML({"devices": []}), node="daemon-node").start()
    m = RunMetrics(run_info=lambda: {"id": "r"}, gpu=GpuMetrics(local))
    base = {"v": 1, "attempt": 0, "seq": 1, "ts": 1.0, "pid": 1, "host": "gpu-node-2", "step": 1}
    base |= {"phase": "train", "state": "running"}
    rep = Report(**base, role="trainer", rank=0, gpus=snap).model_dump()
    m.on_report(rep)
    other = {**snap, "devices": [{**snap["devices"][0], "temperature_celsius": 99.0}]}
    m.on_report(Report(**base, role="trainer", rank=1, gpus=other).model_dump())
    m.on_report(Report(**base, role="driver", rank=0, gpus={**snap, "node": "daemon-node"}).model_dump())

    def v(name: str, node: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"run_id": "r", "node": node, **labels})

    assert v("milepost_gpu_temperature_celsius", "gpu-node-2", gpu="0") == 61
    assert v("milepost_gpu_devices", "gpu-node-2") == 2
    assert v("milepost_gpu_collector_up", "daemon-node", reason="no_devices") == 0
    assert v("milepost_gpu_devices", "daemon-node") == 0
    c.close()


def test_rank_opt_in_puts_its_node_snapshot_in_every_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from milepost.engine.instrument import RankInstrument
    from milepost.engine.rank_telemetry import RANK_GPU_ENV, RankTelemetry
    from milepost.engine.reporter import Reporter

    monkeypatch.setenv(RANK_GPU_ENV, "1")
    monkeypatch.setenv("MILEPOST_TRACING", "0")
    reporter = Reporter("http://127.0.0.1:9", "t", RankInstrument("trainer", 0), attempt=0)  # never started
    tel = RankTelemetry(role="trainer", rank=0, attempt=0, daemon_url=None, token=None, reporter=reporter)
    try:
        reporter.report_now()
        rep = reporter._buf[-1]
        assert rep["gpus"]["up"] == 0 and rep["gpus"]["devices"] == []  # no GPU on this machine
        assert Report(**rep).gpus is not None
    finally:
        tel.close()
