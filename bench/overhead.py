"""Telemetry overhead benchmark: step time with all telemetry and detection on versus off.

    .venv/bin/python bench/overhead.py [--steps 30] [--repeats 3] [--warmup 3]

Runs the default job (examples/tiny-grpo-cpu.toml) for ``--steps`` steps several times,
alternating the two modes (on/off, off/on, ...) so drift hits both alike:

- on: under the real daemon (``milepost run``): rank reports, OpenTelemetry spans from
  the driver and every rank to the daemon's OTLP receiver, metrics, hang and straggler
  detection, the NVML collector, and a Prometheus-like scrape of /metrics (OpenMetrics)
  every ``--scrape-interval`` seconds (5) plus a trace-list read every other scrape;
- off: the engine alone (``milepost engine``): no daemon, no reporter, ``MILEPOST_TRACING=0``.
  The rank-side instrument (step/phase/collective bookkeeping) is part of the engine and
  runs in both modes.

The warm standby attempt is off in both modes (it is recovery machinery, see
bench/recovery.py). Step times come from each run's steps.jsonl, skipping ``--warmup``
steps and the final step (it always checkpoints). Progress goes to stderr; the last
stdout line is one JSON object with ``overhead_ratio`` = median step time on / off
(all runs pooled), per-pair ratios and the medians. Target: overhead_ratio <= 1.02.

Wall time on a shared machine moves with everything else running on it, so the JSON also
has ``cpu_overhead_ratio``: CPU seconds per step of every process of the run (the
daemon, the driver, the Ray workers and raylet of the attempt) on / off, sampled from
/proc, and the 1-minute load average around each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from milepost.engine.cluster import loopback_env

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_job(path: Path, job: dict[str, Any]) -> Path:
    lines = []
    for section, table in job.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def step_times(run_dir: Path, warmup: int, steps: int) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_s"] for r in recs if warmup < r["step"] < steps]


class CpuMeter:
    """CPU seconds of every process in the given sessions (and pids), sampled from /proc."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.sids: set[int] = set()
        self.pids: set[int] = set()
        self.samples: list[tuple[float, float]] = []
        self.by_kind: list[dict[str, float]] = []  # per sample: CPU seconds by kind of process
        self._seen: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._tck = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)

    def start(self) -> CpuMeter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int(stat.parent.name)
                    text = stat.read_text()
                    f = text.rsplit(")", 1)[1].split()
                    if int(f[3]) in self.sids or pid in self.pids:
                        self._seen[pid] = (int(f[11]) + int(f[12])) / self._tck
                        if pid not in self._kind:
                            comm = text[text.index("(") + 1 : text.rindex(")")]
                            self._kind[pid] = (
                                "daemon" if pid in self.pids else "driver" if pid in self.sids else comm
                            )
            kinds: dict[str, float] = {}
            for pid, c in self._seen.items():
                kinds[self._kind[pid]] = kinds.get(self._kind[pid], 0.0) + c
            self.by_kind.append(kinds)
            self.samples.append((time.time(), sum(self._seen.values())))

    def per_step(self, run_dir: Path, warmup: int, steps: int) -> float | None:
        """CPU seconds per step between the end of step ``warmup`` and the end of step ``steps - 1``."""
        ts = {r["step"]: r["ts"] for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}
        t0, t1 = ts.get(warmup), ts.get(steps - 1)
        if t0 is None or t1 is None or len(self.samples) < 2:
            return None

        def at(t: float) -> float:
            before = [c for s, c in self.samples if s <= t]
            return before[-1] if before else self.samples[0][1]

        return (at(t1) - at(t0)) / max(1, steps - 1 - warmup)

    def per_step_by_kind(self, run_dir: Path, warmup: int, steps: int) -> dict[str, float]:
        """Like ``per_step``, by kind of process (daemon, driver, ray::TrainerRank, raylet, ...)."""
        ts = {r["step"]: r["ts"] for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}
        t0, t1 = ts.get(warmup), ts.get(steps - 1)
        if t0 is None or t1 is None or len(self.samples) < 2:
            return {}

        def at(t: float) -> dict[str, float]:
            i = max([j for j, (s, _) in enumerate(self.samples) if s <= t], default=0)
            return self.by_kind[i]

        a, b = at(t0), at(t1)
        n = max(1, steps - 1 - warmup)
        return {k: (v - a.get(k, 0.0)) / n for k, v in b.items()}


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_off(job: Path, run_dir: Path, env: dict[str, str], timeout_s: float, meter: CpuMeter) -> None:
    cmd = [sys.executable, "-m", "milepost.engine.cli", "engine", str(job), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        env={**env, "MILEPOST_TRACING": "0"},
        stdout=subprocess.DEVNULL,
        stderr=(run_dir.parent / f"{run_dir.name}.log").open("wb"),
        start_new_session=True,
    )
    meter.sids.add(proc.pid)
    try:
        code = proc.wait(timeout=timeout_s)
    finally:
        _kill_group(proc.pid)
    if code != 0:
        raise SystemExit(f"engine run {run_dir} exited with {code}")


