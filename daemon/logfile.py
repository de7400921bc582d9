"""The daemon's log handlers: ``daemon.log`` rotated by size, and stderr when it is not a file.

``[retention] log_max_mb`` and ``log_backups`` bound ``daemon.log`` (``daemon.log.1`` ...).
A detached daemon's stderr is ``daemon.out`` (``milepost run --detach``), which nothing
rotates: a stream handler there would copy every line of the log into it, so the log goes to
stderr only when stderr is a terminal, a pipe or a journal, never a regular file. What still
reaches ``daemon.out`` is what bypasses logging (a crash's traceback), which stays small.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path

from milepost.engine.contract.config import ConfigError, RetentionConfig, load_ops_view
from milepost.engine.contract.layout import RunDir


def retention_of(job: str) -> RetentionConfig:
    """The job's ``[retention]`` section; the defaults when the file does not load (the daemon says why later)."""
    try:
        return load_ops_view(job).retention
    except ConfigError:
        return RetentionConfig()


def stderr_is_a_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(sys.stderr.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # closed, or replaced by an object without a descriptor
        return False


def log_handlers(run_dir: Path, cfg: RetentionConfig) -> list[logging.Handler]:
    rotating = logging.handlers.RotatingFileHandler(
        RunDir(run_dir).daemon_log,
        maxBytes=max(1, int(cfg.log_max_mb * 1024 * 1024)),
        backupCount=cfg.log_backups,
    )
    return [rotating] if stderr_is_a_file() else [logging.StreamHandler(), rotating]
