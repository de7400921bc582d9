"""The panels of milepost's Grafana dashboards: each dashboard's rows, panels and PromQL, as data.

``daemon.grafana_dashboards`` turns these into dashboards with grafana-foundation-sdk. Every
query selects one run (``run_id="$run_id"``) and uses only families the daemon exports
(``daemon.metrics``, ``daemon.collective_metrics``, ``daemon.gpu_metrics``); Grafana's
``$__rate_interval`` and ``$__range`` are the only other variables.
"""

from __future__ import annotations

from dataclasses import dataclass

RUN = 'run_id="$run_id"'


@dataclass(frozen=True)
class Q:
    """One PromQL target: the expression and its legend."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class P:
    """One panel: kind (timeseries, stat, state), title, unit, width and its queries."""

    kind: str
    title: str
    queries: tuple[Q, ...]
    unit: str = "short"
    width: int = 8
    description: str = ""
    show_name: bool = False  # a stat that shows the series' legend (e.g. the run state), not its value


def _ts(title: str, *queries: Q, unit: str = "short", width: int = 8, description: str = "") -> P:
    return P("timeseries", title, queries, unit, width, description)


def _stat(title: str, *queries: Q, unit: str = "short", width: int = 4, description: str = "") -> P:
    return P("stat", title, tuple(Q(q.expr, q.legend, True) for q in queries), unit, width, description)


def _rate(family: str, extra: str = "", window: str = "$__rate_interval") -> str:
    sel = f"{RUN}, {extra}" if extra else RUN
    return f"rate({family}{{{sel}}}[{window}])"


def _quantile(q: float, family: str, by: str = "", extra: str = "") -> str:
    keys = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) ({_rate(family + '_bucket', extra)}))"


STALL_5M = _rate("milepost_checkpoint_duration_seconds_sum", 'kind="stall"', "5m")
GOODPUT = (
    f"sum(increase(milepost_productive_seconds_total{{{RUN}}}[$__range]))"
    f" / sum(increase(milepost_wallclock_seconds_total{{{RUN}}}[$__range]))"
)

# Rows of panels, per dashboard: (uid suffix, title, description, rows).
Row = tuple[str, list[P]]
SPECS: list[tuple[str, str, str, list[Row]]] = [
    (
        "overview",
        "milepost / overview",
        "Progress, learning, goodput and badput of one run.",
        [
            (
                "Progress",
                [
                    _stat("Step", Q(f"max(milepost_global_step{{{RUN}}})")),
                    _stat("Attempt", Q(f"max(milepost_attempt{{{RUN}}})")),
                    P(
                        "stat",
                        "State",
                        (Q(f"milepost_run_state{{{RUN}}} == 1", "{{state}}", True),),
                        width=4,
                        show_name=True,
                    ),
                    _stat("Goodput (range)", Q(GOODPUT), unit="percentunit"),
                    _stat(
                        "Since last step",
                        Q(f"time() - max(milepost_last_step_timestamp_seconds{{{RUN}}})"),
                        unit="s",
                    ),
                    _stat(
                        "Restarts (range)", Q(f"sum(increase(milepost_restarts_total{{{RUN}}}[$__range]))")
                    ),
                    _ts("Steps per minute", Q(f"60 * {_rate('milepost_steps_total')}", "steps/min")),
                    _ts(
                        "Step time",
                        Q(_quantile(0.5, "milepost_step_duration_seconds"), "p50"),
                        Q(_quantile(0.95, "milepost_step_duration_seconds"), "p95"),
                        unit="s",
                    ),
                    _ts(
                        "Mean phase time",
                        Q(
                            f"sum by (phase) ({_rate('milepost_phase_duration_seconds_sum')})"
                            f" / sum by (phase) ({_rate('milepost_phase_duration_seconds_count')})",
                            "{{phase}}",
                        ),
                        unit="s",
                    ),
                ],
            ),
            (
                "Learning",
                [
                    _ts(
                        "Reward",
                        Q(f"milepost_reward_mean{{{RUN}}}", "mean"),
                        Q(f"milepost_reward_std{{{RUN}}}", "std"),
                    ),
                    _ts("Loss", Q(f"milepost_loss{{{RUN}}}", "{{component}}")),
                    _ts("Gradient norm", Q(f"milepost_grad_norm{{{RUN}}}", "grad norm")),
                    _ts("KL to reference", Q(f"milepost_kl_divergence{{{RUN}}}", "kl")),
                    _ts("Learning rate", Q(f"milepost_learning_rate{{{RUN}}}", "lr")),
                    _ts(
                        "Clip fraction and weight version",
                        Q(f"milepost_clip_fraction{{{RUN}}}", "clip fraction"),
                        Q(f"milepost_weight_version{{{RUN}}}", "weight version"),
                    ),
                    _ts(
                        "Non-finite values",
                        Q(
                            f"sum by (metric) (increase(milepost_nonfinite_values_total{{{RUN}}}[$__rate_interval]))",
                            "{{metric}}",
                        ),
                        description="NaN/inf values the daemon refused to put on a gauge",
                    ),
                ],
            ),
            (
                "Goodput and badput",
                [
                    _ts(
                        "Goodput",
                        Q(
                            f"sum({_rate('milepost_productive_seconds_total', window='5m')})"
                            f" / sum({_rate('milepost_wallclock_seconds_total', window='5m')})",
                            "goodput (5m)",
                        ),
                        unit="percentunit",
                    ),
                    _ts(
                        "Badput share",
                        Q(
                            f"sum({STALL_5M})"
                            f" / sum({_rate('milepost_wallclock_seconds_total', window='5m')})",
                            "checkpoint stall",
                        ),
                        Q(
                            f"1 - (sum({_rate('milepost_productive_seconds_total', window='5m')})"
                            f" + sum({STALL_5M}))"
                            f" / sum({_rate('milepost_wallclock_seconds_total', window='5m')})",
                            "start-up, recovery, lost progress",
                        ),
                        unit="percentunit",
                    ),
                    _ts(
                        "Throughput",
                        Q(
                            f"sum by (kind) ({_rate('milepost_rollout_tokens_total')})",
                            "rollout {{kind}} tok/s",
                        ),
                        Q(f"sum({_rate('milepost_train_tokens_total')})", "train tok/s"),
                        Q(f"sum({_rate('milepost_rollout_samples_total')})", "samples/s"),
                    ),
                ],
            ),
        ],
    ),
    (
        "ranks",
        "milepost / ranks and collectives",
        "Step time per rank, stragglers, liveness and collective bandwidth per op.",
        [
            (
                "Ranks",
                [
                    _ts(
                        "Step time per rank",
                        Q(f"milepost_rank_step_duration_seconds{{{RUN}}}", "{{role}} {{rank}}"),
                        unit="s",
                        width=12,
                    ),
                    _ts(
                        "Straggler score",
                        Q(f"milepost_straggler_score{{{RUN}}}", "{{role}} {{rank}}"),
                        width=12,
                        description="A rank's compute time relative to its peers (1 = typical)",
                    ),
                    _ts(
                        "Slowest trainer / median",
                        Q(
                            f'max(milepost_rank_step_duration_seconds{{{RUN}, role="trainer"}})'
                            f' / quantile(0.5, milepost_rank_step_duration_seconds{{{RUN}, role="trainer"}})',
                            "slowest / median",
                        ),
                    ),
                    _ts("Workers up", Q(f"milepost_worker_up{{{RUN}}}", "{{role}} {{rank}} on {{node}}")),
                    _ts(
                        "Heartbeat age",
                        Q(
                            f"time() - milepost_worker_heartbeat_timestamp_seconds{{{RUN}}}",
                            "{{role}} {{rank}}",
                        ),
                        unit="s",
                    ),
                ],
            ),
            (
                "Collectives",
                [
                    _ts(
                        "Bus bandwidth per op",
                        Q(f"milepost_collective_busbw_bytes_per_second{{{RUN}}}", "{{op}} {{group}}"),
                        unit="Bps",
                        width=12,
                        description="nccl-tests busbw: algbw x the op's factor",
                    ),
                    _ts(
                        "Algorithm bandwidth per op",
                        Q(f"milepost_collective_algbw_bytes_per_second{{{RUN}}}", "{{op}} {{group}}"),
                        unit="Bps",
                        width=12,
                    ),
                    _ts(
                        "Collective time p99 per op",
                        Q(_quantile(0.99, "milepost_collective_duration_seconds", by="op"), "{{op}}"),
                        unit="s",
                    ),
                    _ts(
                        "Collective bytes per op",
                        Q(f"sum by (op) ({_rate('milepost_collective_bytes_total')})", "{{op}}"),
                        unit="Bps",
                    ),
                    _ts(
                        "Collectives in flight",
                        Q(f"milepost_collectives_in_flight{{{RUN}}}", "{{role}} {{rank}}"),
                    ),
                ],
            ),
        ],
    ),
    (
        "incidents",
        "milepost / incidents",
        "Hangs, restarts by cause, recovery time, reporting health.",
        [
            (
                "Incidents",
                [
                    _stat(
                        "Hangs (range)", Q(f"sum(increase(milepost_hangs_detected_total{{{RUN}}}[$__range]))")
                    ),
                    _stat(
                        "Restarts (range)", Q(f"sum(increase(milepost_restarts_total{{{RUN}}}[$__range]))")
                    ),
                    _stat(
                        "Longest stall (range)",
                        Q(
                            f"max_over_time((time() - max(milepost_last_step_timestamp_seconds{{{RUN}}}))"
                            "[$__range:15s])"
                        ),
                        unit="s",
                        description="Longest time without a completed step: detection + restart + resume",
                    ),
                    _stat("Attempt", Q(f"max(milepost_attempt{{{RUN}}})")),
                    _ts(
                        "Restarts by cause",
                        Q(
                            f"sum by (reason) (increase(milepost_restarts_total{{{RUN}}}[$__rate_interval]))",
                            "{{reason}}",
                        ),
                        width=12,
                    ),
                    _ts(
                        "Hangs detected",
                        Q(
                            f"sum(increase(milepost_hangs_detected_total{{{RUN}}}[$__rate_interval]))",
                            "hangs",
                        ),
                        width=12,
                    ),
                    _ts(
                        "Recovery time (time since last step)",
                        Q(f"time() - max(milepost_last_step_timestamp_seconds{{{RUN}}})", "since last step"),
                        unit="s",
                        width=12,
                        description="Rises while a recovery runs; the peak after a restart is its recovery time",
                    ),
                    P("state", "Run state", (Q(f"milepost_run_state{{{RUN}}} == 1", "{{state}}"),), width=12),
                    _ts(
                        "Events by severity",
                        Q(
                            f"sum by (severity) (increase(milepost_events_total{{{RUN}}}[$__rate_interval]))",
                            "{{severity}}",
                        ),
                    ),
                    _ts(
                        "Reports received",
                        Q(f"sum by (role) ({_rate('milepost_reports_received_total')})", "{{role}}"),
                    ),
                    _ts(
                        "Reports dropped",
                        Q(
                            f"sum by (role) (increase(milepost_reports_dropped_total{{{RUN}}}[$__rate_interval]))",
                            "{{role}}",
                        ),
                    ),
                ],
            ),
        ],
    ),
    (
        "gpus",
        "milepost / GPUs",
        "NVML families per node and GPU, XID and ECC errors.",
        [
            (
                "Collectors",
                [
                    _stat(
                        "Collectors up",
                        Q(f"milepost_gpu_collector_up{{{RUN}}}", "{{node}} {{reason}}"),
                        width=12,
                    ),
                    _stat("GPUs", Q(f"milepost_gpu_devices{{{RUN}}}", "{{node}}"), width=12),
                ],
            ),
            (
                "Devices",
                [
                    _ts(
                        "Utilization",
                        Q(f"milepost_gpu_utilization_ratio{{{RUN}}}", "{{node}} gpu {{gpu}}"),
                        unit="percentunit",
                    ),
                    _ts(
                        "Memory used",
                        Q(
                            f"milepost_gpu_memory_used_bytes{{{RUN}}} / milepost_gpu_memory_total_bytes{{{RUN}}}",
                            "{{node}} gpu {{gpu}}",
                        ),
                        unit="percentunit",
                    ),
                    _ts(
                        "Power",
                        Q(f"milepost_gpu_power_watts{{{RUN}}}", "{{node}} gpu {{gpu}}"),
                        unit="watt",
                    ),
                    _ts(
                        "Temperature",
                        Q(f"milepost_gpu_temperature_celsius{{{RUN}}}", "{{node}} gpu {{gpu}}"),
                        unit="celsius",
                    ),
                    _ts(
                        "NVLink traffic",
                        Q(
                            f"sum by (node, gpu) ({_rate('milepost_gpu_nvlink_transmit_bytes_total')})",
                            "tx {{node}} {{gpu}}",
                        ),
                        Q(
                            f"sum by (node, gpu) ({_rate('milepost_gpu_nvlink_receive_bytes_total')})",
                            "rx {{node}} {{gpu}}",
                        ),
                        unit="Bps",
                    ),
                    _ts(
                        "XID errors",
                        Q(
                            f"sum by (node, gpu, xid) (increase(milepost_gpu_xid_errors_total{{{RUN}}}[$__rate_interval]))",
                            "{{node}} gpu {{gpu}} xid {{xid}}",
                        ),
                    ),
                    _ts(
                        "ECC errors",
                        Q(
                            f"sum by (node, gpu, type) (increase(milepost_gpu_ecc_errors_total{{{RUN}}}[$__rate_interval]))",
                            "{{node}} gpu {{gpu}} {{type}}",
                        ),
                    ),
                ],
            ),
        ],
    ),
    (
        "checkpoints",
        "milepost / checkpoints",
        "Checkpoint age, duration (stall and total), outcomes and their cost in wall time.",
        [
            (
                "Checkpoints",
                [
                    _stat(
                        "Last checkpoint age",
                        Q(f"time() - max(milepost_last_checkpoint_timestamp_seconds{{{RUN}}})"),
                        unit="s",
                        width=6,
                    ),
                    _stat(
                        "Committed (range)",
                        Q(
                            f'sum(increase(milepost_checkpoints_total{{{RUN}, status="committed"}}[$__range]))'
                        ),
                        width=6,
                    ),
                    _stat(
                        "Failed or skipped (range)",
                        Q(
                            f'sum(increase(milepost_checkpoints_total{{{RUN}, status=~"failed|skipped"}}[$__range]))'
                        ),
                        width=6,
                    ),
                    _stat(
                        "Stall share (range)",
                        Q(
                            f'sum(increase(milepost_checkpoint_duration_seconds_sum{{{RUN}, kind="stall"}}[$__range]))'
                            f" / sum(increase(milepost_wallclock_seconds_total{{{RUN}}}[$__range]))"
                        ),
                        unit="percentunit",
                        width=6,
                    ),
                    _ts(
                        "Checkpoint time p95",
                        Q(_quantile(0.95, "milepost_checkpoint_duration_seconds", by="kind"), "{{kind}}"),
                        unit="s",
                        width=12,
                    ),
                    _ts(
                        "Checkpoints by outcome",
                        Q(
                            f"sum by (status) (increase(milepost_checkpoints_total{{{RUN}}}[$__rate_interval]))",
                            "{{status}}",
                        ),
                        width=12,
                    ),
                ],
            ),
        ],
    ),
]
