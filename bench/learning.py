"""Learning benchmark: runs the default job end to end and reports whether it learns.

    .venv/bin/python bench/learning.py [--job examples/tiny-grpo-cpu.toml]

Progress goes to stderr; the last line on stdout is one JSON object:
{"bench": "learning", "reward_first10": ..., "reward_last10": ..., "delta": ..., "steps": ..., "minutes": ...}
Target on a 2-core CPU machine: delta >= 0.4 within 10 minutes (Ray start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from milepost.engine.cluster import loopback_env

for _k, _v in loopback_env().items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(REPO / "examples" / "tiny-grpo-cpu.toml"))
    ap.add_argument("--run-dir", default=None, help="default: a fresh temporary directory")
    args = ap.parse_args()

    from milepost.engine.contract.config import load_job
    from milepost.engine.driver import Engine
    from milepost.engine.step_result import StepResult

    cfg = load_job(args.job)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="milepost-bench-learning-"))
    t0 = time.monotonic()

    def on_step(r: StepResult) -> None:
        print(
            f"step {r.step:4d}  reward {r.reward_mean:.3f}  loss {r.loss:+.4f}  step_s {r.step_s:.2f}",
            file=sys.stderr,
            flush=True,
        )

    result = Engine(cfg, run_dir, on_step=on_step).run()
    minutes = (time.monotonic() - t0) / 60
    rewards = [s.reward_mean for s in result.steps]
    first10, last10 = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    out = {
        "bench": "learning",
        "job": Path(args.job).name,
        "reward_first10": round(first10, 4),
        "reward_last10": round(last10, 4),
        "delta": round(last10 - first10, 4),
        "steps": len(rewards),
        "median_step_s": round(sorted(s.step_s for s in result.steps)[len(rewards) // 2], 3),
        "minutes": round(minutes, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
