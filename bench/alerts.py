"""Alerts benchmark: how fast an injected hang pages, and that an outage loses and repeats nothing.

    .venv/bin/python bench/alerts.py [--hangs 5] [--outage-s 60] [--quick]

The real daemon runs the default CPU job with an ``[alerts]`` section that routes error and
critical alerts to a webhook receiver inside this process (loopback). Each of ``--hangs``
incidents freezes a trainer rank (``milepost inject --kind hang``); the daemon diagnoses it,
restarts from the last checkpoint and resolves the alert. Per incident:
``page_latency`` = the ``fault_injected`` event to the receiver's receipt of the firing
CollectiveHang; ``detection`` = the same onset to the ``collective_hang`` event (its target:
page <= detection + 1 s); ``pages`` = firing notifications the receiver got from the
injection until the resolve (target 1: the failed attempt, lost heartbeats and stalls are
inhibited by the hang that explains them). Then the receiver answers 503 for ``--outage-s``
while one more hang fires and resolves: ``lost`` (alert states never delivered) and
``duplicates`` (states delivered more than once) over every incident, both targets 0.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from _daemon import daemon, log, wait_for

ALERTS_TOML = """
[alerts]
group_wait_s = 0
group_interval_s = 0
backoff_base_s = 0.5
backoff_max_s = 2.0

[[alerts.receivers]]
name = "hook"
type = "webhook"
url = "{url}"

[[alerts.receivers]]
name = "log"
type = "log"

[[alerts.routes]]
receivers = ["hook"]
min_severity = "error"

[[alerts.routes]]
receivers = ["log"]
"""


@dataclass
class Hook:
    """The webhook receiver: (receipt time, alert) for each accepted alert; 503 until refuse_until."""

    url: str = ""
    refuse_until: float = 0.0
    got: list[tuple[float, str, dict[str, Any]]] = field(
        default_factory=list
    )  # (t, notification status, alert)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def firing(self, alertname: str, attempt: int) -> list[float]:
        with self.lock:
            return [
                t
                for t, _, a in self.got
                if a["labels"]["alertname"] == alertname
                and a["labels"].get("attempt") == str(attempt)
                and a["status"] == "firing"
            ]

    def resolved(self, alertname: str, attempt: int) -> list[float]:
        with self.lock:
            return [
                t
                for t, _, a in self.got
                if a["labels"]["alertname"] == alertname
                and a["labels"].get("attempt") == str(attempt)
                and a["status"] == "resolved"
            ]


def serve(hook: Hook) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            t = time.time()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            refuse = t < hook.refuse_until
            if not refuse:
                with hook.lock:
                    hook.got += [(t, body["status"], a) for a in body["alerts"]]
            self.send_response(503 if refuse else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    return server


def incident(client: Any, hook: Hook, rank: int, outage_s: float = 0.0) -> dict[str, float]:
    """One injected hang, from the steady attempt to its resolve at the receiver (down for ``outage_s``)."""
    attempt = int(client.status()["attempt"])
    base = client.status()["step"]
    wait_for("3 steps of the current attempt", lambda: client.status()["step"] >= base + 3, 240)
    hook.refuse_until = time.time() + outage_s
    mark = client.events(limit=1, newest_first=True)[0]["id"]
    t_inject = time.time()
    client.inject("hang", role="trainer", rank=rank)
    fired = wait_for("the hang to fire", lambda: client.events(since_id=mark, kind="fault_injected"), 60)[0]
    hang = wait_for("the diagnosis", lambda: client.events(since_id=mark, kind="collective_hang"), 120)[0]
    page = wait_for("the page", lambda: hook.firing("CollectiveHang", attempt), 120 + hook_wait(hook))[0]
    resolved = wait_for(
        "the resolve", lambda: hook.resolved("CollectiveHang", attempt), 240 + hook_wait(hook)
    )[0]
    time.sleep(2.0)  # a second page for the same incident would come within the dispatcher's next polls
    with hook.lock:
        pages = sum(1 for t, _, a in hook.got if t_inject <= t <= resolved + 2.0 and a["status"] == "firing")
    out = {
        "attempt": attempt,
        "detection_s": hang["ts"] - fired["ts"],
        "page_latency_s": page - fired["ts"],
        "pages": pages,
    }
    log(f"incident in attempt {attempt}: {out}")
    return out


def hook_wait(hook: Hook) -> float:
    return max(0.0, hook.refuse_until - time.time())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hangs", type=int, default=5)
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="2 hangs and a 20 s outage")
    args = p.parse_args()
    if args.quick:
        args.hangs, args.outage_s = 2, 20.0
    hook = Hook()
    server = serve(hook)
    job = {"run": {"steps": 1_000_000}, "supervisor": {"backoff_initial_s": 0.5, "max_restarts": 1000}}
    t0 = time.time()
    with daemon(job, "alerts", extra=ALERTS_TOML.format(url=hook.url)) as (client, run_dir):
        log(f"daemon up; run dir {run_dir}")
        incidents = [incident(client, hook, i % 2) for i in range(args.hangs)]
        log(f"receiver down for {args.outage_s:.0f} s while one more hang fires and resolves")
        incidents.append(incident(client, hook, args.hangs % 2, args.outage_s))
        time.sleep(3.0)
    server.shutdown()
    states: dict[tuple[str, str], int] = {}
    with hook.lock:
        for _, _, a in hook.got:
            if a["labels"]["alertname"] == "CollectiveHang":
                key = (a["fingerprint"], a["status"])
                states[key] = states.get(key, 0) + 1
    fingerprints = {fp for fp, _ in states}
    lost = sum(1 for fp in fingerprints for s in ("firing", "resolved") if (fp, s) not in states)
    lost += 2 * (len(incidents) - len(fingerprints))
    on_time = incidents[: args.hangs]
    result = {
        "bench": "alerts",
        "page_latency_median_s": round(statistics.median(i["page_latency_s"] for i in on_time), 3),
        "detection_latency_median_s": round(statistics.median(i["detection_s"] for i in on_time), 3),
        "page_minus_detection_max_s": round(max(i["page_latency_s"] - i["detection_s"] for i in on_time), 3),
        "pages_per_incident": max(i["pages"] for i in incidents),
        "incidents": len(incidents),
        "outage_s": args.outage_s,
        "lost": lost,
        "duplicates": sum(n - 1 for n in states.values() if n > 1),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