def _scrape(url: str, stop: threading.Event, counts: dict[str, int], interval_s: float) -> None:
    import httpx

    accept = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"}
    with httpx.Client(timeout=5) as client:
        n = 0
        while not stop.wait(interval_s):
            with contextlib.suppress(httpx.HTTPError):
                text = client.get(f"{url}/metrics", headers=accept).raise_for_status().text
                counts["scrapes"] += 1
                for line in text.splitlines():
                    if line.startswith("milepost_otlp_spans_received_total"):
                        counts["spans"] = int(float(line.split(" ")[1]))
                if n % 2 == 0:
                    client.get(f"{url}/api/v1/traces").raise_for_status()
            n += 1


def run_on(
    job: Path, run_dir: Path, env: dict[str, str], timeout_s: float, meter: CpuMeter, scrape_s: float
) -> dict[str, int]:
    from milepost.daemon.store import Store

    cmd = [sys.executable, "-m", "milepost.daemon.cli", "run", str(job), "--run-dir", str(run_dir)]
    subprocess.run(
        [*cmd, "--detach", "--exit-when-done"], check=True, env=env, timeout=120, capture_output=True
    )
    info = json.loads((run_dir / "daemon.json").read_text())
    meter.pids.add(int(info["pid"]))
    stop, counts = threading.Event(), {"scrapes": 0, "spans": 0}
    scraper = threading.Thread(target=_scrape, args=(info["url"], stop, counts, scrape_s), daemon=True)
    scraper.start()
    deadline = time.monotonic() + timeout_s
    try:
        # The run's state and attempts straight from its store: the bench's own reads must not
        # load the daemon whose cost it measures (and the daemon exits once the run is done).
        store = Store(run_dir)
        try:
            while time.monotonic() < deadline:
                meter.sids.update(a["pid"] for a in store.attempts())  # each attempt: a session of its own
                state = (store.run() or {}).get("state", "")
                if state in TERMINAL:
                    if state != "SUCCEEDED":
                        raise SystemExit(f"daemon run {run_dir} ended {state}")
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"daemon run {run_dir} did not finish in {timeout_s:.0f}s")
            counts["restarts"] = max(0, len(store.attempts()) - 1)
        finally:
            store.close()
        return counts
    finally:
        stop.set()
        scraper.join(timeout=5)
        with contextlib.suppress(Exception):
            for a in Store(run_dir).attempts():
                _kill_group(a["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(info["pid"]), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(REPO / "examples" / "tiny-grpo-cpu.toml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (one on, one off)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument(
        "--scrape-interval", type=float, default=5.0, help="seconds between /metrics scrapes (Prometheus: 15)"
    )
    args = ap.parse_args()

    env = {**os.environ, **loopback_env()}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # nothing leaves the machine
    tmp = Path(tempfile.mkdtemp(prefix="milepost-bench-overhead-"))
    job = tomllib.loads(Path(args.job).read_text())
    job["run"]["steps"] = args.steps
    job.setdefault("supervisor", {})["standby"] = False
    job_path = write_job(tmp / "job.toml", job)
    t0 = time.monotonic()
    times: dict[str, list[float]] = {"on": [], "off": []}
    medians: dict[str, list[float]] = {"on": [], "off": []}
    pair_ratios: list[float] = []
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    by_kind: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}
    load = [os.getloadavg()[0]]
    extra: dict[str, list[int]] = {"scrapes": [], "spans": [], "restarts": []}
    for i in range(args.repeats):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        pair: dict[str, float] = {}
        for mode in order:
            run_dir = tmp / f"{mode}-{i}"
            log(f"pair {i + 1}/{args.repeats}: {mode} ({args.steps} steps) in {run_dir}")
            started = time.monotonic()
            meter = CpuMeter().start()
            if mode == "on":
                counts = run_on(job_path, run_dir, env, args.timeout, meter, args.scrape_interval)
                extra["scrapes"].append(counts["scrapes"])
                extra["spans"].append(counts["spans"])
                extra["restarts"].append(counts["restarts"])
            else:
                run_off(job_path, run_dir, env, args.timeout, meter)
            meter.stop()
            if (c := meter.per_step(run_dir, args.warmup, args.steps)) is not None:
                cpu[mode].append(c)
            for k, v in meter.per_step_by_kind(run_dir, args.warmup, args.steps).items():
                by_kind[mode].setdefault(k, []).append(v)
            ts = step_times(run_dir, args.warmup, args.steps)
            times[mode] += ts
            medians[mode].append(statistics.median(ts))
            pair[mode] = medians[mode][-1]
            log(
                f"  {mode}: median step {pair[mode] * 1000:.0f} ms over {len(ts)} steps, "
                f"cpu {1000 * (cpu[mode] or [0.0])[-1]:.0f} ms/step ({time.monotonic() - started:.0f}s wall, "
                f"load {os.getloadavg()[0]:.1f})"
            )
            load.append(os.getloadavg()[0])
        pair_ratios.append(pair["on"] / pair["off"])
        log(f"  pair ratio on/off {pair_ratios[-1]:.3f}")
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    out = {
        "bench": "overhead",
        "overhead_ratio": round(on / off, 4),
        "pair_ratios": [round(r, 4) for r in pair_ratios],
        "step_s_median_on": round(on, 4),
        "step_s_median_off": round(off, 4),
        "cpu_overhead_ratio": round(statistics.median(cpu["on"]) / statistics.median(cpu["off"]), 4)
        if cpu["on"] and cpu["off"]
        else None,
        "cpu_s_per_step_on": [round(x, 4) for x in cpu["on"]],
        "cpu_s_per_step_off": [round(x, 4) for x in cpu["off"]],
        "cpu_ms_per_step_by_process": {
            mode: {
                k: round(1000 * statistics.median(v), 1) for k, v in sorted(kinds.items()) if max(v) > 5e-4
            }
            for mode, kinds in by_kind.items()
        },
        "step_s_mean_on": round(statistics.fmean(times["on"]), 4),
        "step_s_mean_off": round(statistics.fmean(times["off"]), 4),
        "run_medians_on": [round(x, 4) for x in medians["on"]],
        "run_medians_off": [round(x, 4) for x in medians["off"]],
        "steps_per_run": args.steps,
        "steps_measured": {"on": len(times["on"]), "off": len(times["off"])},
        "scrapes_per_on_run": extra["scrapes"],
        "spans_per_on_run": extra["spans"],
        "restarts_on": extra["restarts"],
        "scrape_interval_s": args.scrape_interval,
        "loadavg_1m": [round(x, 1) for x in load],
        "cpus": os.cpu_count(),
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
