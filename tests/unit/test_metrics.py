"""The daemon's Prometheus metrics: families, labels, exemplars, non-finite values, promtool, /metrics.

A fresh RunMetrics (its own registry) per test, fed the way the supervisor feeds it.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.bus import EventBus
from milepost.daemon.collective_metrics import busbw_factor, normalize_op
from milepost.daemon.metrics import RunMetrics
from milepost.daemon.store import Store
from milepost.daemon.telemetry_service import Telemetry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(60)

TRACE = "0af7651916cd43dd8448eb211c80319c"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def m(clock: Clock) -> RunMetrics:
    run = {"id": "run-1", "state": "RUNNING", "created_at": T0 - 100.0, "updated_at": T0}
    return RunMetrics(run_info=lambda: run, heartbeat_timeouts={"trainer": 20.0}, clock=clock)


def step(n: int, **kw: Any) -> dict[str, Any]:
    rec = {
        "step": n,
        "attempt": 0,
        "ts": T0 + n,
        "reward_mean": 0.25,
        "reward_std": 0.5,
        "loss": 0.1,
        "grad_norm": 1.5,
        "kl": 0.01,
        "clip_frac": 0.05,
        "lr": 1e-3,
        "weight_version": n,
        "rollout_tokens": 128,
        "prompt_tokens": 64,
        "rollout_samples": 16,
        "train_tokens": 128.0,
        "step_s": 2.0,
        "phases": {"rollout": 0.5, "reward": 0.01, "train": 1.0, "weight_sync": 0.2},
        "trace_id": TRACE,
    }
    rec.update(kw)
    return rec


def report(role: str = "trainer", rank: int = 0, attempt: int = 0, **kw: Any) -> dict[str, Any]:
    rep = {
        "v": 1,
        "attempt": attempt,
        "role": role,
        "rank": rank,
        "seq": 1,
        "ts": T0,
        "pid": 1,
        "host": "node-a",
        "step": 1,
        "phase": "train",
        "state": "running",
        "open_collectives": [],
        "timings": {"train": 1.0},
        "counters": {"reports_dropped": 0},
    }
    rep.update(kw)
    return rep


def value(m: RunMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"run_id": "run-1", **labels})


def feed_everything(m: RunMetrics) -> None:
    m.on_step(step(1, phases={"rollout": 0.5, "train": 1.0, "checkpoint": 0.3}))
    m.on_step(step(2, loss=float("nan")))
    coll = {"all_reduce|world": {"count": 4, "seconds": 0.4, "bytes": 4096, "world": 2, "p99_s": 0.2}}
    m.on_report(report(rank=0, collectives=coll, open_collectives=[{"op": "all_gather"}]))
    m.on_report(report(role="driver", timings={"step": 2.0, "rollout": 0.5}))
    m.on_report(report(role="rollout", host="node-b", gpus=recorded_gpu_snapshot("node-b")))
    bus = EventBus()  # as the supervisor publishes: the bus classifies restart reasons
    bus.subscribe(m)
    for ev in (
        {"kind": "attempt_failed", "data": {"cause": "actor_died"}},
        {"kind": "restart_scheduled", "severity": "warning"},
        {"kind": "checkpoint_committed", "ts": T0, "data": {"total_s": 1.25}},
        {"kind": "collective_hang", "severity": "critical"},
    ):
        bus.event(ev)
    m.set_straggler_score(1, 2.5)
    m.set_alerts({("CollectiveHang", "firing"): 1}, ["CollectiveHang", "RunFailed"])
    m.on_notification("webhook", "ok")


def recorded_gpu_snapshot(node: str) -> dict[str, Any]:
    return {
        "up": 1,
        "reason": "ok",
        "node": node,
        "devices": [
            {
                "index": 0,
                "uuid": "GPU-5f3c",
                "name": "NVIDIA H100 80GB HBM3",
                "utilization": 0.87,
                "memory_used_bytes": 61_203_283_968,
                "memory_total_bytes": 85_520_809_984,
                "power_watts": 612.4,
                "temperature_celsius": 61.0,
                "ecc_errors": {"corrected": 3, "uncorrected": 0},
                "xid_errors": {"79": 1},
                "nvlink_tx_bytes": 1_048_576,
                "nvlink_rx_bytes": 2_097_152,
            }
        ],
    }


# -- families and labels ------------------------------------------------------------
# The per-rank and per-step gauges: named alike in the registry and in the text format.
STEP_GAUGES = [
    "milepost_rank_step_duration_seconds",
    "milepost_reward_mean",
    "milepost_reward_std",
    "milepost_loss",
    "milepost_grad_norm",
    "milepost_kl_divergence",
    "milepost_learning_rate",
]
DESIGN_FAMILIES = [
    "milepost_steps",
    "milepost_global_step",
    "milepost_last_step_timestamp_seconds",
    "milepost_step_duration_seconds",
    "milepost_phase_duration_seconds",
    *STEP_GAUGES,
    "milepost_nonfinite_values",
    "milepost_rollout_samples",
    "milepost_rollout_tokens",
    "milepost_train_tokens",
    "milepost_collective_duration_seconds",
    "milepost_collective_bytes",
    "milepost_collective_busbw_bytes_per_second",
    "milepost_collectives_in_flight",
    "milepost_worker_up",
    "milepost_worker_heartbeat_timestamp_seconds",
    "milepost_hangs_detected",
    "milepost_straggler_score",
    "milepost_restarts",
    "milepost_productive_seconds",
    "milepost_wallclock_seconds",
    "milepost_checkpoint_duration_seconds",
    "milepost_last_checkpoint_timestamp_seconds",
    "milepost_gpu_utilization_ratio",
    "milepost_gpu_memory_used_bytes",
    "milepost_gpu_power_watts",
    "milepost_gpu_temperature_celsius",
    "milepost_gpu_ecc_errors",
    "milepost_gpu_xid_errors",
    "milepost_gpu_devices",  # DESIGN's milepost_gpu_count: promtool rejects _count on a gauge
    "milepost_gpu_collector_up",
    "milepost_alerts",
    "milepost_notifications",
]
ALLOWED_LABELS = {"run_id", "attempt", "role", "rank", "node", "gpu", "op", "group", "phase", "le"}
ALLOWED_LABELS |= {
    "component",
    "metric",
    "kind",
    "reason",
    "type",
    "xid",
    "alertname",
    "receiver",
    "status",
    "outcome",
}
ALLOWED_LABELS |= {"state", "severity", "uuid", "name"}


def test_every_design_family_has_series_with_run_id_and_bounded_labels(m: RunMetrics) -> None:
    feed_everything(m)
    families = {f.name: f for f in m.registry.collect()}
    for name in DESIGN_FAMILIES:
        assert name in families, f"{name} is not exported"
        assert families[name].samples, f"{name} has no series"
    for fam in families.values():
        for s in fam.samples:
            assert s.labels.get("run_id") == "run-1", s
            assert set(s.labels) <= ALLOWED_LABELS, f"{s.name}: label(s) {set(s.labels) - ALLOWED_LABELS}"
            assert "step" not in s.labels and math.isfinite(s.value), s


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_promtool_check_metrics_has_nothing_to_say(m: RunMetrics, tmp_path: Path) -> None:
    for fed in (False, True):
        if fed:
            feed_everything(m)
        out = subprocess.run(
            ["promtool", "check", "metrics"],
            input=generate_latest(m.registry),
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 0 and not out.stdout and not out.stderr, out


def test_openmetrics_carries_trace_ids_as_exemplars(m: RunMetrics) -> None:
    m.on_step(step(1))
    text = generate_openmetrics(m.registry).decode()
    exemplars: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):  # the strict OpenMetrics parser
        for s in fam.samples:
            if s.exemplar is not None:
                exemplars.setdefault(fam.name, set()).add(s.exemplar.labels["trace_id"])
    assert exemplars["milepost_step_duration_seconds"] == {TRACE}
    assert exemplars["milepost_phase_duration_seconds"] == {TRACE}
    m.on_step(step(2, trace_id="not-a-trace-id"))  # malformed ids are dropped, the sample kept
    assert value(m, "milepost_step_duration_seconds_count") == 2


def test_learning_gauges_never_nan_and_count_nonfinite(m: RunMetrics) -> None:
    assert value(m, "milepost_loss", component="total") is None  # no value before the first step
    m.on_step(step(1, loss=0.5))
    m.on_step(step(2, loss=float("nan"), grad_norm=float("inf")))
    assert value(m, "milepost_loss", component="total") == 0.5  # the last finite value stays
    assert value(m, "milepost_grad_norm") == 1.5
    assert value(m, "milepost_nonfinite_values_total", metric="loss") == 1
    assert value(m, "milepost_nonfinite_values_total", metric="grad_norm") == 1
    m.set_straggler_score(0, float("nan"))
    assert value(m, "milepost_straggler_score", role="trainer", rank="0") is None
    assert not [
        line for line in generate_latest(m.registry).decode().splitlines() if line.endswith(("NaN", "Inf"))
    ]


def test_progress_throughput_and_goodput_counters(m: RunMetrics, clock: Clock) -> None:
    m.seed([step(1), step(2)])
    m.on_step(step(3, phases={"train": 1.0, "checkpoint": 0.5}))
    m.on_step(step(3, attempt=1))  # redone after a restart: no new progress
    assert value(m, "milepost_steps_total") == 4
    assert value(m, "milepost_global_step") == 3
    assert value(m, "milepost_productive_seconds_total") == pytest.approx(2.0 + 2.0 + 1.5)
    assert value(m, "milepost_rollout_tokens_total", kind="response") == 2 * 128
    assert value(m, "milepost_rollout_samples_total") == 2 * 16
    assert value(m, "milepost_checkpoint_duration_seconds_sum", kind="stall") == 0.5
    assert value(m, "milepost_wallclock_seconds_total") == pytest.approx(100.0)
    clock.now += 10
    assert value(m, "milepost_wallclock_seconds_total") == pytest.approx(110.0)


def test_restart_reasons_name_the_cause(m: RunMetrics) -> None:
    sequences = {
        "actor_died": ["attempt_failed:actor_died", "attempt_ended", "restart_scheduled"],
        "heartbeat_lost": ["heartbeat_lost", "attempt_killed", "attempt_ended", "restart_scheduled"],
        "collective_hang": ["collective_hang", "attempt_killed", "attempt_ended", "restart_scheduled"],
        # A straggler event does not end the attempt: the actor error that follows does.
        "actor_error": ["straggler", "attempt_failed:actor_error", "attempt_ended", "restart_scheduled"],
        "other": ["attempt_ended", "restart_scheduled"],
    }
    bus = EventBus()
    bus.subscribe(m)
    for attempt, (reason, kinds) in enumerate(sequences.items()):
        bus.event({"kind": "attempt_launched", "attempt": attempt})
        for k in kinds:
            kind, _, cause = k.partition(":")
            bus.event({"kind": kind, "data": {"cause": cause} if cause else {}})
        assert value(m, "milepost_restarts_total", reason=reason) == 1, reason
    assert value(m, "milepost_hangs_detected_total") == 1
    assert value(m, "milepost_attempt") == len(sequences) - 1


def test_workers_up_heartbeat_and_attempt_change(m: RunMetrics, clock: Clock) -> None:
    m.on_report(report(rank=0, open_collectives=[{}, {}]))
    m.on_report(report(rank=1, state="exited"))
    labels = {"role": "trainer", "node": "node-a", "attempt": "0"}
    assert value(m, "milepost_worker_up", rank="0", **labels) == 1
    assert value(m, "milepost_worker_up", rank="1", **labels) == 0
    assert value(m, "milepost_collectives_in_flight", role="trainer", rank="0", attempt="0") == 2
    assert value(m, "milepost_rank_step_duration_seconds", role="trainer", rank="0", attempt="0") == 1.0
    clock.now += 21  # past the trainer heartbeat timeout
    assert value(m, "milepost_worker_up", rank="0", **labels) == 0
    m.set_straggler_score(0, 1.2)
    m.on_event({"kind": "attempt_launched", "attempt": 1})
    assert value(m, "milepost_worker_up", rank="0", **labels) is None  # the old attempt's ranks are gone
    assert value(m, "milepost_straggler_score", role="trainer", rank="0") is None
    m.on_report(report(rank=0, attempt=1))
    assert value(m, "milepost_worker_up", rank="0", **{**labels, "attempt": "1"}) == 1


def test_collectives_deltas_bandwidth_and_histogram(m: RunMetrics, clock: Clock) -> None:
    def coll(count: int, seconds: float, nbytes: int, **extra: Any) -> dict[str, Any]:
        return {"count": count, "seconds": seconds, "bytes": nbytes, "world": 4, **extra}

    m.on_report(report(rank=0, collectives={"all_reduce|dp": coll(10, 1.0, 1000)}))
    m.on_report(report(rank=1, collectives={"all_reduce|dp": coll(10, 1.0, 1000)}))
    m.on_report(report(rank=0, collectives={"all_reduce|dp": coll(30, 2.0, 5000)}))
    labels = {"op": "all_reduce", "group": "dp"}
    assert value(m, "milepost_collective_duration_seconds_count", **labels) == 10 + 10 + 20
    assert value(m, "milepost_collective_bytes_total", **labels) == 6000
    algbw = value(m, "milepost_collective_algbw_bytes_per_second", **labels)
    assert algbw == pytest.approx(6000 / 3.0)
    assert value(m, "milepost_collective_busbw_bytes_per_second", **labels) == pytest.approx(
        algbw * 2 * 3 / 4
    )
    # A new attempt starts its counters at zero: the run's totals keep growing.
    m.on_event({"kind": "attempt_launched", "attempt": 1})
    m.on_report(report(rank=0, attempt=1, collectives={"all_reduce|dp": coll(5, 0.5, 500)}))
    assert value(m, "milepost_collective_duration_seconds_count", **labels) == 45
    # Exact buckets when the rank sends them; otherwise each delta lands in its mean's bucket.
    hist = {repr(b): (2 if b >= 0.005 else 0) for b in (1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5)}
    hist.update({repr(b): 3 for b in (1.0, 5.0, 30.0)})
    m.on_report(report(rank=0, collectives={"all_gather|dp": coll(3, 1.0, 300, hist=hist)}))
    g = {"op": "all_gather", "group": "dp"}
    assert value(m, "milepost_collective_duration_seconds_bucket", le="0.001", **g) == 0
    assert value(m, "milepost_collective_duration_seconds_bucket", le="0.005", **g) == 2
    assert value(m, "milepost_collective_duration_seconds_bucket", le="1.0", **g) == 3
    # all_reduce deltas: 10 and 10 calls of mean 0.1 s, 20 of 0.05 s, then 5 of 0.1 s.
    assert value(m, "milepost_collective_duration_seconds_bucket", le="0.05", **labels) == 20
    assert value(m, "milepost_collective_duration_seconds_bucket", le="0.1", **labels) == 45


def test_nccl_tests_bus_bandwidth_factors() -> None:
    assert busbw_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    for op in (
        "all_gather",
        "reduce_scatter",
        "all_to_all",
        "gloo:all_gather_into_tensor",
        "_reduce_scatter_base",
    ):
        assert busbw_factor(op, 8) == pytest.approx(7 / 8), op
    assert busbw_factor("broadcast", 8) == busbw_factor("reduce", 8) == busbw_factor("send", 8) == 1.0
    assert busbw_factor("all_reduce", 1) == 0.0
    assert normalize_op("alltoall") == "all_to_all" and normalize_op("all_to_all_single") == "all_to_all"


def test_collective_keys_are_bounded(m: RunMetrics) -> None:
    many = {f"op{i}|g": {"count": 1, "seconds": 0.1, "bytes": 1, "world": 2} for i in range(200)}
    m.on_report(report(collectives=many))
    fam = next(f for f in m.registry.collect() if f.name == "milepost_collective_bytes")
    assert len(fam.samples) == 64 and m.collectives.dropped_keys == 200 - 64


# -- /metrics over HTTP --------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Telemetry]]:
    store = Store(tmp_path)
    store.ensure_run(run_id="run-1", name="t", job="j.toml", run_dir=str(tmp_path), target_steps=5)
    tel = Telemetry.for_daemon(
        run_info=store.run,
        steps=store.step_totals,
        heartbeat_timeouts={},
        env={"MILEPOST_GPU_COLLECTOR": "0"},
    )
    tel.metrics.on_step(step(1))
    app = create_app(store, FakeController(store), token="tok", require_token_for_reads=True, telemetry=tel)
    with serve(app) as url:
        yield url, tel
    store.close()


def test_metrics_endpoint_negotiates_openmetrics_and_needs_the_read_token(
    served: tuple[str, Telemetry],
) -> None:
    url, _ = served
    assert httpx.get(f"{url}/metrics").status_code == 401
    auth = {"Authorization": "Bearer tok"}
    text = httpx.get(f"{url}/metrics", headers=auth)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert "# {" not in text.text and 'milepost_steps_total{run_id="run-1"} 1.0' in text.text
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    om = httpx.get(f"{url}/metrics", headers={**auth, "Accept": accept})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{TRACE}"}}' in om.text and om.text.endswith("# EOF\n")


def test_heartbeat_timestamp_is_the_daemons_receive_time_not_the_ranks_clock(m: RunMetrics) -> None:
    m.on_report(report(rank=1, ts=T0 - 50.0))  # the node's clock is 50 s behind; it arrived at T0
    labels = {"role": "trainer", "rank": "1", "node": "node-a", "attempt": "0"}
    assert value(m, "milepost_worker_heartbeat_timestamp_seconds", **labels) == T0
    assert value(m, "milepost_worker_up", **labels) == 1.0
