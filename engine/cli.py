"""milepost command line.

milepost engine JOB.toml [--run-dir DIR] [--steps N] [--world-size W]
    runs the engine alone (one attempt, resuming from the run's newest verified
    checkpoint), with a progress bar: step, reward, step time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, load_job


def _engine(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .driver import Engine, StepResult

    cfg = load_job(args.job)
    run_dir = cfg.run_dir(args.run_dir)
    bar = tqdm(total=args.steps or cfg.run.steps, desc=cfg.run.name, unit="step", dynamic_ncols=True)

    def on_step(res: StepResult) -> None:
        if bar.n == 0:
            bar.n = res.step - 1
        bar.update(1)
        bar.set_postfix(reward=f"{res.reward_mean:.3f}", loss=f"{res.loss:+.3f}", step_s=f"{res.step_s:.2f}")

    engine = Engine(cfg, run_dir, world_size=args.world_size, until_step=args.steps, on_step=on_step)
    print(f"milepost engine: job {args.job}, run dir {run_dir}", file=sys.stderr)
    result = engine.run()
    bar.close()
    last = result.steps[-10:]
    if last:
        mean = sum(s.reward_mean for s in last) / len(last)
        print(f"reached step {result.final_step}; mean reward of the last {len(last)} steps {mean:.3f}")
    else:
        print(f"nothing to do: the run is already at step {result.final_step}")
    print(f"final state checksum {result.final_checksum}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="milepost", description="milepost: keep RL post-training runs alive and visible"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine", help="run the engine alone (one attempt) on a job file")
    e.add_argument("job", help="job TOML file, e.g. examples/tiny-grpo-cpu.toml")
    e.add_argument(
        "--run-dir", default=None, help="run directory (default: the job's run.run_dir or runs/<name>)"
    )
    e.add_argument("--steps", type=int, default=None, help="stop after this step (default: run.steps)")
    e.add_argument(
        "--world-size", type=int, default=None, help="trainer world size (default: trainer.world_size)"
    )
    e.set_defaults(func=_engine)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"milepost: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
