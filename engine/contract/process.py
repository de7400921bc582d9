"""What the daemon and an attempt's processes tell each other outside HTTP: exit codes and environment.

The daemon starts each attempt as ``milepost.engine.cli`` with these variables set and
reads its exit code to decide between restart, give-up and done.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of an attempt's engine driver (a negative Popen code is the killing signal)."""

    OK = 0
    ERROR = 1  # driver error or a dead actor: restart from the newest verified checkpoint
    CONFIG_ERROR = 2  # the job file does not validate
    RESUME_MISMATCH = 3  # the loaded state does not match its manifest: restarting cannot help
    NO_SLOTS = 4  # fewer free trainer slots than trainer.min_world_size
    FAULT_EXIT = 17  # the ``exit`` fault: a process that quits on its own
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


# -- environment variables ------------------------------------------------------
TOKEN_ENV = "MILEPOST_TOKEN"  # the API's bearer token; overrides <run_dir>/token
RUN_ID_ENV = "MILEPOST_RUN_ID"  # the run's id: a trace resource attribute of every rank
TRACING_ENV = "MILEPOST_TRACING"  # "0": no OpenTelemetry spans from the ranks
RANK_GPU_ENV = "MILEPOST_RANK_GPU"  # "1": every rank process samples its node's GPUs into its reports
RANK_GPU_INTERVAL_ENV = "MILEPOST_RANK_GPU_INTERVAL_S"  # seconds between those samples (default 5)
GPU_COLLECTOR_ENV = "MILEPOST_GPU_COLLECTOR"  # "0": no NVML collector in the daemon

ENV_VARS = (TOKEN_ENV, RUN_ID_ENV, TRACING_ENV, RANK_GPU_ENV, RANK_GPU_INTERVAL_ENV, GPU_COLLECTOR_ENV)

# -- the daemon's own exit codes (besides 0, 1 error, 2 config error, 130 Ctrl-C) ----------
DAEMON_LOCKED_EXIT = 73  # another daemon holds the run dir's lock (sysexits EX_CANTCREAT)
