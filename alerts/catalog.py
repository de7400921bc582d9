"""The alert catalogue: every built-in alert's severity, `for`, dashboard view and what to do.

| alert | severity | for | made by |
|---|---|---|---|
| CollectiveHang | critical | 0 | `collective_hang` event, until the next attempt |
| RunFailed | critical | 0 | `run_failed`, until a resumed attempt starts |
| RestartLoop | critical | 0 | n `restart_scheduled` in m minutes |
| NonFiniteLoss | critical | 0 | the newest step's loss / grad_norm / reward is NaN or Inf |
| GpuEccUncorrected | critical | 0 | a rank report's GPU snapshot: new uncorrected ECC errors |
| AttemptFailed | error | 0 | `attempt_ended` with severity error |
| HeartbeatLost | error | 0 | `heartbeat_lost` |
| WorkerDown | error | 0 | a rank's reports: state failed/dead, or silent for worker_down_s |
| NoProgress | error | 0 | no step for no_progress_s, or `progress_stalled` |
| ResumeMismatch | error | 0 | `resume_verification_failed`, until a commit |
| GpuXid | error | 0 | new XID errors in a GPU snapshot |
| Straggler | warning | 0 | `straggler` (the detector already demands a streak) |
| CheckpointFailed | warning | 0 | `checkpoint_failed`, until `checkpoint_committed` |
| CheckpointStale | warning | 0 | no commit for factor x interval |
| LossSpike, RewardCollapse | warning | 0 | windows of step records |
| ThroughputDrop | warning | 5 min | tokens/s window below a ratio of the one before |
| DiskLow | warning | 5 min | free bytes / ratio of the run dir's filesystem |
| GpuOverheat | warning | 2 min | GPU temperature at or above the limit |
| DaemonRestarted | warning | 0 | `daemon_reattached`, or a second `daemon_started` of the run |
"""

from __future__ import annotations

from dataclasses import dataclass

from milepost.alerts.model import Condition
from milepost.engine.contract.enums import Severity

C, E, W = Severity.CRITICAL, Severity.ERROR, Severity.WARNING


@dataclass(frozen=True)
class RuleInfo:
    severity: Severity
    view: str  # the dashboard page that shows the evidence
    action: str
    for_s: float = 0.0


CATALOG: dict[str, RuleInfo] = {
    "CollectiveHang": RuleInfo(C, "incidents", "Open the incident; read the culprit's stack dump; the supervisor restarts from the last checkpoint."),
    "RunFailed": RuleInfo(C, "events", "Read the failure reason; fix the cause and resume with `milepost run --resume`."),
    "RestartLoop": RuleInfo(C, "events", "The run restarts over and over: a persistent fault (bad node, bad checkpoint, code bug); stop and inspect."),
    "NonFiniteLoss": RuleInfo(C, "learning_health", "The loss or gradients are NaN/Inf: lower the learning rate, check the data and the reward; resume from a checkpoint."),
    "GpuEccUncorrected": RuleInfo(C, "ranks", "Uncorrected ECC errors: drain the node and reset or replace the GPU."),
    "AttemptFailed": RuleInfo(E, "events", "Read the attempt's exit reason and logs; the supervisor restarts within its budget."),
    "HeartbeatLost": RuleInfo(E, "ranks", "Check the rank's host and process (frozen, OOM-killed, node lost); the supervisor restarts the attempt."),
    "WorkerDown": RuleInfo(E, "ranks", "Check the rank's host and process; the supervisor restarts the attempt when it is required."),
    "NoProgress": RuleInfo(E, "overview", "Look at the ranks' phases and open collectives; py-spy the ranks if no hang was diagnosed."),
    "ResumeMismatch": RuleInfo(E, "checkpoints", "The resumed state differs from the checkpoint manifest: check the checkpoint and the data position."),
    "GpuXid": RuleInfo(E, "ranks", "Look the XID up in NVIDIA's table; drain the node if it is a hardware XID (48, 63, 64, 74, 79, 94, 95)."),
    "Straggler": RuleInfo(W, "ranks", "Check the rank's GPU (clocks, temperature, XIDs) and node; cordon the node if it repeats."),
    "CheckpointFailed": RuleInfo(W, "checkpoints", "Check the checkpoint dir's disk and permissions; a resume would lose progress since the last commit."),
    "CheckpointStale": RuleInfo(W, "checkpoints", "Check that checkpoints are attempted and commit; a failure now loses everything since the last one."),
    "LossSpike": RuleInfo(W, "learning_health", "Inspect the batch at that step and the gradient norm; consider rolling back to a checkpoint."),
    "RewardCollapse": RuleInfo(W, "learning_health", "Check the reward function and rollouts (truncation, zero-variance groups, KL); consider rolling back."),
    "ThroughputDrop": RuleInfo(W, "overview", "Compare phase times and straggler scores; check GPUs, the network and the rollout engines.", 300.0),
    "DiskLow": RuleInfo(W, "overview", "Free space in the run dir (old checkpoints, traces) before checkpoints start to fail.", 300.0),
    "GpuOverheat": RuleInfo(W, "ranks", "Check the node's cooling and power; the GPU throttles and may fail.", 120.0),
    "DaemonRestarted": RuleInfo(W, "events", "Check why the daemon restarted (its log); the run was reattached."),
}  # fmt: skip
ALERTNAMES = tuple(CATALOG)


def condition(name: str, labels: dict[str, str], summary: str, evidence: str = "") -> Condition:
    """The condition of catalogue alert `name` (a KeyError for a name not in the catalogue)."""
    info = CATALOG[name]
    return Condition(
        alertname=name,
        severity=info.severity,
        labels=labels,
        for_s=info.for_s,
        summary=summary,
        description=summary,
        evidence=evidence,
        action=info.action,
        view=info.view,
    )
