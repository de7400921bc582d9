"""The engine's command.

milepost engine JOB.toml [--run-dir DIR] [--steps N] [--world-size W]
    runs the engine alone (one attempt, resuming from the run's newest verified
    checkpoint), with a progress bar: step, reward, step time.

The ``milepost`` parser frame and its dispatch live in the contract (``contract.cli``), shared
with the one entry point (``milepost.daemon.cli``), which runs this module's ``main`` when its
command is named. Importing this module loads no torch: the engine's modules load when the
command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .contract.cli import add_job_arguments, command_parser, run_command
from .contract.enums import Severity
from .contract.events import EventKind
from .contract.layout import StandbyDir
from .contract.process import TOKEN_ENV, ExitCode


def _engine(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .contract.config import load_job
    from .driver import Engine
    from .step_result import StepResult

    cfg = load_job(args.job)
    if args.ray_address:
        cfg = cfg.replace("ray", address=args.ray_address)  # frozen: a validated copy
    run_dir = cfg.run_dir(args.run_dir)
    if args.standby_dir:
        _standby(cfg, Path(args.standby_dir), args, run_dir)
    bar = tqdm(
        total=args.steps or cfg.run.steps,
        desc=cfg.run.name,
        unit="step",
        dynamic_ncols=True,
        disable=args.no_progress,
    )

    def on_step(res: StepResult) -> None:
        if bar.n == 0:
            bar.n = res.step - 1
        bar.update(1)
        bar.set_postfix(reward=f"{res.reward_mean:.3f}", loss=f"{res.loss:+.3f}", step_s=f"{res.step_s:.2f}")

    engine = Engine(
        cfg,
        run_dir,
        attempt=args.attempt,
        world_size=args.world_size,
        elastic=args.elastic,
        until_step=args.steps,
        on_step=None if args.no_progress else on_step,
        daemon_url=args.daemon_url,
        token=os.environ.get(TOKEN_ENV),
    )
    print(f"milepost engine: job {args.job}, run dir {run_dir}, attempt {args.attempt}", file=sys.stderr)
    said: list[BaseException] = []

    def say_failed(e: BaseException) -> None:
        said.append(e)
        _, data = _failure(e)
        engine.events.emit(
            EventKind.ATTEMPT_FAILED, f"attempt {args.attempt} failed: {e}", severity=Severity.ERROR, **data
        )

    engine.on_failure = say_failed
    try:
        result = engine.run()
    except BaseException as e:
        code, _ = _failure(e)
        if e not in said:
            say_failed(e)
        print(f"milepost engine: attempt {args.attempt} failed: {e}", file=sys.stderr)
        if code == ExitCode.ERROR and not isinstance(e, Exception):
            raise
        return code
    finally:
        bar.close()
    last = result.steps[-10:]
    if last:
        mean = sum(s.reward_mean for s in last) / len(last)
        print(f"reached step {result.final_step}; mean reward of the last {len(last)} steps {mean:.3f}")
    else:
        print(f"nothing to do: the run is already at step {result.final_step}")
    print(f"final state checksum {result.final_checksum}")
    return ExitCode.OK


def _standby(cfg: Any, where: Path, args: argparse.Namespace, run_dir: Path) -> None:
    """Warm standby for the daemon: imports done, Ray up, actors built; then wait for the go file.

    The daemon keeps one of these ready while an attempt runs, so a restart skips the
    interpreter, torch and Ray start-up and the actors' process start (seconds of mean time
    to recovery).
    """
    from .actors import prewarm_actors
    from .cluster import ensure_ray

    ensure_ray(cfg.ray, needed_cpus=cfg.trainer.max_world_size + cfg.rollout.workers)
    prewarm_actors(
        cfg,
        run_dir,
        attempt=args.attempt,
        world_size=args.world_size or cfg.trainer.world_size,
        daemon_url=args.daemon_url,
        token=os.environ.get(TOKEN_ENV),
    )
    standby = StandbyDir(where)
    standby.path.mkdir(parents=True, exist_ok=True)
    standby.ready.write_text(str(os.getpid()))
    daemon_pid = os.getppid()
    while not standby.go.exists():
        if os.getppid() != daemon_pid:
            # The daemon that launched this standby is gone; a new one starts its own.
            sys.exit(0)
        time.sleep(0.05)


def _failure(e: BaseException) -> tuple[int, dict[str, Any]]:
    """Exit code and event fields for an attempt that ended in ``e``."""
    from .actors import ActorFailure, InsufficientSlots
    from .trainer import ResumeError

    if isinstance(e, ResumeError):
        return ExitCode.RESUME_MISMATCH, {"cause": "resume_verification_failed"}
    if isinstance(e, InsufficientSlots):
        return ExitCode.NO_SLOTS, {"cause": "insufficient_slots"}
    if isinstance(e, ActorFailure):
        return (
            ExitCode.ERROR,
            {
                "cause": "actor_died" if e.died else "actor_error",
                "role": e.role,
                "rank": e.rank,
                "error": e.kind,
            },
        )
    if isinstance(e, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, {"cause": "interrupted"}
    return ExitCode.ERROR, {"cause": "driver_error", "error": type(e).__name__}


def build_parser() -> argparse.ArgumentParser:
    p, sub = command_parser()
    e = sub.add_parser("engine", help="run the engine alone (one attempt) on a job file")
    add_job_arguments(e)
    e.add_argument("--steps", type=int, default=None, help="stop after this step (default: run.steps)")
    e.add_argument(
        "--world-size", type=int, default=None, help="trainer world size (default: trainer.world_size)"
    )
    e.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: the job's ray.address)"
    )
    e.add_argument("--elastic", action="store_true", help="pick the world size from free trainer slots")
    e.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    e.add_argument("--daemon-url", default=None, help=argparse.SUPPRESS)
    e.add_argument("--standby-dir", default=None, help=argparse.SUPPRESS)
    e.add_argument("--no-progress", action="store_true", help="no progress bar (used under the daemon)")
    e.set_defaults(func=_engine)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
