"""The ``milepost`` command-line frame that every package's commands share (torch-free).

The one entry point (``milepost.daemon.cli``) and each package's own command module
(``milepost.engine.cli``, later the dashboard's) build their parsers on this frame, so the
program name, the description and the exit code of a config error are said once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .config import ConfigError
from .process import ExitCode


def command_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The ``milepost`` parser and its subcommand table, for each package to add its commands to."""
    p = argparse.ArgumentParser(
        prog="milepost", description="milepost: keep RL post-training runs alive and visible"
    )
    return p, p.add_subparsers(dest="cmd", required=True)


def add_job_arguments(sub: argparse.ArgumentParser) -> None:
    """The job file and its run directory, as every command that runs a job takes them."""
    sub.add_argument("job", help="job TOML file, e.g. examples/tiny-grpo-cpu.toml")
    sub.add_argument(
        "--run-dir", default=None, help="run directory (default: the job's run.run_dir or runs/<name>)"
    )


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parses ``argv`` and runs the chosen command; a config error is exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"milepost: config error: {e}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
