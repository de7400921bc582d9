"""milepost: the one command line (the ``milepost`` script), and the daemon's commands.

milepost run JOB.toml [--run-dir DIR] [--ray-address ADDR] [--detach] [--exit-when-done] [--dashboard]
    validates the job, then starts the daemon that supervises it (re-attaching to a
    running attempt when the run dir already has one). In the foreground, Ctrl-C stops
    the run (a last checkpoint) and everything it started; with --detach it runs on.
milepost status [--run-dir DIR]      a readable summary of a run
milepost pause|resume|stop|checkpoint [--run-dir DIR]   control a running run
milepost inject --rank N --kind K    inject a fault into a rank
milepost engine JOB.toml [...]       the engine alone, one attempt (see milepost engine -h)
milepost dashboard [--run-dir DIR | --api URL] [--runs-root DIR] [--port P]   the live dashboard
milepost schema                      the job file's JSON Schema
milepost alerts list|silence|unsilence|test   the run's alerts (see milepost alerts -h)
milepost grafana push|render [...]   Grafana dashboards and alert rules (see milepost grafana -h)
milepost deploy kuberay|cluster JOB.toml   Ray cluster manifests from a job file (see milepost deploy -h)

Commands of other packages are listed in ``COMMANDS`` by module name and imported only
when named, so that ``milepost run`` loads neither torch nor the dashboard.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from milepost.engine.contract.cli import add_job_arguments, command_parser, run_command
from milepost.engine.contract.config import ConfigError, load_ops_view
from milepost.engine.contract.enums import Role
from milepost.engine.contract.layout import RunDir
from milepost.engine.contract.process import DAEMON_LOCKED_EXIT
from milepost.engine.contract.routes import STATUS_PATH

# Commands other packages own: name -> (module with main(argv), help line).
COMMANDS: dict[str, tuple[str, str]] = {
    "engine": ("milepost.engine.cli", "run the engine alone (one attempt); see milepost engine -h"),
    "grafana": ("milepost.daemon.grafana_push", "push or render the Grafana dashboards and alert rules"),
    "deploy": ("milepost.daemon.kuberay", "render Ray cluster manifests (KubeRay, ray up) from a job file"),
    "dashboard": ("milepost.dashboard.cli", "the live Streamlit dashboard; see milepost dashboard -h"),
}


def _run_dir(job: str | None, given: str | None) -> Path:
    if given:
        return Path(given)
    if job:
        run = load_ops_view(job).run
        return Path(run.run_dir or f"runs/{run.name}")
    return Path("runs") / "tiny-grpo-cpu"


def _cmd_run(args: argparse.Namespace) -> int:
    from milepost.engine.contract.config import load_job  # full validation before the daemon starts

    from .main import daemon_running

    try:
        load_job(args.job)
    except ConfigError as e:
        print(f"milepost: config error: {e}", file=sys.stderr)
        return 2
    run_dir = _run_dir(args.job, args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (other := daemon_running(run_dir)) is not None:
        print(
            f"milepost: a daemon already supervises {run_dir}: pid {other.get('pid')}, {other.get('url')}",
            file=sys.stderr,
        )
        return DAEMON_LOCKED_EXIT
    cmd = [sys.executable, "-m", "milepost.daemon.main", args.job, "--run-dir", str(run_dir)]
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    if args.exit_when_done:
        cmd.append("--exit-when-done")
    if args.dashboard:
        cmd += ["--dashboard-port", str(args.dashboard_port)]
    if not args.detach:
        cmd.append("--stop-on-interrupt")  # Ctrl-C in this terminal ends the whole run
        print(
            f"milepost: supervising {args.job} in {run_dir}; the API URL is in {RunDir(run_dir).daemon_file}",
            flush=True,
        )
        # A fresh interpreter: the daemon itself never imports torch.
        os.execv(sys.executable, cmd)
    rd = RunDir(run_dir)
    with rd.daemon_out.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            info = json.loads(rd.daemon_file.read_text())
            if info.get("pid") == proc.pid:
                print(f"milepost: daemon pid {proc.pid} at {info['url']} (run dir {run_dir})")
                print(f"  status:  milepost status --run-dir {run_dir}")
                print(f"  api:     {info['url']}{STATUS_PATH}   (token in {rd.token})")
                return 0
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            if proc.returncode == DAEMON_LOCKED_EXIT and (other := daemon_running(run_dir)) is not None:
                print(
                    f"milepost: a daemon already supervises {run_dir}: pid {other.get('pid')}, "
                    f"{other.get('url')}",
                    file=sys.stderr,
                )
                return DAEMON_LOCKED_EXIT
            print(f"milepost: the daemon exited with code {proc.returncode}; see {rd.daemon_out}")
            return 1
        time.sleep(0.2)
    print(f"milepost: the daemon did not come up in 30 s; see {rd.daemon_out}", file=sys.stderr)
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from .status_cli import main_status

    return main_status(str(_run_dir(None, args.run_dir)))


def _cmd_inject(args: argparse.Namespace) -> int:
    from .client import DaemonClient, DaemonError

    kind, _, factor = args.kind.partition(":")
    try:
        client = DaemonClient.from_run_dir(_run_dir(None, args.run_dir))
        res = client.inject(kind, role=args.role, rank=args.rank, step=args.step, factor=float(factor or 1.5))
    except (DaemonError, ValueError) as e:
        print(f"milepost inject: {e}", file=sys.stderr)
        return 1
    print(
        f"fault {res['id']}: {args.kind} queued for {args.role} {args.rank} (fires at its next step boundary)"
    )
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from .client import DaemonClient, DaemonError

    try:
        res = DaemonClient.from_run_dir(_run_dir(None, args.run_dir)).control(args.action)
    except DaemonError as e:
        print(f"milepost {args.action}: {e}", file=sys.stderr)
        return 1
    print(f"{args.action}: accepted; the run is now {res.get('state')}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    """Prints the job file's JSON Schema (the same text as engine/contract/config/job.schema.json)."""
    from milepost.engine.contract.config import job_schema_text

    sys.stdout.write(job_schema_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p, sub = command_parser()
    r = sub.add_parser("run", help="start the daemon supervising a job")
    add_job_arguments(r)
    r.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: a local one on loopback)"
    )
    r.add_argument("--detach", action="store_true", help="start the daemon in the background and return")
    r.add_argument("--exit-when-done", action="store_true", help="exit once the run succeeds, fails or stops")
    r.add_argument("--dashboard", action="store_true", help="start the live dashboard beside the daemon")
    r.add_argument("--dashboard-port", type=int, default=8501, help="the dashboard's port (default 8501)")
    r.set_defaults(func=_cmd_run)
    s = sub.add_parser("status", help="a readable summary of a run")
    s.add_argument("--run-dir", default=None, help="run directory (default: runs/tiny-grpo-cpu)")
    s.set_defaults(func=_cmd_status)
    for action, text in (
        ("pause", "pause the run at its next step boundary"),
        ("resume", "resume a paused run"),
        ("stop", "checkpoint, then stop training (the daemon stays up)"),
        ("checkpoint", "checkpoint now"),
    ):
        c = sub.add_parser(action, help=text)
        c.add_argument("--run-dir", default=None)
        c.set_defaults(func=_cmd_control, action=action)
    i = sub.add_parser("inject", help="inject a fault into a rank of the running attempt")
    i.add_argument("--rank", type=int, required=True)
    i.add_argument(
        "--kind",
        required=True,
        help="kill | exit | exception | hang | stall | skip-collective | slow:FACTOR | nan | rollout-crash | "
        "corrupt-checkpoint",
    )
    i.add_argument(
        "--role",
        default=Role.TRAINER.value,
        choices=[r.value for r in (Role.TRAINER, Role.ROLLOUT, Role.DRIVER)],
    )
    i.add_argument("--step", type=int, default=0, help="fire at this step or later (default: the next step)")
    i.add_argument("--run-dir", default=None)
    i.set_defaults(func=_cmd_inject)
    sub.add_parser("schema", help="print the job file's JSON Schema").set_defaults(func=_cmd_schema)
    from .alerts_cli import add_parser as add_alerts_parser

    add_alerts_parser(sub)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in -h; parsed by its own module
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv))
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
