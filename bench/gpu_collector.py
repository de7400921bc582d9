"""The NVML collector on this node, for real: what the daemon would export for its GPUs.

    .venv/bin/python bench/gpu_collector.py [--seconds 10] [--load]

Starts the collector the daemon runs (``milepost.engine.gpu.GpuCollector``: NVML sampling and
the XID event thread), samples it for ``--seconds`` while ``--load`` keeps every GPU busy with
matmuls (torch, when CUDA is there), renders the GPU families through the daemon's registry
and checks them: ``promtool check metrics`` has nothing to say, and where ``nvidia-smi`` is
installed the device count, UUIDs and memory totals agree with it and memory in use, power
and temperature lie near its readings. Progress goes to stderr; the last line on stdout is
one JSON object.

Without a GPU the collector is down: the JSON says ``"up": 0`` with the reason and the
exposition holds ``milepost_gpu_collector_up 0`` and no per-GPU series; that is a pass.
Exit 1 when a check fails, or when torch sees CUDA devices that the collector does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from milepost.daemon.gpu_metrics import GpuMetrics
from milepost.engine.gpu import GpuCollector
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

SMI_FIELDS = "index,uuid,memory.total,memory.used,power.draw,temperature.gpu,utilization.gpu"
MIB = 1024 * 1024


def _log(msg: str) -> None:
    print(f"[gpu_collector] {msg}", file=sys.stderr, flush=True)


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _load(stop: threading.Event, n: int) -> None:
    """Keeps every GPU busy (bf16 matmuls) until ``stop`` is set."""
    import torch

    xs = [torch.randn(8192, 8192, device=f"cuda:{i}", dtype=torch.bfloat16) for i in range(n)]
    while not stop.is_set():
        for x in xs:
            for _ in range(8):
                x @ x  # noqa: B018 -- the work is the point
        for i in range(n):
            torch.cuda.synchronize(i)


def _smi() -> list[dict[str, str]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        _log(f"nvidia-smi failed: {out.stderr.strip()}")
        return None
    keys = SMI_FIELDS.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.stdout.splitlines()
    ]


def _float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def compare_with_smi(devices: list[dict[str, Any]], smi: list[dict[str, str]]) -> list[str]:
    """What disagrees between the collector's sample and nvidia-smi's, taken moments apart."""
    problems = []
    if len(devices) != len(smi):
        return [f"device count: collector {len(devices)}, nvidia-smi {len(smi)}"]
    for d, s in zip(devices, smi, strict=True):
        i = d.get("index")
        if d.get("uuid") != s["uuid"]:
            problems.append(f"gpu {i} uuid: collector {d.get('uuid')}, nvidia-smi {s['uuid']}")
        total = _float(s["memory.total"])
        if total is not None and abs(d.get("memory_total_bytes", 0) / MIB - total) > 1:
            problems.append(f"gpu {i} memory total: {d.get('memory_total_bytes')} B vs {total} MiB")
        used = _float(s["memory.used"])  # the load may allocate between the two readings
        if used is not None and abs(d.get("memory_used_bytes", 0) / MIB - used) > max(2048, 0.1 * used):
            problems.append(f"gpu {i} memory used: {d.get('memory_used_bytes')} B vs {used} MiB")
        temp = _float(s["temperature.gpu"])
        if temp is not None and abs(d.get("temperature_celsius", -100) - temp) > 10:
            problems.append(f"gpu {i} temperature: {d.get('temperature_celsius')} vs {temp} C")
        power = _float(s["power.draw"])
        if power is not None and "power_watts" not in d:
            problems.append(f"gpu {i}: nvidia-smi reads {power} W, the collector no power")
    return problems


def promtool_check(text: bytes) -> str:
    if shutil.which("promtool") is None:
        return "skipped: promtool missing (apt-get install prometheus)"
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    said = (out.stdout + out.stderr).decode().strip()
    return "ok" if out.returncode == 0 and not said else f"failed: {said}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to sample")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--load", action="store_true", help="keep every GPU busy while sampling (torch)")
    ap.add_argument("--print-metrics", action="store_true", help="print the exposition to stderr")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0:
        ap.error(f"--seconds and --interval must be > 0 (got {args.seconds}, {args.interval})")

    cuda = _cuda_devices()
    collector = GpuCollector(min_interval_s=0.0).start()
    _log(f"collector up={int(collector.up)} reason={collector.reason} torch sees {cuda} CUDA device(s)")
    stop = threading.Event()
    loader = None
    if args.load and cuda and collector.up:
        loader = threading.Thread(target=_load, args=(stop, cuda), daemon=True)
        loader.start()
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        while True:
            samples.append(collector.sample())
            if time.monotonic() - t0 >= args.seconds:
                break
            time.sleep(args.interval)
        smi = _smi() if collector.up else None
        last = samples[-1]
        registry = CollectorRegistry(auto_describe=True)
        registry.register(GpuMetrics(local=collector))
        text = generate_latest(registry)
        if args.print_metrics:
            sys.stderr.write(generate_openmetrics(registry).decode())
    finally:
        stop.set()
        if loader is not None:
            loader.join(timeout=30)
        xid_thread = collector.events_running
        collector.close()

    devices = last["devices"]
    smi_problems = compare_with_smi(devices, smi) if smi is not None else []
    problems = list(smi_problems)
    promtool = promtool_check(text)
    if not promtool.startswith(("ok", "skipped")):
        problems.append(f"promtool: {promtool}")
    if cuda and not any(s["up"] for s in samples):
        problems.append(f"torch sees {cuda} CUDA device(s), the collector is down: {last['reason']}")
    exposition = text.decode()
    if not last["up"] and "milepost_gpu_collector_up{" not in exposition:
        problems.append("the exposition lacks milepost_gpu_collector_up")
    if not last["up"] and "milepost_gpu_power_watts{" in exposition:
        problems.append("a down collector exported per-GPU series")

    def series(key: str) -> list[float]:
        return [float(d[key]) for s in samples for d in s["devices"] if key in d]

    util = series("utilization")
    power = series("power_watts")
    result = {
        "bench": "gpu_collector",
        "node": last["node"],
        "up": last["up"],
        "reason": last["reason"],
        "cuda_devices": cuda,
        "devices": len(devices),
        "names": sorted({str(d.get("name", "")) for d in devices}),
        "samples": len(samples),
        "nvml_errors": collector.errors,
        "load": loader is not None,
        "utilization_max": max(util) if util else None,
        "power_watts_max": max(power) if power else None,
        "temperature_celsius": [d.get("temperature_celsius") for d in devices],
        "memory_used_bytes": [d.get("memory_used_bytes") for d in devices],
        "ecc": any("ecc_errors" in d for d in devices),
        "nvlink": any("nvlink_tx_bytes" in d for d in devices),
        "xid_thread": xid_thread,
        "xid_errors": {str(d["index"]): d.get("xid_errors", {}) for d in devices},
        "nvidia_smi": "absent" if smi is None else ("agrees" if not smi_problems else "disagrees"),
        "promtool": promtool,
        "problems": problems,
        "ok": not problems,
    }
    print(json.dumps(result), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
