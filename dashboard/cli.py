"""milepost dashboard: starts the Streamlit app on a run's daemon.

    milepost dashboard [--run-dir DIR | --api URL] [--runs-root DIR] [--port P] [--host H]

The flags reach the app as environment variables (milepost.dashboard.source.ENV_*); the
app reads only the daemon's HTTP API, so ``--api`` works from a laptop against a remote
daemon (with $MILEPOST_TOKEN where the daemon wants a token for reads).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from milepost.dashboard.source import ENV_API, ENV_REFRESH, ENV_RUN_DIR, ENV_RUNS_ROOT

APP = Path(__file__).with_name("app.py")
DEFAULT_PORT = 8501


def streamlit_command(port: int, host: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
        "--client.toolbarMode=minimal",
    ]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="milepost dashboard", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run-dir", default=None, help="a run directory (its daemon.json names the API)")
    where.add_argument("--api", default=None, help="a daemon's API URL, e.g. http://10.0.0.5:8470")
    p.add_argument(
        "--runs-root", default="runs", help="the Runs view lists the run dirs under it (default: runs)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--refresh-s", type=float, default=2.0, help="live refresh interval (default 2 s)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1..65535, got {args.port}")
    if args.refresh_s <= 0:
        p.error(f"--refresh-s must be > 0, got {args.refresh_s}")
    if args.api and not args.api.startswith(("http://", "https://")):
        p.error(f"--api must start with http:// or https://, got {args.api!r}")
    return args


def environment(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[ENV_RUNS_ROOT] = str(Path(args.runs_root).resolve())
    env[ENV_REFRESH] = str(args.refresh_s)
    if args.run_dir:
        env[ENV_RUN_DIR] = str(Path(args.run_dir).resolve())
    if args.api:
        env[ENV_API] = args.api
    return env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dashboard":
        argv = argv[1:]
    args = parse(argv)
    print(f"milepost dashboard: http://{args.host}:{args.port}", flush=True)
    cmd = streamlit_command(args.port, args.host)
    # Become Streamlit (no child): whoever stops this process (the daemon, a test) stops the server.
    os.execve(cmd[0], cmd, environment(args))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
