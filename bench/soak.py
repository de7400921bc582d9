"""Soak benchmark: the default job under every fault of the catalogue, CPU interference and API traffic.

    .venv/bin/python bench/soak.py [--minutes 30] [--seed 1] [--gap 45 120]

Starts the real daemon (``milepost run --detach``) on the default job (examples/tiny-grpo-cpu.toml,
more steps) and, every 45-120 s (``--gap``), fires the next fault of a shuffled round of the catalogue:
a trainer rank SIGKILLed, an exception in a rank, a trainer rank SIGSTOPped, a skipped
collective, the rollout worker SIGSTOPped, the rollout worker SIGKILLed, the newest checkpoint
corrupted (then a rank killed, so that the resume meets it), and the daemon SIGKILLed and
started again (it re-attaches). All along: a CPU hog pinned to one core in bursts of up to
10 s, alternating cores, and API traffic (reads, bad bodies with the token, writes without it).

Each fault is ``recovered`` when the run makes a step after it (in a later attempt, for the
faults that end one), and ``diagnosed`` when the daemon's events name its cause (the rank and
what happened). A ``false positive`` is a detection or an ended attempt outside every fault's
window. At the end the run is stopped and every line of events.jsonl and steps.jsonl is looked
up in the store (``events_lost``, ``steps_lost``). The daemon's RSS and open files are sampled
through each daemon's life (growth from its first minute to its last sample, the largest).
The last stdout line is one JSON object:
{"bench": "soak", "faults", "recovered", "undiagnosed", "false_positives", "events_lost",
 "steps_lost", "daemon_rss_growth_mb", "fd_growth", "goodput", "reached_target", ...}
Targets: every fault recovered and diagnosed, 0 false positives, 0 lost, RSS growth < 50 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from _daemon import job_text, log, start_detached, stop_all, wait_for

CATALOGUE = (
    "rank-kill",
    "exception",
    "rank-sigstop",
    "skip-collective",
    "rollout-sigstop",
    "rollout-kill",
    "corrupt-checkpoint",
    "daemon-kill",
)
DETECTIONS = ("collective_hang", "straggler", "heartbeat_lost", "progress_stalled")
ENDINGS = ("attempt_ended", "attempt_killed", "attempt_lost")
RECOVERY_TIMEOUT_S = 300.0
RSS_WARMUP_S = 60.0  # a daemon's first minute (imports, first ticks) is its baseline's, not growth


def overrides() -> dict[str, dict[str, Any]]:
    from milepost.engine.contract.config import SupervisorConfig

    supervisor: dict[str, Any] = {
        "backoff_initial_s": 0.5,
        "max_restarts": 100_000,
        "no_progress_restarts": 10,
    }
    if "allow_faults" in SupervisorConfig.model_fields:  # fault injection is opt-in where the key exists
        supervisor["allow_faults"] = True
    return {"run": {"steps": 10_000_000}, "supervisor": supervisor}


@dataclass
class Fault:
    kind: str
    role: str
    rank: int
    at: float
    attempt: int
    step: int
    done: float = 0.0  # when the injection itself was over (a daemon-kill: the new daemon is up)
    recovered_at: float | None = None
    diagnosed: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> tuple[float, float]:
        return self.at - 1.0, max(self.done, self.recovered_at or self.at + RECOVERY_TIMEOUT_S) + 5.0


class Soak:
    def __init__(self, tmp: Path, rng: random.Random) -> None:
        self.job, self.run_dir, self.rng = tmp / "job.toml", tmp / "run", rng
        self.job.write_text(job_text(overrides()))
        self.daemon_pids: list[int] = []
        self.faults: list[Fault] = []
        self.stop = threading.Event()
        self.samples: dict[int, list[tuple[float, int, int]]] = {}  # daemon pid -> (age, rss, fds)
        self.api = Counter[str]()

    # -- the daemon ---------------------------------------------------------------
    def start_daemon(self) -> None:
        self.daemon_pids.append(start_detached(self.job, self.run_dir))

    def client(self) -> Any:
        from milepost.daemon.client import DaemonClient

        return DaemonClient.from_run_dir(self.run_dir)

    def run_state(self) -> str:
        from milepost.daemon.store import Store

        store = Store(self.run_dir)
        try:
            return str((store.run() or {}).get("state", ""))
        finally:
            store.close()

    def current(self) -> tuple[int, int]:
        """(attempt, step) now."""
        status = self.client().status()
        return int(status["attempt"]), int(status["step"])

    def rank_pid(self, role: str, rank: int) -> int:
        attempt = self.current()[0]

        def find() -> int | None:
            rows = [
                r
                for r in self.client().ranks()
                if (r["role"], r["rank"], r["attempt"]) == (role, rank, attempt)
            ]
            return int(rows[0]["pid"]) if rows and rows[0]["pid"] else None

        return int(wait_for(f"{role} {rank} of attempt {attempt}", find, 60))

    def healthy(self) -> None:
        """Waits for three steps of the current attempt with the run RUNNING."""

        def ok() -> bool:
            client = self.client()
            status = client.status()
            steps = client.steps(since=max(0, int(status["step"]) - 10))
            mine = [s for s in steps if s.get("attempt") == status["attempt"]]
            return status["state"] == "RUNNING" and len(mine) >= 3

        wait_for("a healthy attempt", ok, 240)

    # -- faults ----------------------------------------------------------------------
    def fire(self, kind: str) -> Fault:
        attempt, step = self.current()
        rank = self.rng.randrange(2)
        role = "rollout" if kind.startswith("rollout") else "daemon" if kind == "daemon-kill" else "trainer"
        rank = 0 if role != "trainer" else rank
        f = Fault(kind, role, rank, time.time(), attempt, step)
        if kind in ("rank-kill", "rollout-kill"):
            os.kill(self.rank_pid(role, rank), signal.SIGKILL)
        elif kind in ("rank-sigstop", "rollout-sigstop"):
            os.kill(self.rank_pid(role, rank), signal.SIGSTOP)
        elif kind in ("exception", "skip-collective"):
            self.client().inject(kind, role=role, rank=rank)
        elif kind == "corrupt-checkpoint":
            mark = self._newest_event_id()
            self.client().inject(kind, role="trainer", rank=0)
            ev = wait_for("checkpoint_corrupted", lambda: self._events("checkpoint_corrupted", mark), 120)[0]
            f.detail["corrupted_step"] = ev["step"]
            f.rank = 1
            os.kill(self.rank_pid("trainer", 1), signal.SIGKILL)  # so the resume meets the corrupt copy
        elif kind == "daemon-kill":
            os.kill(self.daemon_pids[-1], signal.SIGKILL)
            time.sleep(self.rng.uniform(1.0, 3.0))
            self.start_daemon()
        f.done = time.time()
        log(f"fault {kind} ({role} {rank}) at attempt {attempt} step {step}")
        self.faults.append(f)
        return f

    def _newest_event_id(self) -> int:
        rows = self.client().events(limit=1, newest_first=True)
        return int(rows[0]["id"]) if rows else 0

    def _events(self, kind: str, since_id: int) -> list[dict[str, Any]]:
        return list(self.client().events(kind=kind, since_id=since_id, limit=5000))

    def await_recovery(self, f: Fault) -> None:
        ends_attempt = f.kind != "daemon-kill"
        since = f.at if ends_attempt else f.done  # a daemon-kill: a step the new daemon took in

        def recovered() -> float | None:
            steps = self.client().steps(since=max(0, f.step - 200))
            after = [
                s
                for s in steps
                if s["ts"] > since
                and (s.get("attempt", 0) > f.attempt if ends_attempt else s["step"] > f.step)
            ]
            return float(after[0]["ts"]) if after else None

        try:
            f.recovered_at = wait_for(f"recovery from {f.kind}", recovered, RECOVERY_TIMEOUT_S)
            log(f"  recovered {f.recovered_at - f.at:.1f}s after the fault")
        except SystemExit as e:
            log(f"  NOT recovered: {e}")

    # -- judging ---------------------------------------------------------------------
    def judge(self, events: list[dict[str, Any]]) -> None:
        """Marks each fault diagnosed when an event in its window names its cause."""
        for f in self.faults:
            lo, hi = f.window
            near = [e for e in events if lo <= e["ts"] <= hi]
            who = f"{f.role} {f.rank}"
            if f.kind in ("rank-kill", "rollout-kill"):
                f.diagnosed = any(
                    e["kind"] == "attempt_ended" and f"{who} process died" in e["message"] for e in near
                )
            elif f.kind == "exception":
                f.diagnosed = any(
                    e["kind"] == "attempt_ended" and f"{who} raised" in e["message"] for e in near
                )
            elif f.kind in ("rank-sigstop", "skip-collective", "rollout-sigstop"):
                f.diagnosed = any(_names(e, f.role, f.rank) for e in near if e["kind"] in DETECTIONS)
            elif f.kind == "corrupt-checkpoint":
                step = f.detail.get("corrupted_step")
                skipped = any(e["kind"] == "checkpoint_skipped" and e["step"] == step for e in near)
                newer = any(e["kind"] == "resume_verified" and (e["step"] or 0) > (step or 0) for e in near)
                f.diagnosed = (
                    skipped or newer
                )  # newer: a later save came first; the corrupt copy was not needed
            elif f.kind == "daemon-kill":
                f.diagnosed = any(e["kind"] in ("daemon_reattached", "daemon_started") for e in near)

    def false_positives(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        windows = [f.window for f in self.faults]
        return [
            e
            for e in events
            if e["kind"] in (*DETECTIONS, *ENDINGS) and not any(lo <= e["ts"] <= hi for lo, hi in windows)
        ]

    # -- background load -------------------------------------------------------------
    def sample(self) -> None:
        while not self.stop.wait(5.0):
            with contextlib.suppress(Exception):
                pid = int(json.loads((self.run_dir / "daemon.json").read_text())["pid"])
                p = psutil.Process(pid)
                age = time.time() - p.create_time()
                self.samples.setdefault(pid, []).append((age, p.memory_info().rss, p.num_fds()))

    def interfere(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        i = 0
        while not self.stop.wait(self.rng.uniform(10.0, 30.0)):
            core = cores[i % len(cores)]
            i += 1
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                os.sched_setaffinity(hog.pid, {core})
                self.stop.wait(self.rng.uniform(2.0, 10.0))
            finally:
                hog.kill()
                hog.wait()

    def traffic(self) -> None:
        from milepost.engine.contract.routes import API, FAULTS_PATH

        token = (self.run_dir / "token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        reads = ["/api/v1/status", f"{API}/ranks", f"{API}/events?limit=50", f"{API}/diagnoses", "/metrics"]
        with httpx.Client(timeout=5.0) as http:
            while not self.stop.wait(self.rng.uniform(0.3, 1.5)):
                try:
                    url = json.loads((self.run_dir / "daemon.json").read_text())["url"]
                    what = self.rng.choice(("read", "read", "bad-body", "no-token"))
                    if what == "read":
                        ok = http.get(url + self.rng.choice(reads)).status_code == 200
                    elif what == "bad-body":
                        body = self.rng.choice((b"{", b'{"kind": "no-such-fault"}', b"[]", b"x" * 100_000))
                        code = http.post(url + FAULTS_PATH, content=body, headers=auth).status_code
                        ok = 400 <= code < 500
                    else:
                        code = http.post(url + f"{API}/control/pause").status_code
                        ok = code in (401, 403)
                    self.api[f"{what}_{'ok' if ok else 'unexpected'}"] += 1
                except (httpx.HTTPError, OSError, ValueError, KeyError):
                    self.api["unreachable"] += 1  # the daemon is down for a moment (daemon-kill)

    def growth(self) -> tuple[float, int]:
        """Largest (RSS MB, fds) growth of a daemon from its first minute to its last sample."""
        rss = fds = 0.0
        for samples in self.samples.values():
            later = [s for s in samples if s[0] >= RSS_WARMUP_S]
            if len(later) >= 2:
                rss = max(rss, (later[-1][1] - later[0][1]) / 2**20)
                fds = max(fds, later[-1][2] - later[0][2])
        return round(rss, 1), int(fds)


def _names(e: dict[str, Any], role: str, rank: int) -> bool:
    culprits = (e.get("data") or {}).get("culprit_ranks") or []
    return [role, rank] in culprits or f"{role} {rank}" in e["message"]


def lost(run_dir: Path) -> tuple[int, int, int]:
    """(events lost, events stored twice, steps lost or stale): the files against the store."""
    from milepost.daemon.store import Store

    key = ("ts", "kind", "message", "attempt", "role", "rank", "step")
    written = [
        json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()
    ]
    last: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "steps.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            last[rec["step"]] = rec
    store = Store(run_dir)
    try:
        stored = [e for e in store.events(limit=10**9) if e["role"] != "daemon"]
        kept = {s["step"]: s for s in store.iter_steps()}
    finally:
        store.close()
    w = Counter(tuple(e.get(k) for k in key) for e in written)
    s = Counter(tuple(e.get(k) for k in key) for e in stored)
    steps_lost = sum(1 for n, rec in last.items() if kept.get(n) != rec)
    return sum((w - s).values()), sum((s - w).values()), steps_lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gap", type=float, nargs=2, default=(45.0, 120.0), metavar=("MIN_S", "MAX_S"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    soak = Soak(Path(tempfile.mkdtemp(prefix="milepost-bench-soak-")), rng)
    soak.start_daemon()
    threads = [threading.Thread(target=t, daemon=True) for t in (soak.sample, soak.interfere, soak.traffic)]
    deadline = t0 + args.minutes * 60
    try:
        wait_for("the first steps", lambda: soak.current()[1] >= 3, 300)
        for t in threads:
            t.start()
        round_: list[str] = []
        while True:
            due = time.monotonic() + rng.uniform(*args.gap)
            if due > deadline:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            soak.healthy()
            if time.monotonic() > deadline - 30:
                break  # too late for a fault to play out
            if not round_:
                round_ = list(CATALOGUE)
                rng.shuffle(round_)
            soak.await_recovery(soak.fire(round_.pop()))
        time.sleep(max(0.0, deadline - time.monotonic()))
        goodput = soak.client().goodput()["goodput"]
        steps = soak.current()[1]
        soak.client().control("stop")
        # Read from the store: once the run has stopped, the daemon exits (--exit-when-done).
        with contextlib.suppress(SystemExit):
            wait_for("the run to stop", lambda: soak.run_state() in ("STOPPED", "FAILED"), 180)
    finally:
        soak.stop.set()
        for t in threads:
            if t.is_alive():
                t.join(timeout=15)
        time.sleep(2.0)  # the daemon's last tick, then its exit (--exit-when-done)
        stop_all(soak.run_dir, soak.daemon_pids)
    from milepost.daemon.store import Store

    store = Store(soak.run_dir)
    events = store.events(limit=10**9)
    store.close()
    soak.judge(events)
    fps = soak.false_positives(events)
    for e in fps:
        log(f"false positive: {e['kind']}: {e['message'][:160]}")
    events_lost, events_doubled, steps_lost = lost(soak.run_dir)
    rss, fds = soak.growth()
    faults = len(soak.faults)
    recovered = sum(f.recovered_at is not None for f in soak.faults)
    undiagnosed = [f.kind for f in soak.faults if not f.diagnosed]
    out = {
        "bench": "soak",
        "faults": faults,
        "recovered": recovered,
        "undiagnosed": len(undiagnosed),
        "false_positives": len(fps),
        "events_lost": events_lost,
        "steps_lost": steps_lost,
        "daemon_rss_growth_mb": rss,
        "fd_growth": fds,
        "goodput": round(goodput, 4),
        "reached_target": bool(
            faults
            and recovered == faults
            and not undiagnosed
            and not fps
            and events_lost == events_doubled == steps_lost == 0
            and rss < 50
        ),
        "events_doubled": events_doubled,
        "fault_kinds": dict(Counter(f.kind for f in soak.faults)),
        "undiagnosed_kinds": undiagnosed,
        "mttr_s": [round(f.recovered_at - f.at, 1) for f in soak.faults if f.recovered_at],
        "api": dict(soak.api),
        "steps": steps,
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
