"""Event kinds: every ``kind`` an engine process or the daemon writes, spelled once.

Engine processes append events to ``events.jsonl`` (milepost.engine.events); the daemon
tails that file into its store and adds its own (``daemon`` role). Metrics, recovery traces,
alerts and tests read kinds back, so a kind is a name of the contract, not free text.
"""

from __future__ import annotations

from enum import StrEnum

from .enums import RunState


class EventKind(StrEnum):
    # -- attempts (engine driver) ----------------------------------------------
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_FINISHED = "attempt_finished"
    ATTEMPT_FAILED = "attempt_failed"
    ATTEMPT_STOPPING = "attempt_stopping"
    WORLD_SIZE_CHANGED = "world_size_changed"
    RUN_PAUSED = "run_paused"
    RUN_RESUMED = "run_resumed"
    # -- checkpoints and resume --------------------------------------------------
    CHECKPOINT_REQUESTED = "checkpoint_requested"
    CHECKPOINT_COMMITTED = "checkpoint_committed"
    CHECKPOINT_FAILED = "checkpoint_failed"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    CHECKPOINT_CORRUPTED = "checkpoint_corrupted"  # the corrupt-checkpoint fault did it
    RESUME_VERIFIED = "resume_verified"
    RESUME_VERIFICATION_FAILED = "resume_verification_failed"
    # -- weights and training ----------------------------------------------------
    WEIGHT_SYNC_RETRY = "weight_sync_retry"
    WEIGHT_SYNC_FAILED = "weight_sync_failed"
    STALE_WEIGHTS = "stale_weights"
    NONFINITE_GRADIENTS = "nonfinite_gradients"
    OPTIMIZER_STEP_SKIPPED = "optimizer_step_skipped"
    MEGATRON_LAYOUT = "megatron_layout"
    # -- SGLang rollout ------------------------------------------------------------
    SGLANG_SERVER_LAUNCHED = "sglang_server_launched"
    SGLANG_SERVER_BACK = "sglang_server_back"
    SGLANG_SERVER_DEAD = "sglang_server_dead"
    SGLANG_SERVER_RESTARTED = "sglang_server_restarted"
    SGLANG_HEALTH_ERROR = "sglang_health_error"
    SGLANG_GENERATE_FAILED = "sglang_generate_failed"
    SGLANG_WEIGHT_PUSH_FAILED = "sglang_weight_push_failed"
    SGLANG_WEIGHTS_LOADED = "sglang_weights_loaded"
    # -- faults --------------------------------------------------------------------
    FAULT_REQUESTED = "fault_requested"  # the daemon queued one from the API
    FAULT_INJECTED = "fault_injected"
    FAULT_REJECTED = "fault_rejected"
    # -- daemon: supervision ---------------------------------------------------------
    DAEMON_STARTED = "daemon_started"
    DAEMON_REATTACHED = "daemon_reattached"
    ATTEMPT_LAUNCHED = "attempt_launched"
    ATTEMPT_ENDED = "attempt_ended"
    ATTEMPT_KILLED = "attempt_killed"
    ATTEMPT_LOST = "attempt_lost"  # it ended while no daemon watched
    RESTART_SCHEDULED = "restart_scheduled"
    RUN_SUCCEEDED = "run_succeeded"
    RUN_FAILED = "run_failed"
    RUN_STOPPED = "run_stopped"
    CONTROL_PAUSE = "control_pause"
    CONTROL_RESUME = "control_resume"
    CONTROL_STOP = "control_stop"
    CONTROL_CHECKPOINT = "control_checkpoint"
    # -- daemon: detection -------------------------------------------------------------
    HEARTBEAT_LOST = "heartbeat_lost"
    PROGRESS_STALLED = "progress_stalled"
    COLLECTIVE_HANG = "collective_hang"  # "CollectiveHang" in stores of older daemons
    STRAGGLER = "straggler"  # "Straggler" in stores of older daemons
    EVIDENCE_WRITE_FAILED = "evidence_write_failed"  # disk full or unwritable: detection went on without it

    @classmethod
    def run_ended(cls, state: RunState) -> EventKind:
        """The kind the daemon emits when the run reaches terminal ``state``."""
        return cls(f"run_{state.value.lower()}")

    @classmethod
    def control(cls, action: str) -> EventKind:
        """The kind the daemon emits when the API requests control ``action`` (pause, resume, ...)."""
        return cls(f"control_{action}")
