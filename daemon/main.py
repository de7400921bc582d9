"""The daemon process: owns the run directory, the store, the HTTP API and the supervisor.

    python -m milepost.daemon.main JOB.toml --run-dir DIR [--ray-address ADDR] [--exit-when-done]
                                   [--stop-on-interrupt]

Normally started by ``milepost run``. It imports no torch: it comes up in about a
second and survives whatever kills the workers. Its API URL, pid and port go to
``<run_dir>/daemon.json``; a restarted daemon takes the same port again so that the
ranks' reporters, which keep retrying, find it where they left it.

Ctrl-C: with ``--stop-on-interrupt`` (a foreground ``milepost run``) it stops the whole run
(``daemon.interrupt``); without it (``--detach``) the attempt trains on for the next daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from milepost.engine.contract.enums import Role
from milepost.engine.contract.layout import RunDir
from milepost.engine.contract.process import DAEMON_LOCKED_EXIT
from milepost.engine.contract.routes import METRICS_PATH, STATUS_PATH

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_port(run_dir: Path, host: str, configured: int) -> int:
    if configured:
        return configured
    with contextlib.suppress(OSError, ValueError, KeyError):
        previous = int(json.loads(RunDir(run_dir).daemon_file.read_text())["port"])
        if _port_free(host, previous):
            return previous
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def daemon_running(run_dir: Path) -> dict[str, object] | None:
    """The pid and URL of the live daemon holding ``run_dir``'s lock, if there is one."""
    from .lock import holder

    return holder(run_dir)


