"""GPU metric families: the daemon's own NVML collector plus the samples ranks send for their nodes.

One source per node: the daemon's collector for its own node; for another node the
first rank that sent a ``gpus`` sample keeps it while it stays fresh (two ranks of one
node see the same GPUs, and alternating between their XID counts would look like
counter resets). A node whose collector is down exports only
``milepost_gpu_collector_up 0`` with the reason, and ``milepost_gpu_devices 0``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from milepost.engine.gpu import REASONS
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .report_section import ReportSection

STALE_S = 60.0
MAX_NODES = 1024
MAX_GPUS_PER_NODE = 64

_GAUGES = (
    (
        "utilization",
        "milepost_gpu_utilization_ratio",
        "GPU utilization (0..1) over the last NVML sample period",
    ),
    ("memory_used_bytes", "milepost_gpu_memory_used_bytes", "GPU memory in use"),
    ("memory_total_bytes", "milepost_gpu_memory_total_bytes", "GPU memory in total"),
    ("power_watts", "milepost_gpu_power_watts", "GPU power draw"),
    ("temperature_celsius", "milepost_gpu_temperature_celsius", "GPU core temperature"),
)


class GpuMetrics(ReportSection):
    section = "gpus"

    def __init__(self, local: Any = None) -> None:
        """``local``: the daemon's own collector (anything with ``sample()``), or None."""
        super().__init__()
        self.local = local
        self._remote: dict[str, tuple[tuple[str, int], float, dict[str, Any]]] = {}

    def _take(self, rep: dict[str, Any], snap: dict[str, Any], now: float) -> None:
        node = str(snap.get("node") or rep.get("host") or "")
        if not node or (self.local is not None and node == getattr(self.local, "node", None)):
            return
        who = (str(rep.get("role", "")), int(rep.get("rank", 0)))
        with self._lock:
            held = self._remote.get(node)
            if held is not None and held[0] != who and now - held[1] < STALE_S:
                return
            if held is None and len(self._remote) >= MAX_NODES:
                return
            self._remote[node] = (who, now, snap)

    def _snapshots(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        if self.local is not None:
            out.append(self.local.sample())
        with self._lock:
            for node, (_, seen, snap) in sorted(self._remote.items()):
                if now - seen < STALE_S:
                    out.append({**snap, "node": node})
        return out

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "milepost_gpu_collector_up",
            "1 when the node's NVML collector works; 0 with the reason when it cannot (no driver, no GPU)",
            labels=["node", "reason"],
        )
        # Not milepost_gpu_count: promtool rejects a _count suffix outside histograms and summaries.
        count = GaugeMetricFamily("milepost_gpu_devices", "GPUs NVML sees on the node", labels=["node"])
        info = GaugeMetricFamily(
            "milepost_gpu_info", "Always 1: the GPU's UUID and model", labels=["node", "gpu", "uuid", "name"]
        )
        gauges = {key: GaugeMetricFamily(name, doc, labels=["node", "gpu"]) for key, name, doc in _GAUGES}
        ecc = CounterMetricFamily(
            "milepost_gpu_ecc_errors",
            "ECC memory errors (aggregate NVML counters)",
            labels=["node", "gpu", "type"],
        )
        xid = CounterMetricFamily(
            "milepost_gpu_xid_errors",
            "XID critical error events seen by the collector",
            labels=["node", "gpu", "xid"],
        )
        nv_tx = CounterMetricFamily(
            "milepost_gpu_nvlink_transmit_bytes", "NVLink data bytes sent, all links", labels=["node", "gpu"]
        )
        nv_rx = CounterMetricFamily(
            "milepost_gpu_nvlink_receive_bytes",
            "NVLink data bytes received, all links",
            labels=["node", "gpu"],
        )
        for snap in self._snapshots():
            node = str(snap.get("node", ""))
            ok = bool(snap.get("up"))
            reason = str(snap.get("reason", "error"))
            up.add_metric([node, reason if reason in REASONS else "error"], 1.0 if ok else 0.0)
            devices = (snap.get("devices") or []) if ok else []
            devices = [d for d in devices if isinstance(d, dict)][:MAX_GPUS_PER_NODE]
            count.add_metric([node], float(len(devices)))
            for d in devices:
                gpu = str(int(d.get("index", 0)))
                info.add_metric([node, gpu, str(d.get("uuid", ""))[:64], str(d.get("name", ""))[:64]], 1.0)
                for key, _, _ in _GAUGES:
                    if _num(d.get(key)) is not None:
                        gauges[key].add_metric([node, gpu], float(d[key]))
                for kind, n in (d.get("ecc_errors") or {}).items():
                    if kind in ("corrected", "uncorrected") and _num(n) is not None:
                        ecc.add_metric([node, gpu, kind], float(n))
                for code, n in list((d.get("xid_errors") or {}).items())[:256]:
                    if str(code).isdigit() and _num(n) is not None:
                        xid.add_metric([node, gpu, str(code)], float(n))
                if _num(d.get("nvlink_tx_bytes")) is not None:
                    nv_tx.add_metric([node, gpu], float(d["nvlink_tx_bytes"]))
                if _num(d.get("nvlink_rx_bytes")) is not None:
                    nv_rx.add_metric([node, gpu], float(d["nvlink_rx_bytes"]))
        yield from (up, count, info, *gauges.values(), ecc, xid, nv_tx, nv_rx)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if v == v and abs(v) != float("inf") else None
