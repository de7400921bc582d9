"""Dashboard benchmark: the Ranks view at 1024 ranks, the Overview's live refresh, and what polling costs the daemon.

    .venv/bin/python bench/dashboard.py

1. ``render_s``: a simulated daemon (the real API app and store in its own process, fed
   synthetic reports: 1024 trainer ranks x 200 steps of compute times, one of them a 1.3x
   straggler) behind ``milepost dashboard``; Chromium (Debian's, through Playwright) opens
   /ranks and the clock stops when the page's heatmap is drawn (median of 3 loads after a
   warm-up). Target <= 2 s.
2. ``refresh_s``: the real daemon on the default tiny job (a running job); the Overview stays
   open and each live refresh ends with a caption stamped with its start; the browser notes
   when each new caption appears (median start -> shown). Target <= 1 s.
3. ``daemon_cpu_s_per_min``: the real daemon's CPU seconds per minute with the Overview open,
   less those with no dashboard page open (each over ``CPU_WINDOW_S``, side by side);
   ``sim_daemon_cpu_s_per_min_ranks_1024``: the simulated daemon's CPU per minute with the
   Ranks view at 1024 ranks open (it does nothing else).
Ends with one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _daemon import daemon, log, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
RANKS, STEPS = 1024, 200
CPU_WINDOW_S = 30.0
REFRESH_S = 1.0
CHART = '[data-testid="stVegaLiteChart"]'


# -- the simulated daemon (its own process: --sim-daemon RUN_DIR) ---------------------------
class SimController:
    """The controller half of a daemon whose ranks are synthetic: reads of the store, no attempt."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def status(self) -> dict[str, Any]:
        last = self.store.last_step() or {"step": 0}
        return {
            "run_id": "sim",
            "name": "sim-1024",
            "state": "RUNNING",
            "reason": "",
            "step": last["step"],
            "target_steps": 1000,
            "attempt": 0,
            "world_size": RANKS,
            "goodput": 0.9,
            "restarts": 0,
            "started_at": time.time() - 600,
            "updated_at": time.time(),
        }

    def goodput(self) -> dict[str, Any]:
        badput = {
            "startup_s": 30.0,
            "recovery_s": 0.0,
            "lost_progress_s": 0.0,
            "checkpoint_stall_s": 30.0,
            "other_s": 0.0,
        }
        return {"goodput": 0.9, "wall_s": 600.0, "productive_s": 540.0, "badput": badput}

    def control(self, action: str) -> dict[str, Any]:
        raise ValueError(f"cannot {action} a simulated run")

    def ingest(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": 0, "control": [], "faults": []}

    def inject(self, fault: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no attempt is running: nothing to inject into")

    def diagnoses(self) -> list[dict[str, Any]]:
        return list(self.store.diagnoses())

    def ranks(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                **{k: r["data"].get(k) for k in ("host", "pid", "step", "phase", "state")},
                "role": r["role"],
                "rank": r["rank"],
                "attempt": 0,
                "heartbeat_age_seconds": max(0.0, now - r["data"]["ts"]),
                "open_collectives": [],
                "timings": {},
            }
            for r in self.store.ranks()
        ]


def sim_daemon(run_dir: Path) -> None:
    import uvicorn
    from milepost.daemon.api import create_app
    from milepost.daemon.store import Store

    store = Store(run_dir)
    store.ensure_run(run_id="sim", name="sim-1024", job="", run_dir=str(run_dir), target_steps=1000)
    rng = random.Random(0)
    now = time.time()
    for s in range(1, STEPS + 1):
        store.add_step(
            {
                "step": s,
                "attempt": 0,
                "ts": now - (STEPS - s),
                "reward_mean": rng.random(),
                "loss": 1.0,
                "kl": 0.0,
                "grad_norm": 1.0,
                "rollout_tokens": 1000,
                "train_tokens": 1000.0,
                "step_s": 1.0,
            }
        )
    for r in range(RANKS):
        store.upsert_rank(
            "trainer",
            r,
            0,
            {
                "host": f"node-{r // 8}",
                "pid": 1000 + r,
                "step": STEPS,
                "phase": "train",
                "state": "running",
                "ts": now,
            },
        )
    app = create_app(store, SimController(store), token="sim-token", require_token_for_reads=False)
    history = app.state.view_history
    for r in range(RANKS):
        slow = 1.3 if r == 777 else 1.0
        for s in range(1, STEPS + 1):
            history.add_compute("trainer", r, s, 0.5 * slow * (1 + 0.05 * rng.random()))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (run_dir / "token").write_text("sim-token")
    (run_dir / "daemon.json").write_text(
        json.dumps({"url": f"http://127.0.0.1:{port}", "port": port, "pid": os.getpid()})
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- measuring -------------------------------------------------------------------------------
@contextlib.contextmanager
def dashboard(run_dir: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "milepost.daemon.cli",
        "dashboard",
        "--run-dir",
        str(run_dir),
        "--port",
        str(port),
    ]
    cmd += ["--refresh-s", str(REFRESH_S)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        wait_for("the dashboard", lambda: httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok", 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(180_000)
        yield page
        b.close()


def render_once(page: Any, url: str) -> float:
    page.goto("about:blank")
    t0 = time.perf_counter()
    page.goto(f"{url}/ranks")
    page.get_by_text("Compute time per rank").first.wait_for()
    heatmap = page.locator(CHART).first
    heatmap.scroll_into_view_if_needed()  # charts are drawn when they come into view
    heatmap.locator("canvas").wait_for()
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def cpu_per_min(pid: int, window_s: float = CPU_WINDOW_S) -> float:
    before = cpu_s(pid)
    time.sleep(window_s)
    return (cpu_s(pid) - before) * 60.0 / window_s


OBSERVE = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('[data-testid="stCaptionContainer"]')) {
      const t = el.innerText;
      if (t.startsWith('updated ') && !window.__seen.some(s => s[1] === t)) window.__seen.push([Date.now(), t]);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def refresh_cycles(page: Any, url: str, seconds: float) -> list[float]:
    """Seconds from a live refresh's start (its caption's stamp) to the browser showing it."""
    page.goto(f"{url}/overview")
    page.get_by_text("updated ").first.wait_for()
    page.evaluate(OBSERVE)
    page.wait_for_timeout(seconds * 1000)
    seen = page.evaluate("window.__seen")
    out = []
    for at_ms, text in seen:
        stamp = text.split()[1]  # HH:MM:SS.mmm, local time of the server (this machine)
        hh, mm, rest = stamp.split(":")
        ss, ms = rest.split(".")
        lt = time.localtime(at_ms / 1000)
        day0 = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
        start = day0 + int(hh) * 3600 + int(mm) * 60 + int(ss) + int(ms) / 1000
        out.append(at_ms / 1000 - start)
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--sim-daemon":
        sim_daemon(Path(sys.argv[2]))
        return 0
    result: dict[str, Any] = {
        "bench": "dashboard",
        "ranks": RANKS,
        "steps": STEPS,
        "sim": "synthetic reports",
    }
    sim_dir = Path(tempfile.mkdtemp(prefix="milepost-bench-dash-")) / "sim"
    sim_dir.mkdir()
    log(f"simulated daemon: {RANKS} ranks x {STEPS} steps")
    sim = subprocess.Popen([sys.executable, __file__, "--sim-daemon", str(sim_dir)])
    try:
        wait_for("the simulated daemon", lambda: (sim_dir / "daemon.json").exists(), 120)
        time.sleep(1.0)
        with dashboard(sim_dir) as url, browser() as page:
            log("warm-up load of /ranks")
            render_once(page, url)
            loads = [render_once(page, url) for _ in range(3)]
            log(f"ranks view loads: {[round(x, 2) for x in loads]}")
            result["render_s"] = round(statistics.median(loads), 3)
            result["sim_daemon_cpu_s_per_min_ranks_1024"] = round(cpu_per_min(sim.pid), 3)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=10)

    log("real daemon on the tiny job")
    with daemon({"run": {"steps": 100000}}, "dashboard") as (client, run_dir):
        wait_for("a few steps", lambda: client.status()["step"] >= 3, 180)
        pid = json.loads((run_dir / "daemon.json").read_text())["pid"]
        with dashboard(run_dir) as url, browser() as page:
            page.goto("about:blank")
            idle = cpu_per_min(pid)
            cycles = refresh_cycles(page, url, CPU_WINDOW_S)  # the overview open for the same window
            polled = (cpu_s(pid), time.time())
            page.wait_for_timeout(CPU_WINDOW_S * 1000)
            busy = (cpu_s(pid) - polled[0]) * 60.0 / (time.time() - polled[1])
        log(f"refresh cycles (s): {[round(c, 3) for c in cycles[:20]]}")
        result["refresh_s"] = round(statistics.median(cycles), 3) if cycles else None
        result["refresh_p90_s"] = round(sorted(cycles)[int(0.9 * (len(cycles) - 1))], 3) if cycles else None
        result["daemon_cpu_s_per_min_idle"] = round(idle, 3)
        result["daemon_cpu_s_per_min_overview_open"] = round(busy, 3)
        result["daemon_cpu_s_per_min"] = round(busy - idle, 3)
    result["targets"] = {"render_s": 2.0, "refresh_s": 1.0}
    result["load_avg_1m"] = round(os.getloadavg()[0], 1)  # the machine is shared: say how busy it was
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
