"""Recovery benchmark: MTTR of a SIGKILLed rank, and goodput of a run under periodic kills.

    .venv/bin/python bench/recovery.py [--minutes 10] [--kill-every 120] [--first-kill 60]

Starts the real daemon on the default job (more steps), SIGKILLs a trainer rank or the
rollout worker (round robin) every ``--kill-every`` seconds, and measures for each kill
the time to the next completed step (MTTR). After ``--minutes`` it stops the run through
the API and reads the daemon's goodput. Progress goes to stderr; the last stdout line is
{"bench": "recovery", "mttr_median_s": ..., "mttr_max_s": ..., "kills": ..., "goodput": ..., ...}
Targets on a 2-core machine: MTTR <= 20 s, goodput >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from _daemon import daemon, log

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=120.0)
    ap.add_argument("--first-kill", type=float, default=60.0)
    args = ap.parse_args()

    with daemon({"run": {"steps": 1_000_000}}, "recovery") as (client, _run_dir):
        out = _measure(client, args)
    print(json.dumps(out))


def _measure(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    next_kill = t0 + args.first_kill
    mttrs: list[float] = []
    targets = [("trainer", 1), ("rollout", 0), ("trainer", 0)]
    while time.monotonic() < deadline:
        if time.monotonic() >= next_kill:
            role, rank = targets[len(mttrs) % len(targets)]
            victim = [r for r in client.ranks() if r["role"] == role and r["rank"] == rank]
            if not victim:
                time.sleep(0.5)
                continue
            before = client.status()["step"]
            attempt_at_kill = max(a["number"] for a in client.attempts())
            killed_at = time.time()
            os.kill(int(victim[0]["pid"]), signal.SIGKILL)
            log(f"SIGKILL {role} {rank} (pid {victim[0]['pid']}) at step {before}")
            while True:
                steps = client.steps(since=max(0, before - 200))
                recovered = [s for s in steps if s.get("attempt", 0) > attempt_at_kill]
                if recovered:
                    mttr = recovered[0]["ts"] - killed_at
                    mttrs.append(mttr)
                    log(f"  recovered: step {recovered[0]['step']} done {mttr:.1f}s after the kill")
                    break
                if time.time() - killed_at > 300:
                    raise SystemExit("no recovery within 300 s")
                time.sleep(0.2)
            next_kill += args.kill_every
        time.sleep(0.5)
    status = client.status()
    goodput = client.goodput()
    client.control("stop")
    for _ in range(120):
        if client.status()["state"] in ("STOPPED", "FAILED", "SUCCEEDED"):
            break
        time.sleep(0.5)
    out = {
        "bench": "recovery",
        "mttr_median_s": round(statistics.median(mttrs), 2) if mttrs else None,
        "mttr_max_s": round(max(mttrs), 2) if mttrs else None,
        "kills": len(mttrs),
        "goodput": round(goodput["goodput"], 4),
        "badput_s": {k: round(v, 1) for k, v in goodput["badput"].items()},
        "steps": status["step"],
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    return out


if __name__ == "__main__":
    main()