def serve(
    job: str,
    run_dir: Path,
    *,
    ray_address: str | None,
    exit_when_done: bool,
    stop_on_interrupt: bool = False,
    dashboard_port: int = 0,
) -> int:
    import uvicorn
    from milepost.engine.contract.config import ConfigError, load_ops_view
    from milepost.engine.wire import lower_thread_priority

    from .alerting import DaemonAlerting
    from .api import create_app
    from .auth import load_or_create_token
    from .interrupt import InterruptibleServer, StopOnInterrupt
    from .lock import DaemonLock, Held
    from .store import SchemaTooNew, Store
    from .supervisor import Supervisor
    from .telemetry_service import Telemetry

    try:
        ops = load_ops_view(job)
    except ConfigError as e:
        print(f"milepost daemon: config error: {e}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = DaemonLock(run_dir).acquire()  # held until this process exits, however it exits
    except Held as e:
        print(f"milepost daemon: {e}", file=sys.stderr)
        return DAEMON_LOCKED_EXIT
    host = ops.supervisor.api_host
    port = _pick_port(run_dir, host, ops.supervisor.api_port)
    url = f"http://{host}:{port}"
    try:
        store = Store(run_dir)
    except SchemaTooNew as e:  # the message names the file and both versions
        print(f"milepost daemon: {e}", file=sys.stderr)
        return 2
    token = load_or_create_token(run_dir)
    sv = ops.supervisor
    telemetry = Telemetry.for_daemon(
        run_info=store.run,
        steps=store.step_totals,
        heartbeat_timeouts={
            Role.DRIVER: sv.heartbeat_timeout_driver_s,
            Role.TRAINER: sv.heartbeat_timeout_trainer_s,
            Role.ROLLOUT: sv.heartbeat_timeout_rollout_s,
        },
    )
    # Subscribed and restored before the supervisor publishes: re-attach events reach the rules.
    alerting = DaemonAlerting(ops.alerts, run_dir, store, telemetry.metrics)
    if telemetry.bus is not None:
        telemetry.bus.subscribe(alerting)
    alerting.start()
    sup = Supervisor(
        job=str(Path(job).resolve()),
        run_dir=run_dir,
        ops=ops,
        store=store,
        token=token,
        api_url=url,
        ray_address=ray_address,
        metrics=telemetry.metrics,
        bus=telemetry.bus,
    )
    app = create_app(
        store,
        sup.controller,
        token=token,
        require_token_for_reads=host not in LOOPBACK,
        telemetry=telemetry,
        alerting=alerting,
    )
    # Ranks keep one connection each for reports (every second) and one for spans (every 5 s):
    # uvicorn's 5 s idle limit would close the latter between exports.
    server = InterruptibleServer(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=30
        )
    )

    info = {"url": url, "port": port, "pid": os.getpid(), "started_at": time.time(), "job": sup.job}
    lock.describe(pid=os.getpid(), url=url)
    daemon_file = RunDir(run_dir).daemon_file
    tmp = daemon_file.with_name(daemon_file.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, daemon_file)

    def supervise() -> None:
        # Its ticks (tailing, detection) yield to training too; attempts are forked at full
        # priority by the supervisor's launcher thread.
        lower_thread_priority(ops.supervisor.telemetry_nice)
        sup.start()
        sup.loop()
        if exit_when_done:
            server.should_exit = True

    stopper = StopOnInterrupt(sup, server) if stop_on_interrupt else None
    server.on_interrupt = stopper
    supervisor_thread = threading.Thread(target=supervise, name="milepost-supervisor", daemon=True)
    supervisor_thread.start()
    from . import dashboard_proc

    dash, dash_url = dashboard_proc.start(run_dir, dashboard_port) if dashboard_port else (None, "")
    # The API thread (and the worker threads it starts) yield CPU to training.
    lower_thread_priority(ops.supervisor.telemetry_nice)
    logging.getLogger(__name__).info("milepost daemon for %s at %s (pid %d)", run_dir, url, os.getpid())
    print(
        (f"\nmilepost dashboard  {dash_url}   (log {RunDir(run_dir).dashboard_log})" if dash else "")
        + f"\nmilepost daemon (pid {os.getpid()}) supervising {job}\n"
        f"  status   {url}{STATUS_PATH}     API docs {url}/docs\n"
        f"  metrics  {url}{METRICS_PATH}\n"
        f"  summary  .venv/bin/milepost status --run-dir {run_dir}\n"
        f"  token    {RunDir(run_dir).token} (needed for control: pause, resume, stop, checkpoint)\n"
        f"  events   {RunDir(run_dir).events}\n",
        flush=True,
    )
    interrupted = False
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down on the first Ctrl-C, then re-raises it
        interrupted = True
    finally:
        if stopper is not None and (interrupted or stopper.requested.is_set()):
            stopper.finish(supervisor_thread, str(run_dir), job)
        dashboard_proc.stop(dash)
        sup.shutdown()
        alerting.close()
        telemetry.close()
    if stopper is not None and stopper.requested.is_set():
        return 130
    if not interrupted:
        return 0
    from . import procs

    pid = sup.attempt.pid
    if pid is not None and procs.alive(pid):
        print(
            f"\nmilepost: daemon stopped; attempt {sup.attempt.number} (pid {pid}) keeps training.\n"
            f"  re-attach  .venv/bin/milepost run {job} --run-dir {run_dir}\n"
            f"  or end it  kill -TERM -{pid}   (its process group: attempts lead their own)",
            flush=True,
        )
    else:
        print("\nmilepost: daemon stopped; no attempt is running.", flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="milepost-daemon", description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--exit-when-done", action="store_true")
    p.add_argument(
        "--stop-on-interrupt", action="store_true", help="Ctrl-C stops the run and all its processes"
    )
    p.add_argument("--dashboard-port", type=int, default=0, help="start the dashboard on this port (0: none)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from .logfile import log_handlers, retention_of

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s daemon: %(message)s",
        handlers=log_handlers(run_dir, retention_of(args.job)),  # daemon.log rotated by size
    )
    return serve(
        args.job,
        run_dir,
        ray_address=args.ray_address,
        exit_when_done=args.exit_when_done,
        stop_on_interrupt=args.stop_on_interrupt,
        dashboard_port=args.dashboard_port,
    )


if __name__ == "__main__":
    sys.exit(main())
