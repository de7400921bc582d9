"""SGLang + Megatron-core on a GPU machine: the real path of examples/sglang-megatron-gpu.toml.

    .venv/bin/python bench/sglang_gpu.py [--job examples/sglang-megatron-gpu.toml] [--steps N]

Megatron-core trains (NCCL, DDP, distributed optimizer), the SGLang rollout worker launches
``python -m sglang.launch_server`` from the trainer's first weights, pushes every new version
and checks the version each response was generated with. Progress goes to stderr; the last
line on stdout is one JSON object. Without CUDA, sglang or megatron-core it prints
{"bench": "sglang_gpu", "skipped": true, "reason": ...} and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from milepost.engine.cluster import loopback_env

for _k, _v in loopback_env().items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parent.parent


def _skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    for module, what in (
        ("sglang", "sglang is not installed"),
        ("megatron.core", "megatron-core is not installed"),
    ):
        try:
            if importlib.util.find_spec(module) is None:
                return what
        except ModuleNotFoundError:
            return what
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(REPO / "examples" / "sglang-megatron-gpu.toml"))
    ap.add_argument("--steps", type=int, default=0, help="train this many steps (default: the job's)")
    ap.add_argument("--run-dir", default=None, help="default: a fresh temporary directory")
    args = ap.parse_args()

    reason = _skip_reason()
    if reason is not None:
        print(f"skipped: {reason}", file=sys.stderr)
        print(json.dumps({"bench": "sglang_gpu", "skipped": True, "reason": reason}))
        return

    import torch
    from milepost.engine.contract.config import load_job
    from milepost.engine.driver import Engine
    from milepost.engine.events import read_events
    from milepost.engine.step_result import StepResult

    cfg = load_job(args.job)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="milepost-bench-sglang-gpu-"))
    t0 = time.monotonic()

    def on_step(r: StepResult) -> None:
        print(
            f"step {r.step:4d}  reward {r.reward_mean:.3f}  loss {r.loss:+.4f}  step_s {r.step_s:.2f}  "
            f"rollout_s {r.phases.get('rollout', 0):.2f}  sync_s {r.phases.get('weight_sync', 0):.2f}",
            file=sys.stderr,
            flush=True,
        )

    result = Engine(cfg, run_dir, on_step=on_step, until_step=args.steps or None).run()
    minutes = (time.monotonic() - t0) / 60
    steps = result.steps
    rewards = [s.reward_mean for s in steps]
    k = min(10, len(rewards))
    events = list(read_events(run_dir))
    out = {
        "bench": "sglang_gpu",
        "skipped": False,
        "job": Path(args.job).name,
        "gpu": torch.cuda.get_device_name(0),
        "steps": len(steps),
        "reward_first10": round(sum(rewards[:k]) / max(k, 1), 4),
        "reward_last10": round(sum(rewards[-k:]) / max(k, 1), 4),
        "median_step_s": round(statistics.median(s.step_s for s in steps), 3) if steps else None,
        "median_rollout_s": round(statistics.median(s.phases.get("rollout", 0.0) for s in steps), 3)
        if steps
        else None,
        "median_weight_sync_s": round(statistics.median(s.phases.get("weight_sync", 0.0) for s in steps), 3)
        if steps
        else None,
        "final_weight_version": steps[-1].weight_version if steps else None,
        "sglang_weight_loads": sum(e.kind == "sglang_weights_loaded" for e in events),
        "sglang_restarts": sum(e.kind == "sglang_server_restarted" for e in events),
        "minutes": round(minutes, 2),
        "run_dir": str(run_dir),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
