"""Every alert rule fires on synthetic inputs and resolves again, with a fake clock."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from milepost.alerts import catalog, rules
from milepost.alerts.model import Condition
from milepost.engine.contract.config.alerts import AlertsConfig, RulesConfig

CFG = AlertsConfig(
    rules=RulesConfig(
        restart_loop_count=3,
        restart_loop_window_s=600,
        no_progress_s=100,
        checkpoint_interval_s=100,
        checkpoint_stale_factor=2,
        checkpoint_stale_min_s=10,
        worker_down_s=30,
        loss_spike_window=10,
        reward_window=5,
        throughput_window=5,
        event_hold_s=300,
        gpu_error_hold_s=300,
        disk_free_bytes=1000,
        disk_free_ratio=0.1,
    )
)
KEEP = rules.steps_to_keep(CFG.rules)


def ev(
    kind: str,
    ts: float,
    severity: str = "info",
    attempt: int = 1,
    role: str | None = None,
    rank: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    return {
        "id": int(ts * 10),
        "ts": ts,
        "kind": kind,
        "severity": severity,
        "message": f"{kind} happened",
        "attempt": attempt,
        "role": role,
        "rank": rank,
        "step": None,
        "data": data,
    }


def names(obs: rules.Observations, now: float) -> dict[str, Condition]:
    return {c.alertname: c for c in rules.evaluate(obs, now, CFG)}


def running(ts: float = 0.0, attempt: int = 1) -> rules.Observations:
    obs = rules.Observations(run="r1")
    rules.observe_event(obs, ev("daemon_started", ts))
    rules.observe_event(obs, ev("attempt_started", ts, attempt=attempt))
    rules.observe_event(obs, ev("checkpoint_committed", ts, attempt=attempt))
    return obs


def step(obs: rules.Observations, i: int, ts: float, **kw: float) -> None:
    rec = {
        "step": i,
        "ts": ts,
        "attempt": obs.attempt,
        "reward_mean": 1.0,
        "reward_std": 0.5,
        "loss": 1.0,
        "grad_norm": 1.0,
        "kl": 0.0,
        "step_s": 1.0,
        "rollout_tokens": 1000,
        "train_tokens": 1000.0,
    }
    rec.update(kw)
    rules.observe_step(obs, rec, KEEP)


def test_quiet_run_has_no_conditions() -> None:
    obs = running()
    for i in range(30):
        step(obs, i, float(i))
    assert names(obs, 30.0) == {}


def test_collective_hang_fires_with_evidence_and_resolves_on_next_attempt() -> None:
    obs = running()
    rules.observe_event(
        obs,
        ev(
            "collective_hang",
            10,
            "critical",
            diagnosis="desync",
            culprit_ranks=[["trainer", 1]],
            group="default_pg",
            seq=42,
            op="all_reduce",
            diagnosis_id=3,
            detection_s=12.5,
        ),
    )
    c = names(obs, 11)["CollectiveHang"]
    assert c.severity == "critical"
    assert c.labels == {"run": "r1", "attempt": "1", "group": "default_pg", "op": "all_reduce"}
    assert "trainer 1" in c.evidence and "diagnostics/diagnosis_3/" in c.evidence and "seq 42" in c.evidence
    assert c.action and c.view == "incidents"
    rules.observe_event(obs, ev("attempt_started", 20, attempt=2))
    assert "CollectiveHang" not in names(obs, 21)


def test_straggler_holds_then_resolves() -> None:
    obs = running()
    rules.observe_event(obs, ev("straggler", 10, "warning", role="trainer", rank=3, relative_score=1.8))
    c = names(obs, 11)["Straggler"]
    assert c.labels["rank"] == "3" and c.labels["role"] == "trainer" and "1.8" in c.evidence
    assert "Straggler" in names(obs, 10 + 299)
    assert "Straggler" not in names(obs, 10 + 300)


def test_heartbeat_lost_and_worker_down() -> None:
    obs = running()
    rules.observe_report(
        obs, {"role": "trainer", "rank": 1, "attempt": 1, "ts": 5.0, "state": "running", "host": "h"}
    )
    rules.observe_event(obs, ev("heartbeat_lost", 40, "error", role="trainer", rank=1, pid=9, phase="train"))
    got = names(obs, 40)
    assert got["HeartbeatLost"].labels == {"run": "r1", "attempt": "1", "role": "trainer", "rank": "1"}
    assert got["WorkerDown"].labels["rank"] == "1"  # 35 s > worker_down_s 30
    rules.observe_report(
        obs, {"role": "trainer", "rank": 1, "attempt": 1, "ts": 41.0, "state": "running", "host": "h"}
    )
    assert "WorkerDown" not in names(obs, 42)
    rules.observe_report(
        obs, {"role": "rollout", "rank": 0, "attempt": 1, "ts": 42.0, "state": "failed", "host": "h"}
    )
    assert names(obs, 43)["WorkerDown"].labels["role"] == "rollout"
    rules.observe_event(obs, ev("attempt_started", 50, attempt=2))
    assert {"HeartbeatLost", "WorkerDown"}.isdisjoint(names(obs, 51))


def test_attempt_failed_and_run_failed() -> None:
    obs = running()
    rules.observe_event(obs, ev("attempt_ended", 10, "info"))
    assert "AttemptFailed" not in names(obs, 11)  # a clean end
    rules.observe_event(obs, ev("attempt_started", 12, attempt=2))
    rules.observe_event(obs, ev("attempt_ended", 20, "error", attempt=2))
    assert names(obs, 21)["AttemptFailed"].labels["attempt"] == "2"
    rules.observe_event(obs, ev("attempt_started", 22, attempt=3))
    assert "AttemptFailed" not in names(obs, 23)
    rules.observe_event(obs, ev("run_failed", 30, "critical", attempt=3))
    assert names(obs, 31)["RunFailed"].severity == "critical"
    rules.observe_event(obs, ev("attempt_started", 40, attempt=4))  # resumed
    assert "RunFailed" not in names(obs, 41)


def test_restart_loop_counts_restarts_in_window() -> None:
    obs = running()
    for t in (10, 20, 30):
        rules.observe_event(obs, ev("restart_scheduled", t, "warning"))
    assert "RestartLoop" in names(obs, 31)
    assert "RestartLoop" not in names(obs, 611)  # the first left the 600 s window
    rules.prune(obs, 611, CFG)
    assert len(obs.restarts) == 2


def test_resume_mismatch_resolves_on_commit() -> None:
    obs = running()
    rules.observe_event(obs, ev("resume_verification_failed", 5, "error", step=4))
    assert "ResumeMismatch" in names(obs, 6)
    rules.observe_event(obs, ev("checkpoint_committed", 7))
    assert "ResumeMismatch" not in names(obs, 8)


def test_no_progress_from_clock_and_from_event() -> None:
    obs = running()
    step(obs, 0, 10)
    assert "NoProgress" not in names(obs, 109)
    assert "NoProgress" in names(obs, 111)
    step(obs, 1, 112)
    assert "NoProgress" not in names(obs, 113)
    rules.observe_event(obs, ev("progress_stalled", 114, "error", waited_s=60))
    assert "NoProgress" in names(obs, 115)
    step(obs, 2, 116)
    assert "NoProgress" not in names(obs, 117)
    rules.observe_event(obs, ev("control_pause", 120))
    assert names(obs, 1000) == {}  # paused: neither stalled nor stale
    rules.observe_event(obs, ev("control_resume", 1000))
    assert "NoProgress" not in names(obs, 1050) and "NoProgress" in names(obs, 1101)
    rules.observe_event(obs, ev("run_succeeded", 1102))
    assert names(obs, 10_000) == {}  # a finished run is not stalled


def test_non_finite_loss_and_recovery() -> None:
    obs = running()
    step(obs, 0, 1, loss=math.nan)
    c = names(obs, 2)["NonFiniteLoss"]
    assert "loss=nan" in c.summary and c.severity == "critical"
    step(obs, 1, 2, grad_norm=math.inf)
    assert "grad_norm=inf" in names(obs, 3)["NonFiniteLoss"].summary
    step(obs, 2, 3)
    assert "NonFiniteLoss" not in names(obs, 4)


def test_loss_spike() -> None:
    obs = running()
    for i in range(10):
        step(obs, i, float(i), loss=1.0 + 0.01 * (i % 3))
    assert "LossSpike" not in names(obs, 10)
    step(obs, 10, 10, loss=5.0)
    assert "LossSpike" in names(obs, 11)
    step(obs, 11, 11, loss=1.01)
    assert "LossSpike" not in names(obs, 12)


def test_reward_collapse_by_std_and_by_mean() -> None:
    obs = running()
    for i in range(5):
        step(obs, i, float(i), reward_std=0.0)
    assert "reward_std" in names(obs, 5)["RewardCollapse"].summary
    step(obs, 5, 5, reward_std=0.3)
    assert "RewardCollapse" not in names(obs, 6)
    obs = running()
    for i in range(5):
        step(obs, i, float(i), reward_mean=1.0)
    for i in range(5, 10):
        step(obs, i, float(i), reward_mean=0.2)
    assert "mean reward fell" in names(obs, 10)["RewardCollapse"].summary
    for i in range(10, 15):
        step(obs, i, float(i), reward_mean=0.2)
    assert "RewardCollapse" not in names(obs, 15)  # the new level is the baseline now


def test_throughput_drop_has_a_for() -> None:
    obs = running()
    for i in range(5):
        step(obs, i, float(i), step_s=1.0)
    for i in range(5, 10):
        step(obs, i, float(i), step_s=4.0)
    c = names(obs, 10)["ThroughputDrop"]
    assert c.for_s == 300 and "tokens/s" in c.summary
    for i in range(10, 20):
        step(obs, i, float(i), step_s=1.0)
    assert "ThroughputDrop" not in names(obs, 20)


def test_checkpoint_failed_and_stale() -> None:
    obs = running()
    rules.observe_event(obs, ev("checkpoint_failed", 10, "warning", step=5))
    assert "CheckpointFailed" in names(obs, 11)
    step(obs, 0, 190)
    assert "CheckpointStale" not in names(obs, 199)
    assert "CheckpointStale" in names(obs, 201)  # 2 x 100 s since the commit at 0
    rules.observe_event(obs, ev("checkpoint_committed", 202))
    got = names(obs, 203)
    assert "CheckpointStale" not in got and "CheckpointFailed" not in got
    for t in (212, 222, 232):  # commits every 10 s: the observed interval replaces the configured 100 s
        rules.observe_event(obs, ev("checkpoint_committed", t))
        step(obs, int(t), t)
    assert "CheckpointStale" not in names(obs, 251)
    assert "interval 10 s" in names(obs, 253)["CheckpointStale"].summary


def test_disk_low() -> None:
    obs = running()
    rules.observe_disk(obs, "/runs/r1", free_bytes=50, total_bytes=10_000)
    c = names(obs, 1)["DiskLow"]
    assert "/runs/r1" in c.summary and c.for_s == 300
    rules.observe_disk(obs, "/runs/r1", free_bytes=5000, total_bytes=10_000)
    assert "DiskLow" not in names(obs, 2)


def gpu_report(
    ts: float, temp: float = 60.0, xid: dict[str, int] | None = None, ecc: dict[str, int] | None = None
) -> dict[str, Any]:
    dev = {
        "index": 0,
        "uuid": "GPU-1",
        "name": "H200",
        "temperature_celsius": temp,
        "xid_errors": xid or {},
        "ecc_errors": ecc or {"corrected": 0, "uncorrected": 0},
    }
    return {
        "role": "trainer",
        "rank": 0,
        "attempt": 1,
        "ts": ts,
        "state": "running",
        "host": "n1",
        "gpus": {"up": 1, "reason": "", "node": "n1", "devices": [dev]},
    }


def test_gpu_overheat_xid_ecc() -> None:
    obs = running()
    rules.observe_report(obs, gpu_report(1, xid={"13": 2}))  # old errors: the baseline, not news
    assert names(obs, 1) == {}
    rules.observe_report(
        obs, gpu_report(2, temp=95, xid={"13": 2, "79": 1}, ecc={"corrected": 5, "uncorrected": 1})
    )
    got = names(obs, 3)
    assert got["GpuOverheat"].labels == {"run": "r1", "node": "n1", "gpu": "0"}
    assert "79" in got["GpuXid"].summary and "13" not in got["GpuXid"].summary
    assert "GpuEccUncorrected" in got
    rules.observe_report(
        obs, gpu_report(10, temp=70, xid={"13": 2, "79": 1}, ecc={"corrected": 5, "uncorrected": 1})
    )
    got = names(obs, 11)
    assert "GpuOverheat" not in got and "GpuXid" in got  # held for gpu_error_hold_s
    assert {"GpuXid", "GpuEccUncorrected"}.isdisjoint(names(obs, 2 + 300))


def test_daemon_restarted() -> None:
    obs = running()
    assert "DaemonRestarted" not in names(obs, 1)
    rules.observe_event(obs, ev("daemon_reattached", 5, "warning"))
    assert "DaemonRestarted" in names(obs, 6)
    assert "DaemonRestarted" not in names(obs, 5 + 300)
    obs2 = rules.Observations.model_validate(running().model_dump(mode="json"))  # restored after a restart
    rules.observe_event(obs2, ev("daemon_started", 50))
    assert "DaemonRestarted" in names(obs2, 51)


def test_disabled_rules_and_serialisation_round_trip() -> None:
    obs = running()
    rules.observe_event(obs, ev("run_failed", 3, "critical"))
    step(obs, 0, 1, loss=math.nan)
    cfg = AlertsConfig(disabled_rules=("NonFiniteLoss",))
    got = {c.alertname for c in rules.evaluate(obs, 4, cfg)}
    assert got == {"RunFailed"}
    back = rules.Observations.model_validate_json(obs.model_dump_json())
    assert rules.evaluate(back, 4, CFG) == rules.evaluate(obs, 4, CFG)
    via_store = json.loads(json.dumps(json.loads(obs.model_dump_json()), allow_nan=False))
    assert math.isnan(rules.Observations.model_validate(via_store).steps[-1]["loss"])


@pytest.mark.parametrize("name", catalog.ALERTNAMES)
def test_every_alert_has_an_action_a_view_and_a_catalogue_row(name: str) -> None:
    c = catalog.condition(name, {"run": "r"}, "s")
    assert c.action and c.view and name in (catalog.__doc__ or "")


def test_every_latch_names_a_catalogue_alert() -> None:
    assert {s.alertname for s in rules.LATCHES.values()} <= set(catalog.ALERTNAMES)


def test_todays_spellings_are_understood() -> None:
    assert (
        rules.wire_kind("CollectiveHang") == "collective_hang" and rules.wire_kind("Straggler") == "straggler"
    )
    obs = rules.Observations(run="r1")
    rules.observe_event(obs, ev("attempt_launched", 0, attempt=1))
    rules.observe_event(obs, ev("CollectiveHang", 1, "critical", group="pg", op="broadcast"))
    assert names(obs, 2)["CollectiveHang"].labels["op"] == "broadcast"
